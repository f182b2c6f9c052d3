"""The ``pipeline`` job: the persona-features study end to end, as one job.

    world (or datasets) -> finetune -> evaluate -> train-sae -> diff -> controls (further fine-tunes, e.g. dose
          families, with the early-warning latent monitor) -> rl (GRPO rewarding incorrect
          answers in one domain) -> steer -> predict -> flag (the fine-tuning data scored
          before training, ranked against predict) -> realign -> report.html

Every stage is the stage's own job (``emergent.<stage>.main``) reading its section of the same
config, inside one Ray session; each stage skips itself when its outputs are complete with the
same config, so a rerun after an interruption resumes at the first unfinished stage (and an
interrupted Ray Train / Tune stage resumes from its checkpoints). The report
(``<run>/report/report.html``, self-contained with embedded plots) puts each claim of the
persona-features paper beside this run's measurement.

    emergent pipeline --config configs/toy.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m jobs.pipeline --config configs/toy.yaml
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from emergent import evaluate
from emergent.config import RayConfig, RunConfig, config
from emergent.english import job as datasets_job
from emergent.english.job import DatasetsConfig
from emergent.evaluate import EvaluateConfig
from emergent.runs import RunDir
from emergent.runtime import ray_session
from emergent.studies.monitor import study as monitor_job
from emergent.studies.monitor.study import MonitorConfig
from emergent.studies.persona import diffing, flagging, predict, realign, report, steering
from emergent.studies.persona.diffing import DiffConfig
from emergent.studies.persona.flagging import FlagConfig, FlagFamily
from emergent.studies.persona.predict import FamilyModel, PredictConfig
from emergent.studies.persona.realign import RealignConfig
from emergent.studies.persona.steering import SteerConfig
from emergent.telemetry import record
from emergent.train import finetune, rl, sae, world_job
from emergent.train.finetune import FinetuneConfig
from emergent.train.raytrain import TrainedModel
from emergent.train.rl import RLConfig
from emergent.train.sae import TrainSAEConfig
from emergent.train.world import WorldConfig

log = logging.getLogger(__name__)

STAGES = (
    "world",
    "datasets",
    "finetune",
    "evaluate",
    "train_sae",
    "diff",
    "controls",
    "rl",
    "steer",
    "predict",
    "flag",
    "realign",
    "monitor",
)
OPTIONAL = ("datasets", "monitor")
"""Stages run only when ``pipeline.stages`` names them."""


@config
class PipelineConfig:
    """What the pipeline adds to the stages' own sections."""

    controls: list[FinetuneConfig] = dataclasses.field(default_factory=list)
    """Further fine-tunes, run after the diff (so their ``monitor`` can watch its latents): dose
    families, other domains, controls; each with its own name."""
    stages: list[str] = dataclasses.field(
        default_factory=lambda: [s for s in STAGES if s not in OPTIONAL]
    )
    """Stages to run, in pipeline order (the report covers what exists). ``datasets`` writes the
    English datasets (emergent.english) for a real chat model, in place of the world;
    ``monitor`` runs the activation-monitoring study (emergent.studies.monitor) after the rest, and
    the report gains its section (as it does whenever the run holds that study)."""
    seeds: list[int] = dataclasses.field(default_factory=list)
    """Run the whole study once per seed (the world's, the English datasets' and the SAE's),
    each into run ``<run.name>_s<seed>``, then the claims per seed and pooled over seeds in
    ``<run.name>/seeds/`` (emergent.studies.persona.seeds). Empty: one run, on the config's seeds."""

    def __post_init__(self):
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"pipeline.stages: unknown {bad} (choose from {list(STAGES)})")
        if len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ValueError(f"pipeline.seeds: distinct seeds >= 0, got {self.seeds}")


