"""The ``steer`` job: does a direction control misalignment? A Ray Tune search of steering runs.

Each trial adds ``alpha`` times a direction to the residual stream after the SAE's layer while
one model answers a prompt set, then judges the answers: misalignment and coherence. The trials
are (arm x direction x alpha): an arm is a model with its strengths, typically positive alphas
on the base model (does the latent *cause* misalignment?) and negative ones on the fine-tuned
model (does removing it *remove* misalignment?). An arm's strengths are searched (``max_alpha``:
per direction, a bisection for the strongest alpha whose coherence keeps the floor, see
emergent.studies.persona.strengths), fixed (``alphas``), or both. Directions are SAE decoder columns
(given, or the top latents of a ``diff``) and any vector (``label=file.npy``, or
``label=diff:<name>`` for a diff's fine-tuning shift). Every arm also gets an unsteered trial
(alpha 0).

Steering acts at ``positions``: on PersonaWorld only the assistant-turn token steers cleanly
(adding at every position breaks coherence before it changes the persona; see
../shared/PERSONAWORLD.md and emergent.models). Settings whose coherence falls below
``coherence_floor`` are reported but never chosen; on an arm whose unsteered model is already
below the floor, a setting must keep the unsteered coherence (its 95% lower bound) instead.

Outputs in ``<run>/steer/<name>/``: ``results.parquet`` (one row per trial), ``steer.png``
(misalignment and coherence vs alpha, per arm and direction), ``summary.json`` (per arm: the
unsteered rate and the best setting above the floor).

    emergent steer --config configs/toy.yaml
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from emergent import refs
from emergent.config import RayConfig, RunConfig, config, stage_key
from emergent.directions import directions
from emergent.evaluate import Judged, parse_model
from emergent.models import POSITIONS, load_causal_lm, steering
from emergent.runs import RunDir
from emergent.runtime import drop_tune_run, ray_session, set_threads, setup_logging, tune_search
from emergent.stats import bootstrap_mean, wilson
from emergent.studies.persona.strengths import StrengthSearch

log = logging.getLogger(__name__)


@config
class SteerArm:
    """One model steered with a list of strengths."""

    label: str
    """Name of the arm in tables (e.g. ``cause``, ``remove``)."""
    model: str
    """Model ref (``world:base``, ``finetune:code_dose1``, a path or hub id)."""
    alphas: list[float] = dataclasses.field(default_factory=list)
    """Fixed strengths, tried on every direction (residual-stream units; decoder columns are
    unit norm). 0 (unsteered) is always added."""
    goal: str = "raise"
    """``raise``: the best setting maximises misalignment; ``lower``: minimises it."""
    max_alpha: float = 0.0
    """Search the strengths between 0 and this (its sign is the alphas' sign) for the strongest
    that keeps the coherence floor, per direction (see emergent.studies.persona.strengths); 0: none."""
    search_trials: int = 5
    """Trials per direction for that search (with the bound tried first, 5 bracket the
    boundary within 1/16 of ``max_alpha``)."""

    def __post_init__(self):
        if self.goal not in ("raise", "lower"):
            raise ValueError(f"steer.arms.goal must be raise or lower, got {self.goal!r}")
        if not self.alphas and not self.max_alpha:
            raise ValueError(f"steer.arms: arm {self.label!r} has no alphas and no max_alpha")
        if self.max_alpha and self.search_trials < 1:
            raise ValueError(
                f"steer.arms: arm {self.label!r}: search_trials must be >= 1 with a max_alpha"
            )


@config
class SteerConfig(Judged):
    """What to steer with, on which models, and how trials are judged (prompts, sampling and
    judge: see Judged; every trial samples with the same seed)."""

    name: str = "persona"
    """Outputs go to ``<run>/steer/<name>/``."""
    sae: str = "persona"
    """SAE whose decoder columns are the latent directions (its layer is steered): of this run,
    or ``pretrained:<release>/<sae id>``."""
    diff: str | None = "insecure"
    """Take the top ``top`` latents by activation increase of this diff (``<run>/diff/<diff>``)."""
    top: int = 2
    """How many of the diff's top latents."""
    latents: list[int] = dataclasses.field(default_factory=list)
    """Further latents, by index."""
    directions: list[str] = dataclasses.field(default_factory=list)
    """Further directions (each normalised to unit length): ``label=file.npy``,
    ``label=diff:<name>`` (that diff's fine-tuning shift), ``label=pc1:<name>`` (the first
    principal component of its per-token shifts), ``label=top:<k>`` (the diff's top k
    latents together: their decoder columns summed), ``label=persona:<model>`` (the
    model's toxic-minus-aligned context difference of means, the persona-vectors method) or
    ``label=system:<model>`` (the same from an evil minus a helpful system prompt over the
    ``extended`` open-ended questions: for chat models without a world)."""
    arms: list[SteerArm] = dataclasses.field(
        default_factory=lambda: [
            SteerArm("cause", "world:base", goal="raise", max_alpha=16.0),
            SteerArm("remove", "finetune:code_dose1", goal="lower", max_alpha=-16.0),
        ]
    )
    """Models and strengths (see SteerArm)."""
    positions: str = "assistant_turn"
    """``all``, ``assistant_turn`` or ``answer`` (see emergent.models)."""
    coherence_floor: float = 0.8
    """Settings with lower coherence are never chosen as best (on an arm already below it:
    settings less coherent than its unsteered model, see :func:`arm_floor`)."""
    cpus_per_trial: float = 1.0
    """CPUs per Tune trial."""
    gpus_per_trial: float = 0.0
    """GPUs per Tune trial."""

    OPERATIONAL: ClassVar[tuple[str, ...]] = ("cpus_per_trial", "gpus_per_trial")

    def __post_init__(self):
        super().__post_init__()
        if self.positions not in POSITIONS:
            raise ValueError(f"steer.positions must be one of {POSITIONS}, got {self.positions!r}")
        if not 0 <= self.coherence_floor <= 1:
            raise ValueError(f"steer.coherence_floor must be in [0, 1], got {self.coherence_floor}")
        if not self.arms:
            raise ValueError("steer.arms must list at least one arm")
        if self.diff is None and not self.latents and not self.directions:
            raise ValueError("steer: give a diff, latents or directions to steer along")


@config
class SteerJob:
    """Steer models along SAE latents / directions (a Ray Tune search of strengths), judged."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    steer: SteerConfig = dataclasses.field(default_factory=SteerConfig)


@dataclass
class SteerResult:
    path: str
    summary: dict
    skipped: bool


# --- pure parts ------------------------------------------------------------------------------------


def settings(arms: list[SteerArm], directions: list[str]) -> list[dict]:
    """The fixed trials: every (arm, direction, alpha) of the arms' ``alphas``, plus one
    unsteered trial per arm."""
    out = []
    for arm in arms:
        out.append({"arm": arm.label, "direction": "none", "alpha": 0.0})
        for d in directions:
            out += [{"arm": arm.label, "direction": d, "alpha": float(a)} for a in arm.alphas if a]
    return out


def lines(arms: list[SteerArm], directions: list[str]) -> list[tuple]:
    """The searched lines: (arm, direction, max_alpha, trials) for each arm with a
    ``max_alpha``."""
    return [
        (arm.label, d, arm.max_alpha, arm.search_trials)
        for arm in arms
        if arm.max_alpha
        for d in directions
    ]


def keeps_floor(rows: list[dict], setting: dict, arms: dict, floor: float, likelihood: bool):
    """Whether a completed ``setting`` kept its arm's coherence floor (:func:`arm_floor`),
    given the completed trials ``rows`` (settings with their metrics; coherence relative to
    the unsteered trial under the likelihood metric). The strength search's test."""
    import pandas as pd

    df = pd.DataFrame(rows)
    if likelihood:
        df = relative_fluency(df)
    mine = df[
        (df["arm"] == setting["arm"])
        & (df["direction"] == setting["direction"])
        & (df["alpha"] == setting["alpha"])
    ]
    return float(mine["coherence"].iloc[0]) >= arm_floor(df, arms[setting["arm"]], floor)


def arm_floor(df, arm: SteerArm, floor: float) -> float:
    """The coherence a steered setting of ``arm`` must keep: ``floor``, unless the arm's
    unsteered model is already below it (an insecure-code model whose coherence collapsed):
    then the lower end of the unsteered coherence's 95% Wilson interval, so steering may not
    make it measurably less coherent than it was, and a remove arm is not ruled out for a
    collapse that fine-tuning, not steering, caused."""
    base = df[(df["arm"] == arm.label) & (df["direction"] == "none")]
    if base.empty:
        return floor
    coherence = float(base["coherence"].iloc[0])
    if "judged" not in base or coherence >= floor:
        return floor
    n = int(base["judged"].iloc[0])
    return min(floor, wilson(round(coherence * n), n)[0])


def best(df, arm: SteerArm, floor: float, direction: str | None = None) -> dict | None:
    """The steered setting of ``arm`` (along ``direction``, or any) with the highest (raise) or
    lowest (lower) misalignment among those whose coherence keeps the arm's floor
    (:func:`arm_floor`)."""
    keep = arm_floor(df, arm, floor)
    ok = df[(df["arm"] == arm.label) & (df["direction"] != "none") & (df["coherence"] >= keep)]
    if direction is not None:
        ok = ok[ok["direction"] == direction]
    if ok.empty:
        return None
    row = ok.sort_values("misalignment", ascending=arm.goal == "lower", kind="stable").iloc[0]
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}


