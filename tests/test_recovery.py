"""What a cluster user meets when something dies, in one run of the pipeline's first stages:
the job driver SIGKILLed during the fine-tune and resubmitted; a second Ray node lost while it
hosts one of the resumed fine-tune's Ray Train workers (the worker group restarts on the head
from its checkpoint); the driver SIGKILLed again during the SAE's training and resubmitted.
The drivers are ``python -m jobs.pipeline`` processes joining the session's Ray cluster,
which outlives them as a cluster's head outlives a driver under ``ray job submit``. The
outcome is compared with an uninterrupted run of the same config."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, committed_checkpoint

from emergent.config import load
from emergent.runs import RECORD

ROOT = Path(__file__).resolve().parents[1]

# The pipeline's first stages on the tiny world: a fine-tune family (two models, one worker
# group) and a persona SAE long enough (checkpoints every few steps) for the driver to die in
# the middle of each.
FINETUNE = "finetune-code_dose1-*"  # the family's Ray Train run under <run>/_ray
STAGES = [
    "pipeline.stages=[world, finetune, train_sae]",
    "finetune.doses=[1.0, 0.0]",
    "finetune.examples=40",
    "finetune.sft.steps=60",
    "finetune.sft.batch_size=8",
    "finetune.checkpoint_every=10",
    "finetune.evaluate=false",
    "train_sae.harvest.docs=600",
    "train_sae.harvest.eval_docs=40",
    "train_sae.sae.d_sae=32",
    "train_sae.sae.k=4",
    "train_sae.sae.batch_size=64",
    "train_sae.sae.steps=150",
    "train_sae.epochs=20",
    "train_sae.checkpoint_every=15",
    "train_sae.log_every=15",
]


def _sets(root: Path, address: str) -> list[str]:
    return [f"run.root={root}", "run.name=kill", f"ray.address={address}", *TINY, *STAGES]


def _driver(sets: list[str], log: Path) -> subprocess.Popen:
    """``python -m jobs.pipeline`` as a user submits it, in its own process group (its log in
    ``log``)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = [sys.executable, "-m", "jobs.pipeline", "--config", "configs/toy.yaml"]
    args += [a for s in sets for a in ("--set", s)]
    with log.open("a") as out:
        return subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait(driver: subprocess.Popen, ready, log: Path, timeout: float = 600) -> None:
    """Until ``ready()``; fails if the driver ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert driver.poll() is None, f"the driver ended first:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting on the driver"
        time.sleep(0.1)


def _kill_when(driver: subprocess.Popen, ready, log: Path) -> None:
    """SIGKILL the driver's process group as soon as ``ready()``; fails if it ends first."""
    _wait(driver, ready, log)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _second_node(address: str, cpus: int):
    """A second Ray node joining the cluster at ``address`` (``ray start --address``, its own
    ports and process group): yields (its Popen, its node id)."""
    import ray

    before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port"]
    ports += ["--metrics-export-port", "--runtime-env-agent-port"]
    args = [str(Path(sys.executable).with_name("ray")), "start", f"--address={address}"]
    args += [f"--num-cpus={cpus}", "--num-gpus=0", "--block", "--disable-usage-stats"]
    args += [f"{p}={_free_port()}" for p in ports]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    node = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (new := {n["NodeID"] for n in ray.nodes() if n["Alive"]} - before):
            assert node.poll() is None and time.monotonic() < deadline, "the node did not join"
            time.sleep(0.5)
        yield node, new.pop()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        node.wait()


def _hold_cpu(node_id: str):
    """An actor holding one CPU of the node ``node_id`` (ready when returned)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=1)
    class Hold:
        def ready(self) -> bool:
            return True

    hold = Hold.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    hold = hold.remote()
    ray.get(hold.ready.remote(), timeout=120)
    return hold


def _train_workers_under(pid: int | None) -> list:
    """The live Ray Train worker processes descended from process ``pid`` (None: all)."""
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and (
                pid is None or pid in {q.pid for q in p.parents()}
            ):
                out.append(p)
    return out


def _second_model_checkpoint(run: Path):
    """The latest committed checkpoint of the fine-tune family, if it holds the trainer state of
    its second model (code_dose0), else None."""
    latest = committed_checkpoint(run / "_ray", FINETUNE)
    metrics = (latest or {}).get("metrics", {})
    return latest if metrics.get("model") == 1 and "step" in metrics else None


def _planned(cfg) -> dict[str, str]:
    """The pipeline's ``--plan``: stage -> skip / run / after."""
    from emergent import plan
    from emergent.pipeline import stage_jobs

    return {s.name: s.status for s in plan.plan(stage_jobs(cfg)).steps}


# files that hold times or absolute paths: the world's manifest, and the trainer's arguments
# (pickled by Hugging Face beside the weights, with the output folder)
VARYING = {"manifest.json", "model/training_args.bin"}


def _files(stage: Path) -> dict[str, bytes]:
    """A stage's files by path, but its completion record and the ``VARYING`` ones."""
    return {
        str(p.relative_to(stage)): p.read_bytes()
        for p in sorted(stage.rglob("*"))
        if p.is_file()
        and p.name != RECORD
        and str(p.relative_to(stage)) not in VARYING
        and not str(p.relative_to(stage)).startswith("acts/")  # shard names are Ray's ids
    }


def _activations(run: Path):
    """The persona harvest's rows (document, position, token, activation) as one Arrow table,
    in document and position order."""
    import pyarrow.parquet as pq

    table = pq.read_table(run / "harvest/persona/acts")
    return table.sort_by([("doc", "ascending"), ("pos", "ascending")])


