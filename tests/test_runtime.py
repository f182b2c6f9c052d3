"""The embedded runtime and a real `ray job submit` against a local `ray start --head`."""

import contextlib
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
        # Token auth is on: the job API refuses a request without the token or with a wrong
        # one, and the CLI without the token cannot submit (the job never runs).
        jobs_api = f"http://127.0.0.1:{port}/api/jobs/"
        assert _http_status(jobs_api, env["RAY_AUTH_TOKEN"]) == 200
        assert _http_status(jobs_api, None) == 401
        assert _http_status(jobs_api, "0" * 32) in (401, 403)
        anon = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
        anon["HOME"] = str(tmp_path / "home")  # no ~/.ray/auth_token to fall back on
        refused = subprocess.run(
            [*submit[:-1], "run.name=anonymous"],
            cwd=ROOT,
            env=anon,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert refused.returncode != 0, refused.stdout[-2000:]
        assert "401" in refused.stdout + refused.stderr or "nauthori" in refused.stderr
        assert not (tmp_path / "runs/anonymous").exists()
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


def _http_status(url: str, token: str | None) -> int:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


HELD = """
import time
from emergent.config import RayConfig
from emergent.runtime import ray_session

with ray_session(RayConfig(num_cpus=1, dashboard=True)) as r:
    r.get(r.remote(lambda: 0).remote())  # a worker too, not only the head processes
    print("up", flush=True)
    time.sleep(600)
"""


def _procs() -> dict[tuple[int, str], tuple[int, int, str]]:
    """Live processes: (pid, start time) -> (parent pid, process group, name); no zombies."""
    out = {}
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text() if d.name.isdigit() else ""
        except OSError:  # gone meanwhile
            continue
        if not stat:
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
        f = rest.split()  # state ppid pgrp ... starttime is field 22 of stat, 20 here
        if f[0] != "Z":
            out[int(d.name), f[19]] = (int(f[1]), int(f[2]), name)
    return out


@pytest.mark.ray
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_embedded_ray_goes_with_a_sigkilled_driver():
    # Ray's head processes die with the driver by PR_SET_PDEATHSIG, but the raylet's agents
    # (dashboard, runtime env) outlived a SIGKILLed driver by ~60 s
    # (see emergent.runtime._reap_agents_with_driver)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # its own session: every process Ray starts is in the driver's process group, so the group
    # finds them (their command lines are rewritten to "ray::DashboardAgent" and so on) and the
    # cleanup's killpg reaches no one else
    driver = subprocess.Popen(
        [sys.executable, "-c", HELD],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert driver.stdout.readline().startswith("up"), "the embedded Ray did not start"
        before = _procs()
        # the driver's descendants (some may leave its group) and its group
        ours, grew = {k for k, v in before.items() if v[1] == driver.pid}, True
        while grew:
            kids = {k for k, v in before.items() if v[0] in {p for p, _ in ours}} - ours
            ours, grew = ours | kids, bool(kids)
        names = {before[k][2] for k in ours}
        assert {"ray::DashboardA", "ray::RuntimeEnv", "raylet"} <= names, names  # not vacuous
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + 30
        while (left := {k: v for k, v in _procs().items() if k in ours or v[1] == driver.pid}) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.5)
        assert not left, f"left behind 30 s after the driver's SIGKILL: {sorted(left.values())}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
