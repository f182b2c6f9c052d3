"""The ``realign`` job: fine-tune an emergently misaligned model on a few benign samples and
watch misalignment fall, step by step.

The persona-features paper restored alignment with ~120-200 benign samples. For each benign
dataset (same domain as the bad data, or another one) this job runs a short SFT of the
misaligned model on ``examples`` samples and, every ``eval_every`` steps (and before the first),
judges answers on each prompt set: the broad one (open questions) and a narrow one (the bad
domain, e.g. code), so the curve shows whether the broad persona resets and whether the narrow
behaviour stays. The base model is measured on the same prompts: the level to return to.

Each dataset is one Ray task (in-process TRL SFT with an evaluation callback; a GPU per task on
clusters). Outputs in ``<run>/realign/<name>/``: ``curve.parquet`` (data x step x prompt set:
misalignment with 95% CI, coherence, samples seen), ``realign.png``, ``summary.json``.

    emergent realign --config configs/toy.yaml
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import ClassVar

from emergent import refs
from emergent.config import RayConfig, RunConfig, config, stage_key
from emergent.evaluate import Judged, parse_model
from emergent.models import load_causal_lm
from emergent.runs import RunDir
from emergent.runtime import ray_session, set_threads, setup_logging
from emergent.train.raytrain import DataSource, load_source
from emergent.train.sft import SFTParams, sft

log = logging.getLogger(__name__)


@config
class RealignConfig(Judged):
    """Which misaligned model, which benign data, how long, and how it is measured (sampling and
    judge: see Judged; the same seed at every point)."""

    name: str = "insecure"
    """Outputs go to ``<run>/realign/<name>/``."""
    model: str = "finetune:code_dose1"
    """The misaligned model to re-align (a model ref)."""
    base: str = "world:base"
    """The model before the bad fine-tune: the misalignment level to get back to."""
    data: list[DataSource] = dataclasses.field(
        default_factory=lambda: [
            DataSource("world:realign/code"),
            DataSource("world:realign/health"),
        ]
    )
    """Benign datasets, one curve each (same domain as the bad data, and another)."""
    examples: int = 100
    """Benign samples drawn from each dataset (the first ones; epochs repeat them)."""
    sft: SFTParams = dataclasses.field(
        default_factory=lambda: SFTParams(steps=30, batch_size=10, lr=1e-4)
    )
    """The re-alignment fine-tune (steps x batch_size = samples seen)."""
    eval_every: int = 5
    """Measure every this many steps (and at step 0)."""
    prompts: list[str] = dataclasses.field(
        default_factory=lambda: ["world:eval/open", "world:eval/code"]
    )
    """Prompt sets measured at each point: the first is the broad one the summary reports
    (under ``metric: likelihood``, the pair sets of ``pairs`` instead, the first the broad one)."""
    max_prompts: int = 200
    """At most this many prompts per set (0 = all)."""
    gpus: float = 0.0
    """GPUs per re-alignment task."""

    OPERATIONAL: ClassVar[tuple[str, ...]] = ("gpus",)

    def __post_init__(self):
        super().__post_init__()
        if not self.data:
            raise ValueError("realign.data must not be empty")
        if self.examples < 1 or self.eval_every < 1:
            raise ValueError("realign.examples and eval_every must be >= 1")


@config
class RealignJob:
    """Re-align a misaligned model with a few benign samples; misalignment vs steps."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    realign: RealignConfig = dataclasses.field(default_factory=RealignConfig)


@dataclass
class RealignResult:
    path: str
    summary: dict
    skipped: bool


def label_of(src: DataSource) -> str:
    return src.path.rsplit("/", 1)[-1].removesuffix(".jsonl")


def points(model, tok, sets: dict[str, list[dict]], cfg: RealignConfig, cache) -> list[dict]:
    """One measurement per prompt set of the model as it is now."""
    rows = []
    for name, prompts in sets.items():
        m = cfg.measure(model, tok, prompts, cache)
        mis, coh = m["misalignment"], m["coherence"]
        rows.append(
            {
                "set": name,
                "misalignment": mis["rate"],
                "lo": mis["lo"],
                "hi": mis["hi"],
                "valid": mis["n"],
                "coherence": coh["rate"],
            }
        )
    return rows


