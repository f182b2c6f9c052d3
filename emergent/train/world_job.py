"""The ``world`` job: build PersonaWorld (datasets, tokenizer, pretrained + base model) into
``<run>/world/`` and measure the base model (see emergent.train.world for the outputs).

The build runs as one Ray task using all CPUs of a node, so on a cluster it lands on a
worker (a KubeRay head usually has ``num-cpus: 0``) and writes to the shared run directory.
A completed world with the same config is reused; a changed config rebuilds it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from emergent.config import RayConfig, RunConfig, config, stage_key
from emergent.runs import RunDir
from emergent.runtime import ray_session, setup_logging
from emergent.train.world import WorldConfig, build_world
from emergent.world.grammar import VERSION

log = logging.getLogger(__name__)


@config
class WorldJob:
    """Build PersonaWorld and its tiny base model."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    world: WorldConfig = dataclasses.field(default_factory=WorldConfig)


@dataclass
class WorldResult:
    path: str
    """The world stage folder."""
    skipped: bool
    """True when an identical world was already complete."""
    build_seconds: float
    """Seconds to build datasets, pretrain and instruct (excludes the base evaluation)."""
    base_eval: dict
    """Base model: misalignment and coherence per eval set."""


def world_stage(cfg: WorldJob, stage_name: str = "world"):
    """The world's stage of the run: its folder and its key (the config and grammar version)."""
    world = {**stage_key(cfg.world), "grammar_version": VERSION}
    return RunDir.from_config(cfg.run).stage(stage_name, world)


def build_stage(cfg: WorldJob, stage_name: str = "world", threads: int | None = None) -> dict:
    """Build (or reuse) the world stage; returns its completion record."""
    setup_logging()
    stage = world_stage(cfg, stage_name)
    if stage.is_complete(cfg.run.force):
        return {**stage.record, "skipped": True}
    manifest = build_world(cfg.world, stage, threads)
    rec = stage.complete(
        outputs=manifest["models"] | {"manifest": stage.uri("manifest.json")},
        metrics={"build_seconds": manifest["build_seconds"], "base_eval": manifest["base_eval"]},
    )
    return {**rec, "skipped": False}


def main(cfg: WorldJob) -> WorldResult:
    cfg = dataclasses.replace(cfg, run=cfg.run.absolute())
    stage = world_stage(cfg)
    if stage.is_complete(cfg.run.force):  # checked here first: a built world starts no Ray task
        rec = {**stage.record, "skipped": True}
    else:
        with ray_session(cfg.ray) as ray:
            # One task using the CPUs of a node (up to 8: the model is tiny): one torch loop.
            alive = [n for n in ray.nodes() if n["Alive"]]
            threads = min(8, int(max(n["Resources"].get("CPU", 1) for n in alive)))
            task = ray.remote(num_cpus=threads)(build_stage)
            env = {"env_vars": {"OMP_NUM_THREADS": str(threads)}}
            rec = ray.get(task.options(runtime_env=env).remote(cfg, "world", threads))
    stage_path = rec["outputs"]["base"].rsplit("/", 1)[0]
    result = WorldResult(
        stage_path, rec["skipped"], rec["metrics"]["build_seconds"], rec["metrics"]["base_eval"]
    )
    log.info(
        "world %s at %s (built in %.0fs)",
        "reused" if result.skipped else "built",
        stage_path,
        result.build_seconds,
    )
    return result
