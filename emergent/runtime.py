"""Ray runtime: join a cluster when one is named, else start an embedded local Ray for the job.

The same job code runs under ``ray job submit`` (the job supervisor sets ``RAY_ADDRESS``), with
``--address`` / ``ray.address``, or on a laptop/CI box where the job starts (and stops) its own
local Ray sized to the machine. Threads are set explicitly: on a few shared cores, one torch
thread per process is many times faster than letting every worker grab all cores.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import subprocess
import sys

import psutil

from emergent import plan
from emergent.config import RayConfig
from emergent.telemetry import Progress, record

log = logging.getLogger(__name__)


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines with timestamps to stdout. Call it first in Ray tasks and actors too: worker
    processes start with no logging handler, so their INFO progress lines would be dropped
    (Ray forwards worker stdout to the driver and the dashboard)."""
    logging.basicConfig(
        level=level, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def set_threads(n: int) -> None:
    """Apply the job's configured thread count to torch in this process and to the environment
    its children inherit. A count the config sets is applied, not defaulted: with
    ``setdefault`` an inherited ``OMP_NUM_THREADS=1`` (Ray sets it in every worker; CI exports
    it) silently won over ``cpus_per_worker`` / ``cpus_per_trial``."""
    n = max(1, int(n))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(n)


def numerics() -> dict:
    """What a run's floating-point results depend on besides its config: torch's thread count
    in this process, its CPU kernel level and BLAS, and the CPU model (stage records keep it, so
    two runs that disagree can be told apart)."""
    out: dict = {"python": platform.python_version(), "machine": platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            out["cpu"] = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                platform.processor(),
            )
    except OSError:
        out["cpu"] = platform.processor()
    torch = sys.modules.get("torch")
    if torch is not None:  # only where the stage ran torch: no import just for the record
        out["torch_threads"] = torch.get_num_threads()
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        # torch's build summary: "BLAS_INFO=mkl, ..." on one line among its settings
        build = torch.__config__.show().replace("\n", " ").replace(",", " ").split()
        out["blas"] = next((s.split("=", 1)[1] for s in build if s.startswith("BLAS_INFO=")), None)
        out["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        out[var] = os.environ.get(var)
    return out


def offline_defaults() -> None:
    """Quiet, hub-free defaults for libraries that phone home; the user's settings win."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")


def cluster_address(cfg: RayConfig) -> str | None:
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


_REAPER = """
import sys, psutil
procs = []
for pid in sys.argv[1:]:
    try:
        procs.append(psutil.Process(int(pid)))
    except psutil.Error:
        pass
sys.stdin.buffer.read()  # returns at EOF: once the driver has exited, however it did
for p in procs:
    try:
        p.kill()  # psutil checks that the pid was not reused meanwhile
    except psutil.Error:
        pass
"""


def _reap_agents_with_driver() -> subprocess.Popen | None:
    """Start a reaper that SIGKILLs the embedded raylet's agents once this driver exits.

    A SIGKILLed driver takes Ray's head processes with it (GCS, raylet, dashboard, log monitor:
    Ray starts them with PR_SET_PDEATHSIG), and the raylet's workers end with the raylet. Not its
    dashboard and runtime-env agents: they see the raylet go at once, then block 60 s (a timeout
    hard-coded in ``ray._private.process_watcher``) reporting its death to the GCS, which died
    too; no Ray option shortens that (``RAY_gcs_rpc_server_reconnect_timeout_s`` does not).
    Ray's own reaper runs only where the kernel cannot fate-share, and it kills the driver's
    whole process group, which can hold the driver's caller (a shell pipeline, pytest).
    """
    raylet = next((p for p in psutil.Process().children() if p.name() == "raylet"), None)
    if raylet is None:
        log.warning("no raylet among this driver's children: its agents will not be reaped")
        return None
    # The raylet starts its agents before it registers with the GCS, which ray.init waits for,
    # so they are among its children now (with any workers it started). The reaper wakes when
    # the driver's end of its stdin closes: at the driver's exit, SIGKILL included (a child the
    # driver forks without exec holds that end too). Its own session: a Ctrl-C or hang-up meant
    # for the job must not stop it before it acts.
    return subprocess.Popen(
        [sys.executable, "-c", _REAPER, *(str(p.pid) for p in raylet.children())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )


@contextlib.contextmanager
def ray_session(cfg: RayConfig):
    """Connect to the configured cluster or start an embedded one; yields ``ray``.

    An embedded Ray is shut down on exit; a joined cluster is only disconnected from.
    """
    import ray

    if plan.active():  # a plan starts no Ray, joins none (emergent.plan)
        yield ray
        return
    offline_defaults()
    set_threads(cfg.threads_per_worker)
    env = {
        "env_vars": {v: str(cfg.threads_per_worker) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    }
    env["env_vars"].update(
        {k: os.environ[k] for k in ("WANDB_MODE", "RAY_TRAIN_ENABLE_PRINT_PATCH")}
    )
    address = cluster_address(cfg)
    reaper = None
    if ray.is_initialized():
        yield ray
        return
    if address:
        log.info("joining Ray cluster at %s", address)
        # Under `ray job submit` the job's own runtime_env (working_dir) applies; passing another
        # here would conflict with it. Ray workers default to OMP_NUM_THREADS=1 themselves.
        ray.init(address=address, log_to_driver=True)
    else:
        num_cpus = cfg.num_cpus or os.cpu_count() or 1
        log.info(
            "starting embedded Ray: %d CPUs, dashboard %s",
            num_cpus,
            "http://127.0.0.1:8265" if cfg.dashboard else "off",
        )
        ray.init(
            # "local": always a new cluster; a bare ray.init() would silently join one left
            # running by `ray start` (and then refuse num_cpus).
            address="local",
            num_cpus=num_cpus,
            num_gpus=cfg.num_gpus,
            include_dashboard=cfg.dashboard,
            dashboard_host="127.0.0.1",
            runtime_env=env,
        )
        reaper = _reap_agents_with_driver()
    try:
        yield ray
    finally:
        ray.shutdown()
        if reaper is not None:  # EOF: it kills what shutdown left, if anything, and exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                reaper.communicate(timeout=30)


def actor_pool_map(
    items: list[dict],
    actor_cls,
    kwargs: dict,
    *,
    actors: int,
    cpus: float,
    gpus: float,
    batch_size: int,
):
    """``items`` through a Ray Data actor pool of ``actor_cls`` (a callable class holding one
    model; built with ``kwargs`` plus ``threads``), in batches of ``batch_size`` (one block each,
    so batches are the same on every run), output in input order; lazy."""
    import ray.data

    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))
    out = ds.map_batches(
        actor_cls,
        fn_constructor_kwargs=kwargs | {"threads": max(1, int(cpus))},
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=gpus or None,
        batch_size=batch_size,
        batch_format="numpy",
    )
    # rows come out in input order (a harvest's Parquet rows, and so an SAE trained on them,
    # are the same on every run); the pool still works on several batches at once
    out.context.execution_options.preserve_order = True
    return out


def tune_grid(
    run, name: str, trainable, grid: list, force: bool = False, counter: tuple | None = None
):
    """The results of a Ray Tune grid search of ``{"setting": s}`` over ``grid``, stored under
    the run directory's ``_ray/<name>`` (a run on an object store gives Tune its filesystem: its
    paths have no scheme). An interrupted search resumes (errored trials again) unless
    ``force``. Needs a running Ray session. ``counter``: (a counter of ``telemetry.METRICS``,
    its tags), added to as each trial completes, with a progress line: by the driver's Tune
    callback, whose process outlives the trials' (a trial's own metrics die with it)."""
    import ray.tune

    space = {"param_space": {"setting": ray.tune.grid_search(grid)}}
    return _tune(run, name, trainable, space, {}, len(grid), force, counter)


def tune_search(
    run, name: str, trainable, searcher, budget: int, force: bool = False, counter=None
):
    """As :func:`tune_grid`, with the settings proposed by a Tune ``Searcher`` (at most
    ``budget`` trials; the searcher may finish earlier). Its state is saved with the Tune run,
    so an interrupted search resumes where it was."""

    tune = {"search_alg": searcher, "num_samples": budget}
    return _tune(run, name, trainable, {}, tune, budget, force, counter)


def _tune(run, name: str, trainable, space: dict, tune: dict, total: int, force: bool, counter):
    """``space``: the Tuner's ``param_space``, if any; ``tune``: its TuneConfig's arguments.
    Trials reuse their actors (Tune's default is a new worker process per trial: with torch
    and transformers imported, that start-up was ~4 s of every ~5 s steering trial on 2 cores);
    each trial loads its own model and seeds its own sampling, so a reused process changes no
    result."""
    import ray.tune

    callbacks = []
    if counter is not None:
        metric, tags = counter
        progress = Progress(f"tune {name}", total, "trials", **tags)

        class TrialsDone(ray.tune.Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                record(metric, 1, **tags)
                progress.add()

        callbacks.append(TrialsDone())

    path = f"{run.uri('_ray')}/{name}"
    fs = None if run.is_local else run.fs
    if ray.tune.Tuner.can_restore(path, storage_filesystem=fs) and not force:
        log.info("resuming the Tune run at %s", path)
        tuner = ray.tune.Tuner.restore(path, trainable, resume_errored=True, storage_filesystem=fs)
    else:
        tuner = ray.tune.Tuner(
            trainable,
            run_config=ray.tune.RunConfig(
                name=name,
                storage_path=run.uri("_ray"),
                storage_filesystem=fs,
                verbose=1,
                callbacks=callbacks,
            ),
            tune_config=ray.tune.TuneConfig(reuse_actors=True, **tune),
            **space,
        )
    return tuner.fit()


def drop_tune_run(run, name: str) -> None:
    """Remove a finished Tune run's directory ``_ray/<name>`` from the run directory."""
    if run.exists(f"_ray/{name}"):
        run.fs.delete_dir(run.uri(f"_ray/{name}"))