def curve(run_cfg: RunConfig, cfg: RealignConfig, src: DataSource, source, cache) -> list[dict]:
    """Re-align on one dataset (a Ray task): the measured points, step by step."""
    import torch
    from transformers import TrainerCallback

    setup_logging()
    set_threads(1)
    run = RunDir.from_config(run_cfg)
    device = "cuda" if cfg.gpus > 0 and torch.cuda.is_available() else "cpu"
    records, _ = load_source(run, src, cfg.world_stage)
    records = records[: cfg.examples]
    sets = cfg.measure_sets(run)
    model, tok = load_causal_lm(source.local(), device)
    label = label_of(src)
    out: list[dict] = []

    def record(step: int, m) -> None:
        was = m.training
        m.eval()
        for p in points(m, tok, sets, cfg, cache):
            out.append(
                {"data": label, "step": step, "samples_seen": step * cfg.sft.batch_size, **p}
            )
        m.train(was)
        first = out[-len(sets)]
        log.info(
            "realign %s on %s: step %d, %s misalignment %.3f (coherence %.2f)",
            cfg.name,
            label,
            step,
            first["set"],
            first["misalignment"],
            first["coherence"],
        )

    class Every(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % cfg.eval_every == 0 or state.global_step == state.max_steps:
                record(state.global_step, model)

    record(0, model)
    sft(model, tok, records, cfg.sft, callbacks=[Every()], use_cpu=device == "cpu")
    return out


def summarize(df, base: list[dict], examples: int) -> dict:
    """Per dataset: start, end, and the first step at which the broad set's misalignment is back
    within the base model's 95% interval (at most its upper bound)."""
    broad = base[0]["set"]
    base_by_set = {b["set"]: b for b in base}
    out = {"broad_set": broad, "base": base_by_set, "examples": examples, "data": {}}
    for data, g in df.groupby("data", sort=False):
        b = g[g["set"] == broad].sort_values("step")
        back = b[b["misalignment"] <= base_by_set[broad]["hi"]]
        after = back[back["step"] > 0]
        last = g[g["step"] == g["step"].max()]
        out["data"][data] = {
            "start": float(b["misalignment"].iloc[0]),
            "end": float(b["misalignment"].iloc[-1]),
            "first_step_at_base": int(after["step"].iloc[0]) if len(after) else None,
            "samples_seen_at_base": int(after["samples_seen"].iloc[0]) if len(after) else None,
            "end_by_set": {r["set"]: float(r["misalignment"]) for _, r in last.iterrows()},
            "end_coherence": {r["set"]: float(r["coherence"]) for _, r in last.iterrows()},
        }
    return out


def plot(df, base: list[dict], cfg: RealignConfig | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(df["set"]))
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.2), squeeze=False)
    for ax, s in zip(axes[0], sets):
        for i, (data, g) in enumerate(df[df["set"] == s].groupby("data", sort=False)):
            g = g.sort_values("step")
            ax.plot(g["samples_seen"], g["misalignment"], "o-", color=f"C{i}", label=f"on {data}")
            ax.fill_between(g["samples_seen"], g["lo"], g["hi"], color=f"C{i}", alpha=0.15)
        b = next((x for x in base if x["set"] == s), None)
        if b:
            ax.axhline(b["misalignment"], color="grey", ls="--", lw=1, label="base model")
        likelihood = cfg is not None and cfg.likelihood
        ax.set_title(f"{s} {'pairs' if likelihood else 'prompts'}", fontsize=9)
        ax.set_xlabel("benign samples seen")
        if not likelihood:
            ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel(f"{cfg.metric_label if cfg else 'misalignment'} (95% CI)", fontsize=7)
    axes[0][-1].legend(fontsize=7)
    return fig


def main(cfg: RealignJob) -> RealignResult:
    import pandas as pd

    cfg = dataclasses.replace(cfg, run=cfg.run.absolute())
    ra = cfg.realign
    run = RunDir.from_config(cfg.run)
    source = refs.model(cfg.run, parse_model(ra.model)[1], ra.world_stage, "realign.model")
    base_source = refs.model(cfg.run, parse_model(ra.base)[1], ra.world_stage, "realign.base")
    key = stage_key(ra) | {"model": source.identity, "base_model": base_source.identity}
    key["items"] = ra.items_hash(run)
    stage = run.stage(f"realign/{ra.name}", key)
    if stage.is_complete(cfg.run.force):
        return RealignResult(stage.uri(), run.read_json(stage.rel("summary.json")), True)
    cache = run.uri("evaluate/_judge_cache") if run.is_local else None

    def base_points():
        setup_logging()
        set_threads(1)
        model, tok = load_causal_lm(base_source.local())
        return points(model, tok, ra.measure_sets(run), ra, cache)

    with ray_session(cfg.ray) as ray:
        opts = {"num_cpus": 1, "num_gpus": ra.gpus or None}
        base_ref = ray.remote(**opts)(base_points).remote()
        task = ray.remote(**opts)(curve)
        pending = [task.remote(cfg.run, ra, src, source, cache) for src in ra.data]
        base = ray.get(base_ref)
        rows = [r for ref in pending for r in ray.get(ref)]
    df = pd.DataFrame(rows)
    summary = summarize(df, base, ra.examples) | {"metric": ra.metric}
    run.write_parquet(stage.rel("curve.parquet"), df)
    run.write_figure(stage.rel("realign.png"), plot(df, base, ra))
    stage.write_json("summary.json", summary)
    stage.complete(
        outputs={
            "curve": stage.uri("curve.parquet"),
            "plot": stage.uri("realign.png"),
            "summary": stage.uri("summary.json"),
        },
        inputs={"model": source.identity, "base": base_source.identity},
    )
    log.info("realign %s: %s", ra.name, summary["data"])
    return RealignResult(stage.uri(), summary, False)