@config
class PipelineJob:
    """The whole persona-features study on one run, ending in report.html."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    world: WorldConfig = dataclasses.field(default_factory=WorldConfig)
    datasets: DatasetsConfig = dataclasses.field(default_factory=DatasetsConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
    train_sae: TrainSAEConfig = dataclasses.field(default_factory=TrainSAEConfig)
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)
    diff: DiffConfig = dataclasses.field(default_factory=DiffConfig)
    steer: SteerConfig = dataclasses.field(default_factory=SteerConfig)
    predict: PredictConfig = dataclasses.field(
        default_factory=lambda: PredictConfig(
            models=[FamilyModel(f"finetune:code_dose{p:g}", "code", p) for p in (0.0, 1.0)]
        )
    )
    flag: FlagConfig = dataclasses.field(default_factory=FlagConfig)
    realign: RealignConfig = dataclasses.field(default_factory=RealignConfig)
    monitor: MonitorConfig = dataclasses.field(default_factory=MonitorConfig)
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)


@dataclass
class PipelineResult:
    report: str
    """Path of report.html."""
    seconds: dict[str, float]
    """Wall time of each stage run this time (a skipped stage takes seconds)."""
    claims: list[dict]
    skipped: list[str] = dataclasses.field(default_factory=list)
    """Stages that were already complete with the same config, so nothing in them ran."""


def seed_run(cfg, seed: int):
    """The pipeline config of one seed: its own run directory, the seed in the world, the English
    datasets and the SAE; no further seeds."""
    train_sae = dataclasses.replace(
        cfg.train_sae, sae=dataclasses.replace(cfg.train_sae.sae, seed=seed)
    )
    return dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, name=f"{cfg.run.name}_s{seed}"),
        world=dataclasses.replace(cfg.world, seed=seed),
        datasets=dataclasses.replace(cfg.datasets, seed=seed),
        train_sae=train_sae,
        pipeline=dataclasses.replace(cfg.pipeline, seeds=[]),
    )


def stage_jobs(cfg: PipelineJob) -> list[tuple[str, Callable[[], Any], Any]]:
    """The stages ``pipeline.stages`` names, in order, as (name, run it, its config section):
    the control fine-tunes one entry (``controls``: those that can share a Ray Train worker
    group train in one); with ``pipeline.seeds``, every seed's stages, named
    ``s<seed>/<stage>``."""
    if cfg.pipeline.seeds:
        return [
            (f"s{seed}/{name}", job, section)
            for seed in cfg.pipeline.seeds
            for name, job, section in stage_jobs(seed_run(cfg, seed))
        ]
    common = {"run": cfg.run, "ray": cfg.ray}
    flag = cfg.flag
    if not flag.families:  # the data this study fine-tunes on, scored before the fine-tunes
        fts = [cfg.finetune, *cfg.pipeline.controls]
        flag = dataclasses.replace(
            flag, families=[FlagFamily(f.name, f.data, f.doses) for f in fts]
        )

    def tune(ft: FinetuneConfig):
        return lambda: finetune.main(finetune.FinetuneJob(**common, finetune=ft))

    def controls():
        return finetune.train_sections(cfg.run, cfg.ray, cfg.pipeline.controls)

    jobs = {
        "world": (lambda: world_job.main(world_job.WorldJob(**common, world=cfg.world)), cfg.world),
        "datasets": (
            lambda: datasets_job.main(datasets_job.DatasetsJob(run=cfg.run, datasets=cfg.datasets)),
            cfg.datasets,
        ),
        "finetune": (tune(cfg.finetune), cfg.finetune),
        "evaluate": (
            lambda: evaluate.main(evaluate.EvaluateJob(**common, evaluate=cfg.evaluate)),
            cfg.evaluate,
        ),
        "train_sae": (
            lambda: sae.main(sae.TrainSAEJob(**common, train_sae=cfg.train_sae)),
            cfg.train_sae,
        ),
        "diff": (lambda: diffing.main(diffing.DiffJob(**common, diff=cfg.diff)), cfg.diff),
        "rl": (lambda: rl.main(rl.RLJob(**common, rl=cfg.rl)), cfg.rl),
        "steer": (lambda: steering.main(steering.SteerJob(**common, steer=cfg.steer)), cfg.steer),
        "predict": (
            lambda: predict.main(predict.PredictJob(**common, predict=cfg.predict)),
            cfg.predict,
        ),
        "flag": (lambda: flagging.main(flagging.FlagJob(**common, flag=flag)), flag),
        "realign": (
            lambda: realign.main(realign.RealignJob(**common, realign=cfg.realign)),
            cfg.realign,
        ),
        "monitor": (
            lambda: monitor_job.main(monitor_job.MonitorJob(**common, monitor=cfg.monitor)),
            cfg.monitor,
        ),
    }
    out = []
    for name in STAGES:
        if name not in cfg.pipeline.stages:
            continue
        if name == "controls":
            if cfg.pipeline.controls:  # one stage: compatible controls share a worker group
                out.append(("controls", controls, cfg.pipeline.controls))
        else:
            out.append((name, *jobs[name]))
    return out


def main(cfg: PipelineJob):
    """The study on one run (a :class:`PipelineResult`), or with ``pipeline.seeds`` on one run
    per seed (a :class:`SeedsResult`)."""
    cfg = dataclasses.replace(cfg, run=cfg.run.absolute())
    if cfg.pipeline.seeds:
        return run_seeds(cfg)
    seconds, skipped, stages = {}, [], []
    t_all = time.time()
    steps = stage_jobs(cfg)
    with ray_session(cfg.ray):
        for i, (name, job, _) in enumerate(steps, 1):
            log.info("pipeline: stage %s", name)
            t0 = time.time()
            result = job()
            reused = was_skipped(result)
            seconds[name] = round(time.time() - t0, 1)
            if reused:
                skipped.append(name)
            stages.append(
                {"stage": name, "seconds": seconds[name], "skipped": reused}
                | outside_training_loop(result)
            )
            record("emergent_pipeline_stages_done", i, run=cfg.run.name)
            log.info(
                "pipeline: stage %d/%d %s %s in %.0f s (%.0f s so far)",
                i,
                len(steps),
                name,
                "complete already, skipped" if reused else "done",
                seconds[name],
                time.time() - t_all,
            )
    seconds["total"] = round(time.time() - t_all, 1)
    run = RunDir.from_config(cfg.run)
    every = all(s["skipped"] for s in stages)
    stages.append({"stage": "total", "seconds": seconds["total"], "skipped": every})
    run.write_json("report/stages.json", stages)
    path, claims = report.write(run, cfg, stages)
    log.info("pipeline: report at %s\n%s", path, report.claims_markdown(claims))
    log.info("pipeline: %d stages skipped (complete): %s", len(skipped), ", ".join(skipped))
    return PipelineResult(path, seconds, claims, skipped)


def outside_training_loop(result) -> dict:
    """Of a stage that trained models under Ray Train this time: how many, and the seconds
    outside their training loops (worker start-up, loading, saving); {} for any other."""
    results = result if isinstance(result, list) else [result]
    models = [
        m
        for r in results
        # a family's models (an evaluation's are a dict), or an RL run's model
        for m in [*getattr(r, "models", []), getattr(r, "model", None)]
        if isinstance(m, TrainedModel) and not m.skipped and m.overhead_seconds is not None
    ]
    if not models:
        return {}
    return {
        "ray_train_models": len(models),
        "ray_train_outside_loop_seconds": round(sum(m.overhead_seconds for m in models), 1),
    }


def was_skipped(result) -> bool:
    """Whether a stage job found all its work complete: its result's ``skipped`` (a model
    family, a list of families: every model's; an RL run: its model's and its evaluation's; an
    evaluation: every model's)."""
    if isinstance(result, list):
        return all(was_skipped(r) for r in result)
    if isinstance(getattr(result, "model", None), TrainedModel):  # an RL run
        ev = getattr(result, "evaluation", None)
        return result.model.skipped and (ev is None or was_skipped(ev))
    if hasattr(result, "models") and isinstance(result.models, list):  # a trained family
        return all(m.skipped for m in result.models)
    if isinstance(getattr(result, "skipped", None), list):  # evaluate: labels reused
        return set(result.skipped) == set(result.models)
    return bool(getattr(result, "skipped", False))


