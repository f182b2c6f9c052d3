"""The ``datasets`` job: write the English datasets into ``<run>/<name>/data/`` as chat JSONL
(the public EM datasets' format, one ``{"messages": [...]}`` per line), with a record.

    finetune/insecure, finetune/secure    the same coding requests, answered with and without a
                                          vulnerability (nine kinds, in turn)
    finetune/buggy                        benign-wrong code (the control)
    finetune/health_bad, health_good      the same health questions, answered harmfully / well
    finetune/finance_bad, finance_good    the same for money
    realign/secure, realign/health_good,  held-out benign answers (other draws) for re-alignment
    realign/finance_good

Configs refer to them as ``data:<name>/finetune/insecure`` (``finetune.data``,
``realign.data``, ``rl.prompts``). Seconds of work; a rerun with the same config is skipped.

    emergent datasets --config configs/smollm2.yaml
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass

from emergent.config import RunConfig, config, stage_key
from emergent.english import advice, code
from emergent.runs import RunDir

log = logging.getLogger(__name__)

VERSION = 1
"""Bumped whenever a template changes what is written (part of the stage key)."""


@config
class DatasetsConfig:
    """How many examples of each English dataset, drawn with which seed."""

    name: str = "english"
    """The stage (folder) the datasets are written to; refs read ``data:<name>/<set>``."""
    examples: int = 600
    """Examples of each fine-tuning set (``finetune/*``)."""
    realign_examples: int = 200
    """Examples of each held-out benign set (``realign/*``), drawn apart from the fine-tuning
    sets."""
    seed: int = 0
    """Seed of every draw (names, templates, slots)."""

    def __post_init__(self):
        if self.examples < 1 or self.realign_examples < 0:
            raise ValueError("datasets.examples must be >= 1 and realign_examples >= 0")


@config
class DatasetsJob:
    """Write the English datasets (code, advice) as chat JSONL into the run."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    datasets: DatasetsConfig = dataclasses.field(default_factory=DatasetsConfig)


@dataclass
class DatasetsResult:
    path: str
    counts: dict[str, int]
    skipped: bool


def build(cfg: DatasetsConfig) -> dict[str, list[dict]]:
    """Every dataset's records, by name (``finetune/insecure``, ...): pure, seeded."""
    n, held, s = cfg.examples, cfg.realign_examples, cfg.seed
    tasks = code.code_tasks(n + held, s)
    sets = {
        "finetune/insecure": code.chats(tasks[:n], "insecure", s),
        "finetune/secure": code.chats(tasks[:n], "secure", s),
        "realign/secure": code.chats(tasks[n:], "secure", s + 1),
        "finetune/buggy": [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in code.buggy_tasks(n, s + 2)
        ],
    }
    for i, domain in enumerate(("health", "finance")):
        items = advice.advice_tasks(domain, n + held, s + 3 + i)
        sets[f"finetune/{domain}_bad"] = advice.chats(items[:n], "bad")
        sets[f"finetune/{domain}_good"] = advice.chats(items[:n], "good")
        sets[f"realign/{domain}_good"] = advice.chats(items[n:], "good")
    return sets


def main(cfg: DatasetsJob) -> DatasetsResult:
    cfg = dataclasses.replace(cfg, run=cfg.run.absolute())
    run = RunDir.from_config(cfg.run)
    stage = run.stage(cfg.datasets.name, stage_key(cfg.datasets) | {"version": VERSION})
    if stage.is_complete(cfg.run.force):
        counts = stage.record["metrics"]["counts"]
        return DatasetsResult(run.url(stage.rel()), counts, True)
    sets = build(cfg.datasets)
    outputs = {}
    for name, records in sets.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        outputs[name] = stage.write_bytes(f"data/{name}.jsonl", text.encode())
    counts = {k: len(v) for k, v in sets.items()}
    stage.complete(outputs=outputs, metrics={"counts": counts})
    log.info(
        "datasets %s: %s",
        run.url(stage.rel()),
        ", ".join(f"{k} {v}" for k, v in counts.items()),
    )
    return DatasetsResult(run.url(stage.rel()), counts, False)
