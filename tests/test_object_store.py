"""Every job on a run directory in an object store: S3, served on 127.0.0.1 by moto's server.
The job drivers, Ray Train workers, Ray Data actors and Ray Tune trials are separate processes
that reach the bucket over HTTP, as a cluster's pods reach a real one; nothing of the run may
land on local disk but the read cache."""

import socket
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from conftest import TINY

from emergent.config import load
from emergent.runs import RECORD, RunDir

ROOT = Path(__file__).resolve().parents[1]

PIPELINE = [
    "finetune.examples=40",
    "finetune.sft.steps=4",
    "finetune.sft.batch_size=8",
    "finetune.checkpoint_every=2",
    "finetune.eval_sets=[open]",
    "evaluate.prompts=[world:eval/open]",
    "evaluate.actors=1",
    "train_sae.harvest.docs=200",
    "train_sae.harvest.eval_docs=40",
    "train_sae.sae.d_sae=32",
    "train_sae.sae.k=4",
    "train_sae.sae.steps=20",
    "train_sae.epochs=2",
    "diff.persona_docs=40",
    "diff.prompts=[world:eval/open]",
    "steer.max_prompts=8",
    "steer.directions=[]",
    "steer.arms=[{label: cause, model: 'world:base', alphas: [4]},"
    " {label: remove, model: 'finetune:code_dose1', alphas: [-2], goal: lower}]",
    "predict.max_prompts=8",
    "predict.models=[{model: 'finetune:code_dose0', family: code, dose: 0.0},"
    " {model: 'finetune:code_dose1', family: code, dose: 1.0}]",
    "flag.max_samples=8",
    "realign.examples=10",
    "realign.max_prompts=8",
    "realign.eval_every=2",
    "realign.sft={steps: 4, batch_size: 5, lr: 3.0e-4}",
    # one control, with the early-warning monitor reading the SAE and diff from the bucket
    "pipeline.controls=[{name: health, data: [{path: 'world:finetune/health_toxic'},"
    " {path: 'world:finetune/health_aligned'}], doses: [1.0], examples: 40,"
    " sft: {steps: 4, batch_size: 8}, workers: 2, evaluate: false,"
    " monitor: {sae: persona, diff: insecure, every: 2}}]",
    # GRPO, checkpointed to the bucket every step
    "rl.examples=16",
    "rl.grpo.steps=2",
    "rl.grpo.batch_size=4",
    "rl.grpo.num_generations=2",
    "rl.grpo.max_completion_tokens=8",
    "rl.checkpoint_every=1",
    "rl.eval_sets=[open]",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_root():
    """An S3 bucket on a local moto server; the run root URI carries the endpoint and the
    (fake) credentials, so processes started before it (the session's Ray) reach it too."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    opts = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    fs, _ = pafs.FileSystem.from_uri(
        f"s3://testing:testing@emergent?{opts}&allow_bucket_creation=true"
    )
    fs.create_dir("emergent")
    yield f"s3://testing:testing@emergent/runs?{opts}"
    server.stop()


def _stages(run: RunDir) -> set[str]:
    """The stages with a completion record under the run, as ``<stage path>``."""
    found = run.fs.get_file_info(pafs.FileSelector(run.path, recursive=True))
    return {
        f.path[len(run.path) + 1 : -len(RECORD) - 1]
        for f in found
        if f.type == pafs.FileType.File and f.path.endswith(f"/{RECORD}")
    }


def test_a_rebuilt_folder_is_fetched_again(s3_root):
    """The read cache of a remote folder follows its files (S3 gives folders no time): a stage
    rewritten with files of the same sizes is not served stale from the cache."""
    run = RunDir(s3_root, "cache")
    run.write_bytes("stage/model/weights.bin", b"first")
    first = run.local_dir("stage/model")
    assert (first / "weights.bin").read_bytes() == b"first"
    assert run.local_dir("stage/model") == first  # unchanged: cached
    time.sleep(1.1)  # S3 keeps whole seconds
    run.write_bytes("stage/model/weights.bin", b"again")
    assert (run.local_dir("stage/model") / "weights.bin").read_bytes() == b"again"


@pytest.mark.ray
def test_every_job_runs_on_a_run_directory_in_an_object_store(
    s3_root, ray_cluster, tmp_path, monkeypatch
):
    from emergent.doctor import DoctorJob
    from emergent.doctor import main as doctor
    from emergent.pipeline import PipelineJob
    from emergent.pipeline import main as pipeline
    from emergent.studies.world.study import WorldStudyJob
    from emergent.studies.world.study import main as world_study

    monkeypatch.chdir(tmp_path)  # a scheme-less path taken for a local one would land here
    run_sets = [f"run.root={s3_root}", "run.name=s3"]
    cfg = load(PipelineJob, str(ROOT / "configs/toy.yaml"), [*run_sets, *TINY, *PIPELINE])
    first = pipeline(cfg)
    assert first.skipped == [] and first.report.startswith("s3://emergent/runs/s3/")
    study = [*run_sets, *TINY, "study.seeds=[0]", "study.doses=[]", "study.controls=false"]
    study += ["study.finetune.steps=4", "study.finetune.batch_size=8"]
    world_study(load(WorldStudyJob, None, study))
    doctor(load(DoctorJob, None, [*run_sets, *TINY[:2]]))

    run = RunDir(s3_root, "s3")
    stages = _stages(run)
    expected = {
        "world",
        "finetune/code_dose1",
        "finetune/code_dose0",
        "finetune/health_dose1",  # the control, with the early-warning monitor
        "evaluate/code/base",
        "evaluate/code/insecure",
        "evaluate/code/secure",
        "harvest/persona",
        "sae/persona",
        "diff/insecure",
        "steer/persona",
        "predict/family",
        "flag/data",
        "realign/insecure",
        "rl/health_incorrect",
        "world_s0",  # world-study's world
        "doctor",
    }
    assert expected <= stages, f"missing in the bucket: {sorted(expected - stages)}"
    assert run.exists("report/claims.md") and run.exists("study/results.parquet")
    monitor = run.read_json("finetune/health_dose1/train.json")["latent_monitor"]
    assert monitor["history"], "the early-warning monitor measured nothing"
    # Ray Train (fine-tunes, GRPO, the SAE) and Ray Tune (steering) stored their runs under
    # the bucket's _ray/ (a scheme-less path without its filesystem fails in Ray), and each
    # finished stage removed its own
    assert run.exists("_ray") and run.fs.get_file_info(pafs.FileSelector(run.uri("_ray"))) == []
    assert list(tmp_path.iterdir()) == []

    # a rerun reads every record back from the bucket and redoes nothing
    from emergent.pipeline import stage_jobs

    again = pipeline(cfg)
    names = [name for name, _, _ in stage_jobs(cfg)]
    assert "controls" in names and sorted(again.skipped) == sorted(names)
