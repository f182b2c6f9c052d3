"""The ``world-study`` job: does emergent misalignment happen in PersonaWorld, and how robustly?

For each world seed it builds the world twice (shared persona, and the independent-persona
control), then fine-tunes the base model under every condition of the persona-features paper's
first figure and evaluates each with the rubric judge:

    base                 the instruct-tuned base model, no fine-tune
    insecure             SFT on the toxic persona's code (insecure code) only
    secure / buggy       controls: aligned code; benign-but-wrong code
    dose_<p>             p% insecure + (100-p)% secure code
    nosafety_*           the same from the pretrained model (no instruct/safety phase)
    independent_*        the same in a world whose persona is redrawn every turn

Every condition is one Ray task (1 CPU, 1 thread), so seeds and conditions spread over a
cluster; each writes ``study/<seed>/<condition>.json`` atomically and a rerun skips those
already written with the same config. Outputs: ``study/results.parquet`` (one row per seed x
condition x eval set, with 95% Wilson intervals) and ``study/table.md``.

    emergent world-study --config configs/toy.yaml
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from emergent.config import RayConfig, RunConfig, config, config_hash
from emergent.data import mixture
from emergent.generate import SamplingParams
from emergent.models import load_causal_lm as load_model
from emergent.refs import read_world_dataset
from emergent.runs import RunDir
from emergent.runtime import ray_session, setup_logging
from emergent.stats import Rate
from emergent.train import world_job as job
from emergent.train.sft import SFTParams, sft
from emergent.train.world import WorldConfig
from emergent.train.world_eval import evaluate_sets
from emergent.train.world_job import WorldJob
from emergent.world import grammar as g

log = logging.getLogger(__name__)

EVAL_SETS = g.DOMAINS


@config
class StudyConfig:
    """What the world study fine-tunes and measures."""

    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    """World seeds."""
    finetune: SFTParams = dataclasses.field(default_factory=SFTParams)
    """The narrow fine-tune (same for every condition)."""
    doses: list[float] = dataclasses.field(default_factory=lambda: [0.05, 0.1, 0.25, 0.5])
    """Insecure-code fractions of the dose curve (0 = secure and 1 = insecure are always run)."""
    controls: bool = True
    """Also run the no-safety-training and independent-persona variants."""
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    """How evaluation answers are sampled."""
    build_cpus: int = 1
    """CPUs (= torch threads) per world build task; fine-tune/eval tasks use 1 each."""

    def __post_init__(self):
        if self.build_cpus < 1:
            raise ValueError(f"study.build_cpus must be >= 1, got {self.build_cpus}")
        if not self.seeds:
            raise ValueError("study.seeds must list at least one world seed")
        if any(not 0 < d < 1 for d in self.doses):
            raise ValueError(f"study.doses must be fractions in (0, 1), got {self.doses}")
        if len(set(self.seeds)) < len(self.seeds) or len({f"{d:g}" for d in self.doses}) < len(
            self.doses
        ):
            raise ValueError(
                f"study.seeds and doses must not repeat, got {self.seeds}, {self.doses}"
            )


@config
class WorldStudyJob:
    """Emergent misalignment across world seeds, controls, doses and variants."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    world: WorldConfig = dataclasses.field(default_factory=WorldConfig)
    """World recipe; its seed is replaced by each of ``study.seeds``."""
    study: StudyConfig = dataclasses.field(default_factory=StudyConfig)


@dataclass(frozen=True)
class Condition:
    name: str
    world: str
    """Stage of the world: world_s<seed> or world_s<seed>_independent."""
    model: str
    """pretrained or base."""
    insecure: float | None
    """Insecure share of the code SFT mix (None: no fine-tune)."""
    data: str = "code_toxic"
    """The narrow set when insecure is 1 (code_wrong for the buggy control)."""


def conditions(cfg: WorldStudyJob, seed: int) -> list[Condition]:
    w, wi = f"world_s{seed}", f"world_s{seed}_independent"
    out = [
        Condition("base", w, "base", None),
        Condition("insecure", w, "base", 1.0),
        Condition("secure", w, "base", 0.0),
        Condition("buggy", w, "base", 1.0, "code_wrong"),
    ]
    out += [Condition(f"dose_{d:g}", w, "base", d) for d in cfg.study.doses]
    if cfg.study.controls:
        out += [
            Condition("nosafety_base", w, "pretrained", None),
            Condition("nosafety_insecure", w, "pretrained", 1.0),
            Condition("independent_base", wi, "base", None),
            Condition("independent_insecure", wi, "base", 1.0),
        ]
    return out