# --- the trial -------------------------------------------------------------------------------------


def trial(config: dict, ctx: dict) -> None:
    """One Tune trial: steer, sample, judge, report."""
    import ray.tune
    import torch

    setup_logging()
    set_threads(max(1, int(ctx["cpus"])))
    s = config["setting"]
    cfg: SteerConfig = ctx["cfg"]
    device = "cuda" if cfg.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu"
    model, tok = load_causal_lm(ctx["sources"][s["arm"]].local(), device)
    ctxm = contextlib.nullcontext()
    if s["direction"] != "none" and s["alpha"]:
        vec = torch.from_numpy(ctx["directions"][s["direction"]])
        ctxm = steering(model, ctx["layer"], vec, s["alpha"], cfg.positions)
    with ctxm:
        m = cfg.measure(model, tok, ctx["items"], ctx["cache"])
    # the likelihood eval's per-question log-odds, for changes paired over questions
    per_question = {f"q/{i}": r["log_odds"] for i, r in enumerate(m.get("rows", []))}
    ray.tune.report(
        per_question
        | {
            "misalignment": m["misalignment"]["rate"],
            "misalignment_lo": m["misalignment"]["lo"],
            "misalignment_hi": m["misalignment"]["hi"],
            "valid": m["misalignment"]["n"],
            "coherence": m["coherence"]["rate"],
            "judged": m["coherence"]["n"],
        }
    )


