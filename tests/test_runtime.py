"""The embedded runtime and a real `ray job submit` against a local `ray start --head`."""

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from emergent.config import RayConfig
from emergent.runtime import ray_session

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
def test_embedded_ray_starts_sized_and_stops():
    import ray

    with ray_session(RayConfig(num_cpus=1, dashboard=False, threads_per_worker=1)) as r:
        assert r.cluster_resources()["CPU"] == 1.0
        threads = r.get(r.remote(lambda: os.environ.get("OMP_NUM_THREADS")).remote())
        assert threads == "1"
    assert not ray.is_initialized()


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
    start = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--num-cpus",
        "2",
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(port),
        "--disable-usage-stats",
        "--temp-dir",
        tempfile.mkdtemp(prefix="ray", dir="/tmp"),
    ]
    # (a short --temp-dir: Ray's unix socket paths must stay under ~107 characters)
    started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        out = subprocess.run(
            [
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
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0 and "succeeded" in out.stdout, (
            out.stdout[-3000:] + out.stderr[-3000:]
        )
    finally:
        subprocess.run(
            [str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120
        )
    stage = tmp_path / "runs/submitted/doctor"
    report = json.loads((stage / "report.json").read_text())
    assert report["cluster_resources"]["CPU"] == 2.0 and len(report["nodes"]) == 1
    assert report["nodes"][0]["probe"]["versions"]["ray"]
    assert "deepspeed" in report["nodes"][0]["probe"]
    assert (stage / "_COMPLETE.json").exists() and (stage / "report.md").exists()
