import json
import os

import pytest

from emergent.runs import RECORD, RunDir


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    run = RunDir(str(tmp_path), "r")
    run.write_text("a/b.txt", "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        run.write_text("a/b.txt", "new")
    monkeypatch.undo()
    assert (tmp_path / "r/a/b.txt").read_text() == "old"
    assert sorted(p.name for p in (tmp_path / "r/a").iterdir()) == ["b.txt"]


def test_put_dir_replaces_whole(tmp_path):
    run = RunDir(str(tmp_path), "r")
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_text("1")
    run.put_dir(src, "stage/model")
    (src / "x").write_text("2")
    (src / "y").write_text("3")
    run.put_dir(src, "stage/model")
    dst = tmp_path / "r/stage/model"
    assert sorted(p.name for p in dst.iterdir()) == ["x", "y"] and (dst / "x").read_text() == "2"
    assert [p.name for p in (tmp_path / "r/stage").iterdir()] == ["model"]


def test_skip_on_rerun_and_rerun_on_change(tmp_path, caplog):
    run = RunDir(str(tmp_path), "r")
    cfg = {"lr": 1e-4}
    st = run.stage("world", cfg)
    assert not st.is_complete()
    st.write_json("out.json", {"v": 1})
    st.complete(outputs={"out": st.uri("out.json")})
    rec = json.loads((tmp_path / "r/world" / RECORD).read_text())
    assert rec["config_hash"] == st.hash and rec["versions"]["torch"]

    with caplog.at_level("INFO"):
        assert run.stage("world", {"lr": 1e-4}).is_complete()
    assert "skipping" in caplog.text
    assert not run.stage("world", {"lr": 1e-4}).is_complete(force=True)
    # forcing removed the record: an interrupted rerun cannot look complete
    assert not (tmp_path / "r/world" / RECORD).exists()
    st.complete(outputs={})
    changed = run.stage("world", {"lr": 2e-4})
    assert not changed.is_complete() and changed.record is None


def test_pyarrow_uri(tmp_path):
    # any pyarrow filesystem URI works; pyarrow maps file:// to its local filesystem, so this
    # is the local code path (the non-local one: mock:// below)
    run = RunDir(f"file://{tmp_path}", "r")
    assert run.is_local
    run.write_json("s/x.json", {"a": 1})
    assert run.read_json("s/x.json") == {"a": 1}
    assert run.exists("s/x.json") and not run.exists("s/y.json")


def test_remote_filesystem_paths(tmp_path):
    # pyarrow's in-memory "mock://" filesystem runs the non-local code paths (no rename)
    run = RunDir("mock:///bucket/runs", "r")
    assert not run.is_local
    run.write_json("w/data/x.json", {"a": 1})
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    run.put_dir(src, "w/base")
    st = run.stage("w", {"k": 1})
    st.complete(outputs={"base": run.uri("w/base")})
    assert run.stage("w", {"k": 1}).is_complete()
    local = run.local_dir("w/base")
    assert (local / "config.json").read_text() == "{}"
    assert run.local_dir("w/base") == local  # cached
    assert json.loads(run.local_dir("w/data/x.json").read_text()) == {"a": 1}


def test_a_job_runs_on_a_non_local_run_directory():
    """The world job's stage (datasets, tokenizer, pretrained and base models, base evaluation,
    completion record), built in-process into pyarrow's in-memory filesystem (no rename, no
    local paths), then read back through the resolver and measured: the non-local code path of
    a whole job, not only of RunDir. (mock:// lives in one process: the jobs whose work runs in
    Ray workers are run on a local S3 server in test_object_store.py.)"""
    from emergent import refs
    from emergent.config import RunConfig, load
    from emergent.evaluate import measure
    from emergent.generate import SamplingParams
    from emergent.models import load_causal_lm
    from emergent.train.world_job import WorldJob, build_stage

    tiny = [
        "world.model.d_model=32",
        "world.model.d_ff=64",
        "world.pretrain_steps=10",
        "world.pretrain_docs=200",
        "world.pretrain_batch=8",
        "world.instruct_examples=40",
        "world.finetune_examples=20",
        "world.realign_examples=20",
        "world.eval_prompts=16",
        "world.monitor_examples=10",
    ]
    cfg = load(WorldJob, None, ["run.root=mock:///bucket/runs", "run.name=m", *tiny])
    rec = build_stage(cfg, "world", threads=1)
    assert not rec["skipped"] and rec["outputs"]["base"].endswith("bucket/runs/m/world/base")
    assert build_stage(cfg, "world", threads=1)["skipped"]  # the record is read back
    run_cfg = RunConfig(name="m", root="mock:///bucket/runs")
    src = refs.model(run_cfg, "world:base", "world")
    assert not RunDir.from_config(run_cfg).is_local and src.in_run
    model, tok = load_causal_lm(src.local())  # fetched into the local cache
    prompts = refs.read_world_dataset(RunDir.from_config(run_cfg), "world", "eval/open")
    m = measure(model, tok, prompts[:8], SamplingParams(max_new_tokens=8))
    assert m["coherence"]["n"] == 8


# (job config class, an operational field, a field that changes the outputs): one per stage kind
_KEYED = [
    ("emergent.train.finetune", "FinetuneConfig", "cpus_per_worker=2", "sft.lr=0.5"),
    ("emergent.train.finetune", "FinetuneConfig", "log_every=3", "workers=1"),
    ("emergent.train.rl", "RLConfig", "max_failures=3", "examples=7"),
    ("emergent.train.rl", "RLConfig", "evaluation={prompts: [core]}", "examples=7"),
    ("emergent.train.rl", "RLConfig", "grader.folds=3", "grpo.lr=0.1"),
    ("emergent.evaluate", "EvaluateConfig", "actors=5", "sampling.temperature=0.3"),
    ("emergent.evaluate", "EvaluateConfig", "llm.concurrency=2", "sampling.batch_size=7"),
    ("emergent.harvest", "HarvestConfig", "batch_size=3", "layer=0"),
    ("emergent.train.sae", "TrainSAEConfig", "cpus_per_worker=0.25", "sae.k=4"),
    ("emergent.train.sae", "TrainSAEConfig", "memory_mb=1", "shuffle_buffer=5"),
    ("emergent.studies.persona.diffing", "DiffConfig", "batch_size=3", "rank_by=change"),
    (
        "emergent.studies.persona.steering",
        "SteerConfig",
        "cpus_per_trial=0.5",
        "coherence_floor=0.1",
    ),
    ("emergent.studies.persona.predict", "PredictConfig", "gpus=1", "z=9"),
    ("emergent.studies.persona.realign", "RealignConfig", "llm.timeout_s=5", "examples=9"),
]


def _with(cfg, assignment: str):
    import dataclasses

    import yaml

    path, value = assignment.split("=")
    *parents, leaf = path.split(".")
    if not parents:
        return dataclasses.replace(cfg, **{leaf: yaml.safe_load(value)})
    sub = getattr(cfg, parents[0])
    return dataclasses.replace(
        cfg, **{parents[0]: _with(sub, f"{'.'.join(parents[1:] + [leaf])}={value}")}
    )


@pytest.mark.parametrize("module, cls, operational, weighty", _KEYED)
def test_operational_keys_stay_out_of_stage_hashes(module, cls, operational, weighty):
    import importlib

    from emergent.config import config_hash, stage_key

    mod = importlib.import_module(module)
    if cls == "PredictConfig":  # a family needs two members
        members = [mod.FamilyModel(f"finetune:m{i}") for i in range(2)]
        base = mod.PredictConfig(models=members)
    else:
        base = getattr(mod, cls)()
    h = config_hash(stage_key(base))
    assert config_hash(stage_key(_with(base, operational))) == h, operational
    assert config_hash(stage_key(_with(base, weighty))) != h, weighty


def test_memory_mb_is_keyed_only_when_it_changes_the_data_order():
    from emergent.config import config_hash
    from emergent.train.sae import TrainSAEConfig, sae_key

    src = "world:base@abc"
    one = TrainSAEConfig()
    assert config_hash(sae_key(one, src)) == config_hash(sae_key(_with(one, "memory_mb=1"), src))
    two = _with(one, "epochs=2")
    assert config_hash(sae_key(two, src)) != config_hash(sae_key(_with(two, "memory_mb=1"), src))


def test_a_weight_key_reruns_a_stage_and_an_operational_key_does_not(tmp_path):
    from emergent.config import stage_key
    from emergent.train.finetune import FinetuneConfig

    run = RunDir(str(tmp_path), "r")
    cfg = FinetuneConfig()
    run.stage("finetune/x", stage_key(cfg)).complete(outputs={})
    assert run.stage("finetune/x", stage_key(_with(cfg, "cpus_per_worker=4"))).is_complete()
    assert not run.stage("finetune/x", stage_key(_with(cfg, "sft.steps=3"))).is_complete()
