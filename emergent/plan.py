"""``--plan``: what a job (or the pipeline) would do, found offline; nothing runs or is written.

    emergent pipeline --config configs/toy.yaml --plan
    emergent finetune --config configs/real/qwen2.5-7b-insecure-zero3.yaml --plan

The plan runs each stage's own code up to its completion check, with three things switched off
(``planning()``): the check never deletes a stale record and stops the stage where its work
would begin (``PlanStop``); the run directory writes nothing (not even a folder); and Ray is
neither started nor joined (auto-connect off, so a stray Ray call fails instead of starting a
cluster). So the config is validated, every reference resolves as it would (a typo, a missing
file or package is reported with its field), and each stage's hash is the one the real run
computes: no second copy of the stages' key logic to drift. A stage is then

- ``skip``: complete with the same config (every stage it checked);
- ``run``: it would start work at the stage named (new, or its config changed);
- ``after``: it reads what an earlier stage of this plan has yet to make;
- ``blocked``: a problem (missing input nothing here makes, a bad config or file): the plan
  exits 1, so a cluster run is not submitted to fail.

Resources are what each stage asks Ray for: workers x CPUs (and GPUs) of every section that
schedules work, read from the config.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from emergent.config import UserError

_ACTIVE: contextvars.ContextVar[list[dict] | None] = contextvars.ContextVar("plan", default=None)


class PlanStop(Exception):
    """Raised in plan mode where a stage's work would begin."""

    def __init__(self, check: dict):
        super().__init__(check["stage"])
        self.check = check


def active() -> bool:
    return _ACTIVE.get() is not None


@contextlib.contextmanager
def planning():
    """Plan mode for the code run inside (see the module doc)."""
    token = _ACTIVE.set([])
    old = os.environ.get("RAY_ENABLE_AUTO_CONNECT")
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        if old is None:
            os.environ.pop("RAY_ENABLE_AUTO_CONNECT", None)
        else:
            os.environ["RAY_ENABLE_AUTO_CONNECT"] = old


def check(where: str, record: dict | None, digest: str, force: bool) -> bool:
    """A stage's completion check in plan mode: noted; True when complete, else ``PlanStop``."""
    status = "new"
    if record is not None:
        status = "changed" if record.get("config_hash") != digest else "complete"
    if force and status == "complete":
        status = "forced"
    note = {"stage": where, "hash": digest, "status": status}
    _ACTIVE.get().append(note)
    if status == "complete":
        return True
    raise PlanStop(note)


# --- resources ---------------------------------------------------------------------------------

GROUPS = (  # (count field, CPUs per unit, GPUs per unit): how a config section asks Ray
    ("workers", "cpus_per_worker", "use_gpu"),
    ("actors", "cpus_per_actor", "gpus_per_actor"),
    ("trials", "cpus_per_trial", "gpus_per_trial"),
)


def resources(section: Any, path: str = "") -> list[str]:
    """What every (nested) section of ``section`` asks Ray for, one line each, e.g.
    ``finetune: 8 workers x 8 CPU + 1 GPU``; ``memory_mb`` where a section holds one."""
    out = []
    if isinstance(section, list):  # several sections of one stage (the pipeline's controls)
        return [line for i, s in enumerate(section) for line in resources(s, f"{path}[{i}]")]
    if not dataclasses.is_dataclass(section):
        return out
    names = {f.name for f in dataclasses.fields(section)}
    for count, cpus, gpus in GROUPS:
        if cpus not in names:
            continue
        n = getattr(section, count, None) if count in names else None
        gpu = getattr(section, gpus, 0) if gpus in names else 0
        gpu = float(gpu is True) if isinstance(gpu, bool) else float(gpu or 0)
        each = f"{getattr(section, cpus):g} CPU" + (f" + {gpu:g} GPU" if gpu else "")
        where = path or "job"
        out.append(
            f"{where}: {n} {count} x {each}"
            if n is not None
            else f"{where}: {each} per {count[:-1]}"
        )
    if "memory_mb" in names:
        out.append(f"{path or 'job'}: {section.memory_mb} MB activation buffer per worker")
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        sub = f"{path}.{f.name}" if path else f.name
        if isinstance(value, list):
            for i, v in enumerate(value):
                out += resources(v, f"{sub}[{i}]")
        else:
            out += resources(value, sub)
    return out


# --- the plan of a job ------------------------------------------------------------------------


@dataclass
class Step:
    """One line of a plan."""

    name: str
    status: str
    """skip | run | after | blocked (see the module doc)."""
    checks: list[dict] = field(default_factory=list)
    """The stage checks it made: stage folder, config hash, complete / new / changed / forced."""
    resources: list[str] = field(default_factory=list)
    why: str = ""


@dataclass
class Plan:
    steps: list[Step]

    @property
    def ok(self) -> bool:
        return all(s.status != "blocked" for s in self.steps)

    @property
    def skipped(self) -> list[str]:
        return [s.name for s in self.steps if s.status == "skip"]

    def text(self) -> str:
        lines = []
        for s in self.steps:
            lines.append(f"{s.status:<8} {s.name}" + (f": {s.why}" if s.why else ""))
            lines += [f"           {c['status']:<8} {c['stage']} ({c['hash']})" for c in s.checks]
            lines += [f"           asks {r}" for r in s.resources]
        n = {k: sum(s.status == k for s in self.steps) for k in ("skip", "run", "after", "blocked")}
        lines.append(
            f"plan: {n['skip']} complete (skipped), {n['run']} to run, {n['after']} after "
            f"earlier stages, {n['blocked']} blocked"
        )
        return "\n".join(lines)


def plan(steps: list[tuple[str, Callable[[], Any], Any]]) -> Plan:
    """Each ``(name, thunk, section)`` run in plan mode, in order; ``section`` is the config the
    stage reads (for its resources)."""
    out: list[Step] = []
    with planning():
        for name, thunk, section in steps:
            notes = _ACTIVE.get()
            start = len(notes)
            # a whole job's config (it has ``run``) names its sections itself
            asks = resources(section, "" if hasattr(section, "run") else name)
            pending = any(s.status in ("run", "after") for s in out)
            try:
                thunk()
                status, why = "skip", ""
            except Exception as exc:
                status, why = outcome(exc, pending)
            out.append(Step(name, status, notes[start:], asks, why))
    return Plan(out)


def outcome(exc: Exception, pending: bool) -> tuple[str, str]:
    """A planned step's status and reason, from what stopped it; ``pending``: an earlier step
    of the plan has work to do (so a missing input of this one may be its output)."""
    if isinstance(exc, PlanStop):
        return "run", f"starts at {exc.check['stage']} ({exc.check['status']})"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, FileNotFoundError):  # MissingInput too: a ref, file or stage not there
        return ("after" if pending else "blocked"), text or repr(exc)
    if isinstance(exc, UserError):  # a bad config or input: no earlier stage mends it
        return "blocked", text or type(exc).__name__
    if type(exc).__name__ == "RaySystemError":  # auto-connect is off: the job began with Ray
        return "run", "works inside Ray from its start: config checked, stages not"
    return "blocked", f"{type(exc).__name__}: {text}"
