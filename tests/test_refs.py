"""The one resolver (emergent.refs): every kind of model ref, dataset ref and SAE ref, with
the identities stage hashes use, and one-line errors naming the field."""

from __future__ import annotations

import json

import pytest

from emergent import refs
from emergent.config import RunConfig, UserError
from emergent.runs import RunDir


@pytest.fixture
def run_cfg(tmp_path):
    cfg = RunConfig(name="r", root=str(tmp_path))
    run = RunDir.from_config(cfg)
    run.stage("world", {"seed": 0}).complete(outputs={})
    run.write_text("world/base/config.json", "{}")
    run.write_text("world/data/finetune/code_toxic.jsonl", json.dumps({"messages": []}) + "\n")
    run.stage("finetune/code_dose1", {"lr": 1}).complete(outputs={})
    run.write_text("finetune/code_dose1/model/config.json", "{}")
    run.stage("rl/health", {"lr": 2}).complete(outputs={})
    run.stage("sae/persona", {"k": 8}).complete(outputs={})
    run.write_json("sae/persona/harvest.json", {"layer": 1, "d_model": 64})
    return cfg


def test_run_models_resolve_to_their_stage_with_its_hash(run_cfg):
    run = RunDir.from_config(run_cfg)
    for ref, stage, rel in [
        ("world:base", "world", "world/base"),
        ("finetune:code_dose1", "finetune/code_dose1", "finetune/code_dose1/model"),
        ("rl:health", "rl/health", "rl/health/model"),
    ]:
        src = refs.model(run_cfg, ref, "world")
        digest = run.read_json(f"{stage}/_COMPLETE.json")["config_hash"]
        assert src.identity == f"{ref}@{digest}" and src.rel == rel and src.in_run
    # a fine-tune's model is a valid base for another fine-tune: the training jobs resolve it
    # through the same function (they used to take it for a hub id)
    assert (
        refs.model(run_cfg, "finetune:code_dose1", "world", "finetune.model")
        .local()
        .endswith("finetune/code_dose1/model")
    )


def test_missing_stages_and_paths_name_the_field(run_cfg, tmp_path, monkeypatch):
    with pytest.raises(
        UserError, match=r"finetune\.model: no complete stage .*finetune/x .*emergent finetune"
    ):
        refs.model(run_cfg, "finetune:x", "world", "finetune.model")
    with pytest.raises(
        UserError, match=r"evaluate\.models: no complete stage .*world_s9 .*emergent world"
    ):
        refs.model(run_cfg, "world:base", "world_s9", "evaluate.models")
    with pytest.raises(UserError, match=r"harvest\.model: /nope/model: no such model directory"):
        refs.model(run_cfg, "/nope/model", "world", "harvest.model")
    with pytest.raises(UserError, match=r"harvest\.model: pkg:no_such_pkg_xyz/m: package"):
        refs.model(run_cfg, "pkg:no_such_pkg_xyz/m", "world", "harvest.model")
    local = tmp_path / "m"
    local.mkdir()
    assert refs.model(run_cfg, str(local), "world").identity == str(local.resolve())
    monkeypatch.chdir(tmp_path)  # an existing relative directory is a path, not a hub id
    assert refs.model(run_cfg, "m", "world").identity == str(local.resolve())


def test_hub_ids_carry_their_revision(run_cfg):
    a = refs.model(run_cfg, "Qwen/Qwen2.5-7B-Instruct", "world")
    b = refs.model(run_cfg, "Qwen/Qwen2.5-7B-Instruct@a09a354", "world")
    assert a.identity == "Qwen/Qwen2.5-7B-Instruct@main" and a.local() == "Qwen/Qwen2.5-7B-Instruct"
    assert b.identity == "Qwen/Qwen2.5-7B-Instruct@a09a354" and b.revision == "a09a354"
    assert a.identity != b.identity  # a pinned revision is another stage key


