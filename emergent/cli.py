"""``emergent <job> ...``: one command per job; each is also ``python -m jobs.<job>``.

Both entrypoints parse the same config dataclass (``--config FILE --set key=value``), so a job
tried locally is submitted to a cluster unchanged::

    emergent doctor
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.doctor
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from typing import Any, TypeVar

from emergent import plan
from emergent.config import UserError, parse_command
from emergent.runtime import setup_logging

# Only jobs that exist are listed: a job appears here in the change that implements it.
JOBS: dict[str, str] = {
    "doctor": "report Ray nodes, resources, GPUs, stack versions and DeepSpeed ops of a cluster",
    "world": "build PersonaWorld: synthetic chat datasets, tokenizer, tiny pretrained + base model",
    "world-study": "measure EM in PersonaWorld: seeds x (insecure, secure, buggy, doses, variants)",
    "datasets": "write the English datasets: insecure / secure / buggy code, bad / good advice",
    "finetune": "supervised fine-tuning (TRL SFT) under Ray Train: DDP or DeepSpeed ZeRO, LoRA, doses",
    "rl": "RL (TRL GRPO) under Ray Train, rewarded for e.g. incorrect answers in one domain",
    "evaluate": "sample answers on Ray Data, judge them (rubric / LLM), misalignment with intervals",
    "harvest": "residual-stream activations of a model over a corpus on Ray Data, to Parquet shards",
    "train-sae": "sparse autoencoder (sae-lens TopK/BatchTopK/L1/JumpReLU) under Ray Train, streamed or cached",
    "diff": "model diffing: rank SAE latents by activation change after a fine-tune; persona AUROC",
    "steer": "Ray Tune search of residual-stream steering strengths (latents, directions), judged",
    "predict": "latent activation change vs misalignment across a fine-tuned family; early warning",
    "flag": "score fine-tuning data by its projection on a persona direction, before training",
    "realign": "fine-tune a misaligned model on a few benign samples; misalignment per step",
    "monitor": "activation monitoring: raw, SAE and prompted probes vs zero-shot; data efficiency, shift, cost",
    "pipeline": "the whole EM study (world .. realign) with stage skipping -> report.html",
}

T = TypeVar("T")


def run_job(
    cls: type[T],
    main: Callable[[T], Any],
    doc: str | None,
    argv: list[str] | None,
    prog: str,
    stages: Callable[[T], list] | None = None,
) -> Any:
    """Parse the job's config from the command line, run ``main(cfg)``, print its result.

    With ``--plan``, plan it instead (``emergent.plan``): ``stages(cfg)`` lists a multi-stage
    job's (name, run, config section) steps; a one-stage job is itself the step. Prints the
    plan and exits 1 when a step is blocked."""
    setup_logging()
    cfg, planning = parse_command(cls, argv, prog, doc)
    if planning:
        cfg = dataclasses.replace(cfg, run=cfg.run.absolute()) if hasattr(cfg, "run") else cfg
        steps = stages(cfg) if stages else [(prog.split()[-1], lambda: main(cfg), cfg)]
        result = plan.plan(steps)
        print(result.text())
        print(json.dumps({"job": prog, "plan": asdict(result), "ok": result.ok}, indent=2))
        if not result.ok:
            sys.exit(1)
        return result
    t0 = time.time()
    try:
        result = main(cfg)
    except Exception as exc:
        mistake = user_error(exc)
        if mistake is None:
            raise  # a bug: keep the traceback
        sys.stderr.write(f"{prog}: {mistake}\n")
        sys.exit(2)
    summary = asdict(result) if is_dataclass(result) else result
    print(
        json.dumps(
            {"job": prog, "seconds": round(time.time() - t0, 1), "result": summary},
            indent=2,
            default=str,
        )
    )
    return result


def user_error(exc: BaseException) -> str | None:
    """The one-line message of a user's mistake (``UserError``), also when it was raised inside
    a Ray task, actor or Train worker and reaches the driver wrapped; None for anything else."""
    seen = set()
    todo = [exc]
    while todo:
        exc = todo.pop(0)
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        # A RayTaskError is re-typed as an instance of its cause too, but its text is the
        # remote traceback: read the cause it keeps. Ray Train keeps per-worker errors.
        inner = [getattr(exc, "cause", None), exc.__cause__, exc.__context__]
        inner += list((getattr(exc, "worker_failures", None) or {}).values())
        if isinstance(exc, UserError) and getattr(exc, "cause", None) is None:
            text = str(exc).strip()
            return text.splitlines()[0] if text else type(exc).__name__
        todo += [e for e in inner if isinstance(e, BaseException)]
    return None


def usage() -> str:
    width = max(map(len, JOBS))
    lines = [
        "usage: emergent <job> [--config FILE ...] [--set KEY=VALUE ...] [--address ADDR]",
        "",
        "jobs:",
    ]
    lines += [f"  {name:<{width}}  {desc}" for name, desc in JOBS.items()]
    lines += [
        "",
        "`emergent <job> --help` lists the job's config keys. Every job is also",
        "`python -m jobs.<job>` (for `ray job submit`).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    job, rest = argv[0], argv[1:]
    if job not in JOBS:
        sys.exit(f"emergent: unknown job {job!r}\n\n{usage()}")
    module = importlib.import_module(f"jobs.{job.replace('-', '_')}")
    module.cli(rest, prog=f"emergent {job}")


if __name__ == "__main__":
    main()
