"""Training-time early warning: watch persona latents while a model is fine-tuned.

Every ``every`` steps, rank 0 runs the model being trained on a fixed prompt set, reads the
residual stream at the SAE's layer at the assistant-turn token, encodes it with the SAE and
logs each watched latent's mean activation: as a log line, as the Ray metric
``emergent_latent_activation`` (Ray dashboard / Prometheus, tagged by run and latent) and into
``train.json`` (``latent_monitor``). A latent whose mean rises by ``threshold`` over its value
before training is flagged (a WARNING, and the first step it crossed): the persona-features
paper's point that the latent moves before behavioural evaluations notice.

Used by ``finetune`` and ``rl`` through their ``monitor`` section::

    emergent finetune --config configs/toy.yaml --set finetune.monitor.sae=persona \
        --set finetune.monitor.diff=insecure
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from emergent.config import config

log = logging.getLogger(__name__)


@config
class LatentMonitorConfig:
    """Which SAE latents to watch during training, on which prompts, how often."""

    sae: str
    """SAE of this run (``<run>/sae/<sae>/``); its layer is read."""
    latents: list[int] = dataclasses.field(default_factory=list)
    """Latents to watch."""
    diff: str | None = None
    """Also watch the top ``top`` latents by activation increase of this diff."""
    top: int = 1
    """How many of the diff's top latents."""
    prompts: list[str] = dataclasses.field(default_factory=lambda: ["world:eval/open"])
    """The fixed prompt set (see ``emergent evaluate --help``)."""
    max_prompts: int = 200
    """At most this many prompts per set (0 = all)."""
    every: int = 10
    """Measure every this many optimizer steps (and before the first)."""
    threshold: float = 0.05
    """Flag a latent once its mean activation has risen this much over its start value."""

    def __post_init__(self):
        if self.every < 1 or self.top < 1 or self.max_prompts < 0:
            raise ValueError("monitor.every and top must be >= 1, max_prompts >= 0")
        if not self.latents and not self.diff:
            raise ValueError("monitor: give latents or a diff to take them from")


def watched(cfg: LatentMonitorConfig, run) -> list[int]:
    """The latents to watch (given ones, then the diff's top ones)."""
    out = list(cfg.latents)
    if cfg.diff:
        rel = f"diff/{cfg.diff}/summary.json"
        if not run.exists(rel):
            raise FileNotFoundError(f"monitor.diff: no diff at {run.uri(rel)}")
        out += run.read_json(rel)["top_up"][: cfg.top]
    return list(dict.fromkeys(out))


def stage_key(cfg: LatentMonitorConfig, run) -> dict:
    """What a monitored training stage's record depends on besides its weights: the monitor's
    settings and the config hashes of the SAE and diff it reads, so retraining either one under
    the same name reruns the stage instead of keeping a report about another SAE's latents."""
    from emergent.config import to_dict

    out = {"monitor": to_dict(cfg)}
    for kind, name in (("sae", cfg.sae), ("diff", cfg.diff)):
        if name:
            out[f"monitor_{kind}_hash"] = run.completed_hash(
                f"{kind}/{name}",
                f"monitor.{kind}",
                f"run `emergent {kind.replace('sae', 'train-sae')}` first",
            )
    return out


def callback(cfg: LatentMonitorConfig, run, world_stage: str, tok, run_name: str):
    """An HF ``TrainerCallback`` doing the monitoring. Attach it on every rank: the forward pass
    then runs on all of them together (ZeRO-3 gathers its partitioned weights that way); only
    rank 0 logs. ``report()`` goes into train.json."""
    from transformers import TrainerCallback

    from emergent import refs
    from emergent.harvest import HarvestConfig
    from emergent.persona.diffing import encode, residuals
    from emergent.prompts import prompt_docs
    from emergent.sae.model import load_sae

    sae_ref = refs.sae(run, cfg.sae, "monitor.sae")
    sae = load_sae(sae_ref.local(run))
    layer = sae_ref.layer
    latents = watched(cfg, run)
    docs = prompt_docs(run, cfg.prompts, world_stage, cfg.max_prompts)
    hv = HarvestConfig(layer=layer, positions="assistant_turn", context=256)

    class Monitor(TrainerCallback):
        def __init__(self):
            import torch.distributed as dist

            self.logs = not dist.is_initialized() or dist.get_rank() == 0
            self.history: list[dict] = []
            self.flags: dict[str, int] = {}
            self.start: np.ndarray | None = None
            self.gauge = None

        def measure(self, step: int, model) -> None:
            import torch

            was = model.training
            model.eval()
            with torch.no_grad():
                acts, _ = residuals(model, tok, docs, hv, str(next(model.parameters()).device))
            model.train(was)
            if not self.logs:
                return
            means = encode(sae, acts)[:, latents].mean(0)
            if self.start is None:
                self.start = means
            row = {"step": step} | {f"latent_{j}": float(m) for j, m in zip(latents, means)}
            self.history.append(row)
            log.info(
                "%s: step %d latent means %s",
                run_name,
                step,
                ", ".join(f"{j}: {m:.4f}" for j, m in zip(latents, means)),
            )
            import ray

            if self.gauge is None and ray.is_initialized():
                from ray.util.metrics import Gauge

                self.gauge = Gauge(
                    "emergent_latent_activation",
                    "Mean SAE latent activation on the monitor prompts during training",
                    tag_keys=("run", "latent"),
                )
            for j, m, s in zip(latents, means, self.start):
                if self.gauge is not None:
                    self.gauge.set(float(m), tags={"run": run_name, "latent": str(j)})
                if m - s >= cfg.threshold and str(j) not in self.flags:
                    self.flags[str(j)] = step
                    log.warning(
                        "%s: EARLY WARNING at step %d: latent %d rose %.4f -> %.4f "
                        "(threshold +%.4f)",
                        run_name,
                        step,
                        j,
                        s,
                        m,
                        cfg.threshold,
                    )

        def on_train_begin(self, args, state, control, model=None, **kw):
            if state.global_step == 0:
                self.measure(0, model)

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % cfg.every == 0 or state.global_step == state.max_steps:
                self.measure(state.global_step, model)

        def report(self) -> dict:
            return {"latents": latents, "history": self.history, "flags": self.flags}

    return Monitor()