def test_world_datasets_and_saes(run_cfg):
    run = RunDir.from_config(run_cfg)
    path = refs.world_dataset(run, "world:finetune/code_toxic", "world", "data")
    assert path.name == "code_toxic.jsonl" and path.exists()
    with pytest.raises(
        UserError, match=r"prompts: world:eval/nope -> .*does not exist .*emergent world"
    ):
        refs.world_dataset(run, "world:eval/nope", "world", "prompts")
    for ref in ("persona", "sae:persona"):
        s = refs.sae(run, ref, "diff.sae")
        assert (s.name, s.layer, s.d_model) == ("persona", 1, 64)
        assert s.hash == run.read_json("sae/persona/_COMPLETE.json")["config_hash"]
    with pytest.raises(UserError, match=r"steer\.sae: no complete stage .*sae/other .*train-sae"):
        refs.sae(run, "other", "steer.sae")
    with pytest.raises(
        UserError, match=r"predict\.diff: no complete stage .*diff/insecure .*emergent diff"
    ):
        refs.diff(run, "insecure", "predict.diff")
    run.stage("diff/insecure", {"sae": "persona"}).complete(outputs={})
    run.write_json("diff/insecure/summary.json", {"top_latent": 7, "top_up": [7, 3]})
    d = refs.diff(run, "diff:insecure")
    assert d.summary["top_up"] == [7, 3]
    assert d.hash == run.read_json("diff/insecure/_COMPLETE.json")["config_hash"]


def test_direction_errors_name_the_section_that_asked(run_cfg, tmp_path):
    """The predict and finetune jobs resolve directions through the steering job's resolver: a
    bad one is reported under their own field, and a direction file that is not there is a
    one-line error, not a traceback."""
    from emergent.directions import directions
    from emergent.studies.persona.steering import SteerConfig

    run = RunDir.from_config(run_cfg)
    missing = tmp_path / "nope.npy"
    run.stage("diff/old", {"sae": "persona"}).complete(outputs={})
    run.write_json("diff/old/summary.json", {"top_latent": 7, "top_up": [7, 3]})
    for section, field, spec, message in [
        ("predict", None, f"v={missing}", r"predict\.directions: 'v=.*nope\.npy'.*No such file"),
        ("predict", None, "v=diff:none", r"predict\.directions: no complete stage .*diff/none"),
        ("steer", None, "v=pc1:old", r"steer\.directions: 'v=pc1:old': no diff/old/shift_pc1"),
        ("steer", None, "no-label", r"steer\.directions: 'no-label' is not label="),
        # the finetune job's one direction: its own field, the value as the user wrote it
        ("finetune.steer", "finetune.steer.direction", "v=diff:old", r"direction: 'diff:old': no"),
    ]:
        with pytest.raises(UserError, match=message):
            spec = SteerConfig(sae="persona", diff=None, directions=[spec])
            directions(spec, run, run_cfg, section, field)
    spec = SteerConfig(sae="other", diff=None, directions=["v=pc1:none"])
    with pytest.raises(UserError, match=r"predict\.sae: no complete stage .*sae/other"):
        directions(spec, run, run_cfg, "predict")


class _Planted:
    """Unpickling this runs code: it writes a marker file (what a hostile checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_checkpoints_are_refused_before_anything_unpickles_them(run_cfg, tmp_path):
    import pickle

    from emergent.models import load_any, load_causal_lm

    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    marker = tmp_path / "unpickled"
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Planted(str(marker))))
    with pytest.raises(UserError, match=r"model: .*pickled.*pytorch_model\.bin.*safetensors only"):
        refs.model(run_cfg, str(model_dir), "world")
    for load in (load_causal_lm, load_any):
        with pytest.raises(UserError, match="pickled weights"):
            load(str(model_dir))
    assert not marker.exists()
    # with safetensors beside the pickle, the safetensors are what loads
    (model_dir / "model.safetensors").write_bytes(b"")
    assert refs.model(run_cfg, str(model_dir), "world").path == str(model_dir)