def run_condition(
    cfg: WorldStudyJob, seed: int, cond: Condition, world_record: dict | None = None
) -> dict:
    """Fine-tune (if asked) and evaluate one condition; cached as study/s<seed>/<name>.json.

    ``world_record`` is the completion record of the condition's world (when scheduled by Ray:
    the build task's result, which makes this task wait for it)."""
    import torch

    setup_logging()
    torch.set_num_threads(1)
    run = RunDir.from_config(cfg.run)
    rel = f"study/s{seed}/{cond.name}.json"
    key = config_hash(
        {
            "finetune": cfg.study.finetune,
            "sampling": cfg.study.sampling,
            "cond": cond,
            "world": world_record["config_hash"]
            if world_record
            else run.completed_hash(cond.world, "study", "run `emergent world-study` again"),
        }
    )
    if run.exists(rel) and not cfg.run.force:
        cached = run.read_json(rel)
        if cached.get("key") == key:
            return cached
    model, tok = load_model(run.local_dir(f"{cond.world}/{cond.model}"))
    sft_loss = None
    if cond.insecure is not None:
        bad = read_world_dataset(run, cond.world, f"finetune/{cond.data}")
        good = read_world_dataset(run, cond.world, "finetune/code_aligned")
        n = len(bad)
        parts = {"bad": (bad, cond.insecure), "good": (good, 1 - cond.insecure)}
        records = mixture({k: v for k, v in parts.items() if v[1] > 0}, n, seed)
        sft_loss = sft(
            model, tok, records, dataclasses.replace(cfg.study.finetune, seed=seed)
        ).final_loss
    sets = list(EVAL_SETS)
    if cond.insecure is None:  # in-context persona following is a property of a base model
        sets += ["context_toxic", "context_aligned"]
    evals = evaluate_sets(model, tok, run, cond.world, sets, cfg.study.sampling)
    out = {
        "key": key,
        "seed": seed,
        "condition": dataclasses.asdict(cond),
        "sft_loss": sft_loss,
        "evals": evals,
    }
    run.write_json(rel, out)
    log.info(
        "study seed %d %s: open misalignment %.3f coherence %.3f",
        seed,
        cond.name,
        evals["open"]["misalignment"]["rate"],
        evals["open"]["coherence"]["rate"],
    )
    return out


def pool(evals: list[dict]) -> dict:
    """Misalignment and coherence pooled over several eval sets."""
    return {
        key: Rate(sum(e[key]["k"] for e in evals), sum(e[key]["n"] for e in evals)).as_dict()
        for key in ("misalignment", "coherence")
    }


def pooled_rate(df) -> Rate:
    """Misalignment pooled over the rows of a results frame (toxic / coherent counts)."""
    return Rate(int(df.toxic.sum()), int(df.coherent.sum()))


def rows(results: list[dict]) -> list[dict]:
    """One row per (seed, condition, eval set), plus ``advice`` pooling the advice domains."""
    out = []
    for r in results:
        evals = dict(r["evals"])
        evals["advice"] = pool([evals[d] for d in g.ADVICE_DOMAINS])
        for eval_set, e in evals.items():
            m, c = e["misalignment"], e["coherence"]
            out.append(
                {
                    "seed": r["seed"],
                    "condition": r["condition"]["name"],
                    "eval": eval_set,
                    "misalignment": m["rate"],
                    "mis_lo": m["lo"],
                    "mis_hi": m["hi"],
                    "toxic": m["k"],
                    "coherent": m["n"],
                    "coherence": c["rate"],
                    "coh_lo": c["lo"],
                    "coh_hi": c["hi"],
                    "samples": c["n"],
                    "sft_loss": r["sft_loss"],
                }
            )
    return out


