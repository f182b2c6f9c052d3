"""The embedded runtime and a real `ray job submit` against a local `ray start --head`."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EMBEDDED = """
import os, ray
from emergent.config import RayConfig
from emergent.runtime import ray_session

with ray_session(RayConfig(num_cpus=1, dashboard=False, threads_per_worker=2)) as r:
    cpus = r.cluster_resources()["CPU"]
    threads = r.get(r.remote(lambda: os.environ.get("OMP_NUM_THREADS")).remote())
print("result", cpus, threads, ray.is_initialized())
"""


@pytest.mark.ray
def test_embedded_ray_starts_sized_and_stops():
    # in a fresh process: this one may hold the session's shared Ray (conftest.ray_cluster)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-c", EMBEDDED],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # 1 CPU as asked; OMP threads as configured (Ray's own default for a 1-CPU task would be
    # "1"); stopped on exit
    assert "result 1.0 2 False" in out.stdout, out.stdout[-2000:]


@pytest.mark.ray
def test_ray_job_submit_doctor(tmp_path):
    port, gcs = _free_port(), _free_port()
    env = dict(
        os.environ,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        PATH=f"{BIN}:{os.environ['PATH']}",
    )
    env.pop("RAY_ADDRESS", None)
    # `--block` in its own session: stopping it stops this head only (a `ray stop` would stop
    # every Ray on the machine). A short --temp-dir keeps unix socket paths under ~107 chars.
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus",
            "2",
            "--port",
            str(gcs),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(port),
            # the agents' default ports are taken by any other Ray on this machine (the test
            # session's shared one), and the head's agent would never come up
            "--dashboard-agent-listen-port",
            str(_free_port()),
            "--dashboard-agent-grpc-port",
            str(_free_port()),
            "--runtime-env-agent-port",
            str(_free_port()),
            "--metrics-export-port",
            str(_free_port()),
            "--disable-usage-stats",
            "--temp-dir",
            tempfile.mkdtemp(prefix="ray", dir="/tmp"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        submit = [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{port}",
            "--working-dir",
            ".",
            "--",
            "python",
            "-m",
            "jobs.doctor",
            "--set",
            f"run.root={tmp_path / 'runs'}",
            "--set",
            "run.name=submitted",
        ]
        for _ in range(60):  # the dashboard takes a few seconds to come up
            out = subprocess.run(
                submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
            )
            said = out.stdout + out.stderr
            not_up = "Failed to connect" in said or "No available agent" in said
            if not not_up or head.poll() is not None:
                break
            time.sleep(2)
        assert out.returncode == 0 and "succeeded" in out.stdout, (
            out.stdout[-3000:] + out.stderr[-3000:]
        )
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
    stage = tmp_path / "runs/submitted/doctor"
    report = json.loads((stage / "report.json").read_text())
    assert report["cluster_resources"]["CPU"] == 2.0 and len(report["nodes"]) == 1
    probe = report["nodes"][0]["probe"]
    assert probe["versions"]["ray"] and probe["deepspeed"]["accelerator"] == "cpu"
    assert "error" not in probe["deepspeed"] and probe["deepspeed"]["ops"]
    assert (stage / "_COMPLETE.json").exists() and (stage / "report.md").exists()