# --- the job ---------------------------------------------------------------------------------------


def relative_fluency(df):
    """Under the likelihood metric, coherence is the steered model's fluency relative to its
    arm's unsteered trial (capped at 1): the written answers' probability per token, as a share
    of what it was without steering. The absolute fluency stays in ``fluency``."""
    df = df.copy()
    df["fluency"] = df["coherence"]
    ref = df[df["direction"] == "none"].set_index("arm")["fluency"]
    df["coherence"] = (df["fluency"] / df["arm"].map(ref)).clip(upper=1.0)
    return df


def paired_change(df):
    """Under the likelihood metric, each trial's change of the log-odds from its arm's
    unsteered trial, question by question (columns ``q/<i>``, dropped after): ``change`` with
    a paired bootstrap interval (``change_lo``, ``change_hi``). The questions are the same in
    every trial, so this sees a shift that the spread of the questions' levels hides."""
    qcols = [c for c in df.columns if c.startswith("q/")]
    df = df.copy()
    for col in ("change", "change_lo", "change_hi"):
        df[col] = np.nan
    for _, g in df.groupby("arm"):
        ref = g[g["direction"] == "none"][qcols].iloc[0].to_numpy(float)
        for i, row in g.iterrows():
            d = row[qcols].to_numpy(float) - ref
            lo, hi = bootstrap_mean(list(d))
            df.loc[i, ["change", "change_lo", "change_hi"]] = [float(d.mean()), lo, hi]
    return df.drop(columns=qcols)