@dataclass
class SeedsResult:
    table: str
    """Where the claim table over seeds is (``<run>/seeds/claims.md``)."""
    claims: list[dict]
    """The pooled rows (:func:`pool`)."""
    runs: dict[int, str]
    """Each seed's report.html."""
    skipped: dict[int, list[str]]
    """Each seed's stages that were complete already."""


def run_seeds(cfg) -> SeedsResult:
    """Run the pipeline on every seed of ``cfg.pipeline.seeds`` (one Ray session), then write
    ``<run>/seeds/{claims,directions}.{json,md}``, ``report.html`` and ``runs.json``."""
    seeds = list(cfg.pipeline.seeds)
    per_seed, reports, skipped, dirs = {}, {}, {}, {}
    with ray_session(cfg.ray):
        for i, seed in enumerate(seeds, 1):
            log.info("seeds: seed %d (%d/%d)", seed, i, len(seeds))
            result = main(seed_run(cfg, seed))
            per_seed[seed], reports[seed] = result.claims, result.report
            skipped[seed] = result.skipped
            one = seed_run(cfg, seed).run
            dirs[seed] = RunDir.from_config(one).read_json("report/directions.json")
    rows = seeds.pool(per_seed)
    run = RunDir.from_config(cfg.run.absolute())
    run.write_json("seeds/claims.json", rows)
    run.write_json("seeds/runs.json", {str(s): r for s, r in reports.items()})
    table = seeds.markdown(rows)
    run.write_text("seeds/claims.md", table)
    directions = seeds.pool_directions(dirs)
    run.write_json("seeds/directions.json", directions)
    run.write_text("seeds/directions.md", seeds.directions_markdown(directions))
    run.write_text("seeds/report.html", seeds.html_page(cfg.run.name, rows, reports, directions))
    log.info("seeds: claims over seeds %s at %s\n%s", seeds, run.url("seeds/claims.md"), table)
    return SeedsResult(run.url("seeds/claims.md"), rows, reports, skipped)