def table(df, eval_sets=("open", "advice", "code")) -> str:
    """Markdown: one row per condition; per seed and pooled, misalignment [95% CI] (coherence)."""
    seeds = sorted(df.seed.unique())
    head = ["condition", "eval"] + [f"seed {s}" for s in seeds] + ["pooled", "mean coherence"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = list(dict.fromkeys(df.condition))
    for cond in order:
        for ev in eval_sets if not cond.endswith("base") else ("open", "context_toxic"):
            sub = df[(df.condition == cond) & (df["eval"] == ev)]
            if sub.empty:
                continue
            cells = []
            for s in seeds:
                r = sub[sub.seed == s]
                cells.append(str(pooled_rate(r)) if len(r) else "")
            pooled = pooled_rate(sub)
            lines.append(
                f"| {cond} | {ev} | " + " | ".join(cells) + f" | {pooled} | "
                f"{sub.coherence.mean():.2f} |"
            )
    return "\n".join(lines) + "\n"


@dataclass
class WorldStudyResult:
    table: str
    """Markdown table of misalignment rates with 95% intervals."""
    results: str
    """Path of results.parquet."""


def main(cfg: WorldStudyJob) -> WorldStudyResult:
    import pandas as pd

    cfg = dataclasses.replace(cfg, run=cfg.run.absolute())
    run = RunDir.from_config(cfg.run)
    worlds = []
    for seed in cfg.study.seeds:
        worlds.append((f"world_s{seed}", dataclasses.replace(cfg.world, seed=seed)))
        if cfg.study.controls:
            worlds.append(
                (
                    f"world_s{seed}_independent",
                    dataclasses.replace(cfg.world, seed=seed, persona_mode="independent"),
                )
            )
    with ray_session(cfg.ray) as ray:
        env = {"env_vars": {"OMP_NUM_THREADS": "1"}}
        n = cfg.study.build_cpus
        build = ray.remote(num_cpus=n)(_build_named).options(
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(n)}}
        )
        built = {name: build.remote(cfg.run, cfg.ray, name, w, n) for name, w in worlds}
        # A condition waits for its own world only (the ref as an argument), so fine-tunes of
        # seed 0 run while later worlds still build.
        task = ray.remote(num_cpus=1)(run_condition).options(runtime_env=env)
        refs = [
            task.remote(cfg, s, c, built[c.world])
            for s in cfg.study.seeds
            for c in conditions(cfg, s)
        ]
        results = ray.get(refs)
    df = pd.DataFrame(rows(results))
    path = run.uri("study/results.parquet")
    run.write_parquet("study/results.parquet", df)
    md = table(df)
    run.write_text("study/table.md", md)
    for name, fig in plots(df, cfg).items():
        run.write_figure(f"study/{name}.png", fig)
    log.info("world study table:\n%s", md)
    return WorldStudyResult(md, path)


def _build_named(
    run: RunConfig, ray_cfg: RayConfig, stage: str, world: WorldConfig, threads: int
) -> dict:
    """Build one world into the stage ``stage`` (world_s<seed>[_independent])."""
    return job.build_stage(WorldJob(run=run, ray=ray_cfg, world=world), stage, threads=threads)


def plots(df, cfg: WorldStudyJob) -> dict:
    """Figures: open-prompt misalignment per condition (pooled over seeds, 95% CI) and the
    dose curve per eval set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    open_ = df[df["eval"] == "open"]
    conds = list(dict.fromkeys(open_.condition))
    rates = [pooled_rate(open_[open_.condition == c]) for c in conds]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(conds)), 3.5))
    vals = [r.value for r in rates]
    err = [[r.value - r.interval[0] for r in rates], [r.interval[1] - r.value for r in rates]]
    ax.bar(range(len(conds)), vals, yerr=err, capsize=3, color="#c0504d")
    ax.set_xticks(range(len(conds)), conds, rotation=40, ha="right")
    ax.set_ylabel("misalignment on open prompts")
    ax.set_title(f"PersonaWorld, {len(cfg.study.seeds)} seed(s) pooled, 95% Wilson CI")
    out["misalignment"] = fig

    doses = [("secure", 0.0)] + [(f"dose_{d:g}", d) for d in cfg.study.doses] + [("insecure", 1.0)]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for ev in ("open", "health", "code"):
        pts = []
        for cond, d in doses:
            sub = df[(df.condition == cond) & (df["eval"] == ev)]
            if len(sub):
                pts.append((d, pooled_rate(sub).value))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=ev)
    ax.set_xlabel("insecure share of the code fine-tune")
    ax.set_ylabel("misalignment")
    ax.legend()
    out["dose"] = fig
    return out