# about 4.5 minutes on 2 cores (2026-12-04): in the default tier since the Tune trials reuse
# their actors (which took more than that off the tier's steering tests)
@pytest.mark.ray
def test_a_killed_driver_and_a_lost_node_lose_nothing(ray_cluster, tmp_path):
    from emergent import harvest
    from emergent.pipeline import PipelineJob
    from emergent.pipeline import main as pipeline

    address = ray_cluster.get_runtime_context().gcs_address
    toy = str(ROOT / "configs/toy.yaml")
    # the uninterrupted run of the deterministic stages, in this process: the world, the
    # fine-tune and the SAE's harvest (the SAE's own resume is tested against an uninterrupted
    # run in test_sae.py: it resumes at its step but re-reads its data from the start)
    ref_root = tmp_path / "uninterrupted"
    ref_sets = [*_sets(ref_root, address), "pipeline.stages=[world, finetune]"]
    ref_cfg = load(PipelineJob, toy, ref_sets)
    pipeline(ref_cfg)
    harvest.main(
        harvest.HarvestJob(run=ref_cfg.run, ray=ref_cfg.ray, harvest=ref_cfg.train_sae.harvest)
    )
    ref = ref_root / "kill"

    root, log = tmp_path / "killed", tmp_path / "driver.log"
    sets = _sets(root, address)
    cfg = load(PipelineJob, toy, sets)
    run = root / "kill"

    # 1. killed during the fine-tune's second model, once a checkpoint of it is committed: the
    #    first model is saved, but no stage is recorded complete before the family is
    driver = _driver(sets, log)
    _kill_when(driver, lambda: _second_model_checkpoint(run), log)
    first_model = (run / "finetune/code_dose1/train.json").read_bytes()
    assert not list(run.glob(f"finetune/*/{RECORD}"))
    assert _planned(cfg) == {"world": "skip", "finetune": "run", "train_sae": "run"}

    # 2. resubmitted, on a cluster grown by a second node that hosts one of the resumed
    #    fine-tune's two workers (one of the head's CPUs is held, so the workers must spread);
    #    the node is lost after the second model's next checkpoint, and the fine-tune
    #    recovers on the head; then the driver is killed during the SAE's training
    first = _second_model_checkpoint(run)
    with _second_node(address, cpus=1) as (node, _):
        hold = _hold_cpu(ray_cluster.get_runtime_context().get_node_id())
        driver = _driver(sets, log)
        _wait(driver, lambda: _second_model_checkpoint(run) not in (None, first), log)
        on_node = _train_workers_under(node.pid)
        assert on_node and len(_train_workers_under(None)) > len(on_node), "no worker on each node"
        os.killpg(node.pid, signal.SIGKILL)  # the node's raylet, its agents and its worker
        ray_cluster.kill(hold)
    _kill_when(driver, lambda: committed_checkpoint(run / "_ray", "sae-persona-*"), log)
    assert (run / "finetune/code_dose0" / RECORD).exists()
    assert not (run / "sae/persona" / RECORD).exists()
    # the first model was not trained again
    assert (run / "finetune/code_dose1/train.json").read_bytes() == first_model
    assert _planned(cfg) == {"world": "skip", "finetune": "skip", "train_sae": "run"}
    # two resumes: the driver's, from the checkpoint the killed driver left, then the worker
    # group's restart on the head, from the one committed before the node was lost
    resumed = set(
        re.findall(r"code_dose0: rank 0 resumes from \S*?(checkpoint_[\d_.-]+)", log.read_text())
    )
    assert len(resumed) == 2, resumed

    # 3. resubmitted: it finishes
    driver = _driver(sets, log)
    assert driver.wait(timeout=600) == 0, log.read_text()[-3000:]
    stages = json.loads((run / "report/stages.json").read_text())
    skipped = [s["stage"] for s in stages if s["skipped"] and s["stage"] != "total"]
    print(f"last resubmission: {len(skipped)} of {len(stages) - 1} stages skipped: {skipped}")
    assert skipped == ["world", "finetune"]

    # each stage resumed from its checkpoint, not from scratch
    train = json.loads((run / "finetune/code_dose0/train.json").read_text())
    assert train["resumed_from"] and train["steps"] == 60
    sae_train = json.loads((run / "sae/persona/train.json").read_text())
    assert sae_train["resumed"]
    # the deterministic parts equal the uninterrupted run's, file for file: the world, the
    # fine-tuned model (weights, tokenizer, losses: the checkpoint restores weights, optimiser,
    # RNG and data position) and the harvested activations
    assert _activations(run).equals(_activations(ref))
    for stage in ("world", "finetune/code_dose1", "finetune/code_dose0", "harvest/persona"):
        got, want = _files(run / stage), _files(ref / stage)
        assert got.keys() == want.keys(), stage
        differ = [k for k in got if got[k] != want[k]]
        if stage.startswith("finetune/"):  # train.json also holds times and the resume
            assert differ == ["train.json"], differ
            got_losses = json.loads((run / stage / "train.json").read_text())["losses"]
            assert got_losses == json.loads((ref / stage / "train.json").read_text())["losses"]
        else:
            assert differ == [], (stage, differ)
    # the SAE finished every step and explains part of the held-out variance
    metrics = json.loads((run / "sae/persona/metrics.json").read_text())
    assert sae_train["steps"] == metrics["train_steps"] == 150 and 0 < metrics["fvu"] < 1