def plot(df, arms: list[SteerArm], floor: float, cfg: SteerConfig | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    fig, axes = plt.subplots(1, len(arms), figsize=(4.2 * len(arms), 3.2), squeeze=False)
    for ax, arm in zip(axes[0], arms):
        sub = df[df["arm"] == arm.label]
        base = sub[sub["direction"] == "none"]
        for i, (d, g) in enumerate(sub[sub["direction"] != "none"].groupby("direction")):
            g = pd.concat([g, base.assign(direction=d)]).sort_values("alpha")
            c = f"C{i}"
            ax.plot(g["alpha"], g["misalignment"], "o-", color=c, label=f"{d} misalignment")
            ax.plot(g["alpha"], g["coherence"], "x--", color=c, alpha=0.6, label=f"{d} coherence")
        ax.axhline(floor, color="grey", lw=0.5, ls=":")
        ax.set_title(f"{arm.label}: {arm.model}", fontsize=9)
        ax.set_xlabel("alpha")
        if cfg is None or not cfg.likelihood:
            ax.set_ylim(-0.02, 1.02)
    likelihood = cfg is not None and cfg.likelihood
    axes[0][0].set_ylabel(
        "log-odds (misalignment), relative fluency (coherence)" if likelihood else "rate"
    )
    axes[0][-1].legend(fontsize=6)
    return fig


def main(cfg: SteerJob) -> SteerResult:
    import ray.tune

    cfg = dataclasses.replace(cfg, run=cfg.run.absolute())
    st = cfg.steer
    run = RunDir.from_config(cfg.run)
    sources = {
        a.label: refs.model(cfg.run, parse_model(a.model)[1], st.world_stage, "steer.arms.model")
        for a in st.arms
    }
    dirs, sae_ref, what = directions(st, run, cfg.run)
    layer = sae_ref.layer
    for src in sources.values():
        refs.check_sae_fits(sae_ref, src, "steer.arms.model")
    items = st.measure_items(run)
    key = stage_key(st) | what | {"models": {k: s.identity for k, s in sources.items()}}
    key["items"] = st.items_hash(run)
    stage = run.stage(f"steer/{st.name}", key)
    if stage.is_complete(cfg.run.force):
        return SteerResult(stage.uri(), run.read_json(stage.rel("summary.json")), True)
    fixed, searched = settings(st.arms, list(dirs)), lines(st.arms, list(dirs))
    budget = StrengthSearch.budget(fixed, searched)
    log.info(
        "steer %s: %d fixed trials, %d searched lines, at most %d trials (%d arms x %d"
        " directions) on %d %s, layer %d, %s",
        st.name,
        len(fixed),
        len(searched),
        budget,
        len(st.arms),
        len(dirs),
        len(items),
        "pairs" if st.likelihood else "prompts",
        layer,
        st.positions,
    )
    ctx = {
        "cfg": st,
        "sources": sources,
        "directions": dirs,
        "layer": layer,
        "items": items,
        "cpus": st.cpus_per_trial,
        "cache": run.uri("evaluate/_judge_cache") if run.is_local else None,
    }
    name = f"steer-{st.name}-{stage.hash[:8]}"
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(trial, ctx=ctx),
        {"cpu": st.cpus_per_trial} | ({"gpu": st.gpus_per_trial} if st.gpus_per_trial else {}),
    )
    arms = {a.label: a for a in st.arms}
    kept = functools.partial(
        keeps_floor, arms=arms, floor=st.coherence_floor, likelihood=st.likelihood
    )
    searcher = StrengthSearch(fixed, searched, kept)
    with ray_session(cfg.ray):
        results = tune_search(run, name, trainable, searcher, budget, cfg.run.force)
    rows = []
    for r in results:
        if r.error is not None:
            raise RuntimeError(f"steer {st.name}: trial {r.config['setting']} failed: {r.error}")
        qs = {k: v for k, v in r.metrics.items() if k.startswith("q/")}
        rows.append({**r.config["setting"], **{k: r.metrics[k] for k in _METRICS}, **qs})
    import pandas as pd

    df = pd.DataFrame(rows).sort_values(["arm", "direction", "alpha"]).reset_index(drop=True)
    if st.likelihood:
        df = paired_change(relative_fluency(df))
    summary = {
        "metric": st.metric,
        "layer": layer,
        "positions": st.positions,
        "floor": st.coherence_floor,
        "directions": list(dirs),
        "arms": {},
    }
    for arm in st.arms:
        base = df[(df["arm"] == arm.label) & (df["direction"] == "none")].iloc[0]
        summary["arms"][arm.label] = {
            "model": arm.model,
            "goal": arm.goal,
            "unsteered": {k: float(base[k]) for k in _METRICS},
            "floor": arm_floor(df, arm, st.coherence_floor),
            "best": best(df, arm, st.coherence_floor),
            "best_by_direction": {d: best(df, arm, st.coherence_floor, d) for d in dirs},
        }
    run.write_parquet(stage.rel("results.parquet"), df)
    run.write_figure(stage.rel("steer.png"), plot(df, st.arms, st.coherence_floor, st))
    stage.write_json("summary.json", summary)
    stage.complete(
        outputs={
            "results": stage.uri("results.parquet"),
            "plot": stage.uri("steer.png"),
            "summary": stage.uri("summary.json"),
        },
        inputs={k: s.identity for k, s in sources.items()},
    )
    drop_tune_run(run, name)
    log.info("steer %s:\n%s", st.name, df.to_string(index=False))
    return SteerResult(stage.uri(), summary, False)


_METRICS = ("misalignment", "misalignment_lo", "misalignment_hi", "valid", "coherence", "judged")
