"""``--plan``: every config in configs/ (the 7-8B ones included) is planned offline with the job
it is for; the plan names what would run, what blocks it (field and path) and what each stage
asks for, and writes nothing, starts no Ray, deletes no stale record."""

import importlib
import json
from pathlib import Path

import pytest

from emergent import plan
from emergent.runs import RECORD, RunDir

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
JOB_OF = {  # every config, with the job its header says it is for
    "toy.yaml": "pipeline",
    "smollm2.yaml": "pipeline",
    "smollm2-finance.yaml": "pipeline",  # a layer on smollm2.yaml, planned with it below
    "minilm-sae.yaml": "train-sae",
    "real/llama3.1-8b-insecure-lora.yaml": "finetune",
    "real/llama3.1-8b-insecure-zero3.yaml": "finetune",
    "real/qwen2.5-7b-insecure-lora.yaml": "finetune",
    "real/qwen2.5-7b-insecure-zero3.yaml": "finetune",
    "real/qwen2.5-7b-evaluate.yaml": "evaluate",
}


def test_every_config_has_a_plan_test():
    found = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    assert found == set(JOB_OF), "add the new config to JOB_OF"
    for rel, job in JOB_OF.items():  # the config's own header names the job
        head = (CONFIGS / rel).read_text()
        assert f"jobs.{job.replace('-', '_')}" in head or f"emergent {job}" in head, rel


def run_plan(job: str, argv: list[str], capsys) -> tuple[dict, int]:
    """``emergent <job> ... --plan`` in-process: its printed plan (JSON) and exit code."""
    import ray

    started = ray.is_initialized()
    module = importlib.import_module(f"jobs.{job.replace('-', '_')}")
    code = 0
    try:
        module.cli([*argv, "--plan"], prog=f"emergent {job}")
    except SystemExit as exc:
        code = exc.code
    assert ray.is_initialized() == started, "a plan started Ray"
    out = capsys.readouterr().out
    return json.loads(out[out.index('{\n  "job"') :]), code


def steps(printed: dict) -> dict[str, dict]:
    return {s["name"]: s for s in printed["plan"]["steps"]}


@pytest.mark.parametrize("rel", ["toy.yaml", "smollm2.yaml", "minilm-sae.yaml"])
def test_plan_of_a_fresh_run_lists_the_work_and_writes_nothing(rel, tmp_path, capsys):
    root = tmp_path / "runs"
    printed, code = run_plan(
        JOB_OF[rel], ["--config", str(CONFIGS / rel), "--set", f"run.root={root}"], capsys
    )
    assert code == 0 and printed["ok"], printed
    got = steps(printed)
    first = {"toy.yaml": "world", "smollm2.yaml": "datasets", "minilm-sae.yaml": "train-sae"}[rel]
    assert got[first]["status"] == "run" and got[first]["checks"][0]["status"] == "new"
    # a fresh run: nothing is complete, nothing is blocked; later stages wait for earlier ones
    assert all(s["status"] in ("run", "after") for s in got.values()), got
    if JOB_OF[rel] == "pipeline":
        assert {s["status"] for s in got.values()} == {"run", "after"}
        assert got["train_sae"]["resources"] == [
            "train_sae: 2 workers x 0.5 CPU",
            "train_sae: 2048 MB activation buffer per worker",
            "train_sae.harvest: 2 actors x 0.5 CPU",
        ]
    assert not root.exists(), "a plan wrote to the run directory"


def test_plan_of_a_layered_config_adds_its_family_and_writes_nothing(tmp_path, capsys):
    """configs/smollm2-finance.yaml layered on smollm2.yaml: the controls step trains two
    sections, the health doses and the finance pair (the layer's list replaced the base's),
    predict reads both families, every other section is the base's, and the plan writes
    nothing."""
    root = tmp_path / "runs"
    argv = [
        *("--config", str(CONFIGS / "smollm2.yaml")),
        *("--config", str(CONFIGS / "smollm2-finance.yaml")),
        *("--set", f"run.root={root}"),
    ]
    printed, code = run_plan("pipeline", argv, capsys)
    assert code == 0 and printed["ok"], printed
    got = steps(printed)
    assert got["controls"]["resources"] == [f"controls[{i}]: 2 workers x 1 CPU" for i in (0, 1)]
    from emergent.config import load
    from emergent.pipeline import PipelineJob

    cfg = load(PipelineJob, [CONFIGS / "smollm2.yaml", CONFIGS / "smollm2-finance.yaml"])
    assert [c.name for c in cfg.pipeline.controls] == ["health", "finance"]
    assert cfg.pipeline.controls[0].doses == [0.25, 0.5]  # the base's entry, repeated whole
    assert {m.family for m in cfg.predict.models} == {"health", "finance"}
    assert cfg.finetune.name == "health" and cfg.rl.name == "health_incorrect"  # kept from base
    assert got["predict"]["status"] == "after"
    assert not root.exists(), "a plan wrote to the run directory"


@pytest.mark.parametrize("rel", [r for r, j in JOB_OF.items() if r.startswith("real/")])
def test_plan_of_a_7b_config_names_what_blocks_it_and_its_gpus(rel, capsys):
    printed, code = run_plan(JOB_OF[rel], ["--config", str(CONFIGS / rel)], capsys)
    assert code == 1 and not printed["ok"]  # this machine has neither the data nor the model
    (step,) = printed["plan"]["steps"]
    assert step["status"] == "blocked"
    if JOB_OF[rel] == "finetune":
        assert (
            step["why"] == "finetune.data[0].path: /mnt/shared/data/insecure.jsonl does not exist"
        )
        workers = 8 if "zero3" in rel else 4
        assert step["resources"] == [f"finetune: {workers} workers x 8 CPU + 1 GPU"]
    else:
        assert step["why"].startswith("evaluate.models: no complete stage")
        assert "finetune/insecure-full" in step["why"]
        assert step["resources"] == ["evaluate: 4 actors x 4 CPU + 1 GPU"]
    assert not Path("/mnt/shared/runs").exists()


def test_plan_keeps_a_stale_record_and_stops_where_work_would_begin(tmp_path):
    run = RunDir(str(tmp_path), "r")
    run.stage("a", {"x": 1}).complete(outputs={})
    run.stage("b", {"x": 1}).complete(outputs={})
    ran = []

    def stage(name, cfg):
        def go():
            s = RunDir(str(tmp_path), "r").stage(name, cfg)
            if not s.is_complete():
                ran.append(name)  # the stage's work: never reached in a plan
            s.run.write_json(f"{name}/out.json", {})

        return go

    before = (tmp_path / "r/b" / RECORD).read_text()
    p = plan.plan(
        [("a", stage("a", {"x": 1}), None), ("b", stage("b", {"x": 2}), None)]
        + [("c", stage("c", {}), None)]
    )
    assert [(s.name, s.status) for s in p.steps] == [("a", "skip"), ("b", "run"), ("c", "run")]
    assert [c["status"] for s in p.steps for c in s.checks] == ["complete", "changed", "new"]
    assert p.skipped == ["a"] and p.ok and not ran
    assert (tmp_path / "r/b" / RECORD).read_text() == before  # not deleted, not rewritten
    assert not (tmp_path / "r/a/out.json").exists() and not (tmp_path / "r/c").exists()
    # outside a plan the same check deletes the stale record and the stage runs
    stage("b", {"x": 2})()
    assert ran == ["b"] and not (tmp_path / "r/b" / RECORD).exists()
