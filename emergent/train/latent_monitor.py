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

import copy
import dataclasses
import logging
from typing import Any

from transformers import TrainerCallback  # noqa: TID253 (the callback subclasses it)
from transformers.trainer_callback import ExportableState  # noqa: TID253

from emergent import likelihood as lk
from emergent import refs, telemetry
from emergent.config import config, to_dict
from emergent.directions import encode, residuals
from emergent.harvest import HarvestConfig
from emergent.prompts import prompt_docs

log = logging.getLogger(__name__)


@config
class LatentMonitorConfig:
    """Which SAE latents to watch during training, on which prompts, how often."""

    sae: str
    """SAE of this run (``<run>/sae/<sae>/``) or ``pretrained:<release>/<sae id>``; its layer
    is read."""
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
    pairs: list[str] = dataclasses.field(default_factory=list)
    """Pair sets of the likelihood eval measured at each point too (``core``, a file; see
    emergent.likelihood): the behaviour beside the latents, a forward pass per answer, no
    sampling and no judge (``log_odds`` in each history row: the mean log-odds per token of
    the misaligned over the aligned answers)."""

    def __post_init__(self):
        if self.every < 1 or self.top < 1 or self.max_prompts < 0:
            raise ValueError("monitor.every and top must be >= 1, max_prompts >= 0")
        if not self.latents and not self.diff:
            raise ValueError("monitor: give latents or a diff to take them from")


def watched(cfg: LatentMonitorConfig, run) -> list[int]:
    """The latents to watch (given ones, then the diff's top ones)."""
    out = list(cfg.latents)
    if cfg.diff:
        out += refs.diff(run, cfg.diff, "monitor.diff").summary["top_up"][: cfg.top]
    return list(dict.fromkeys(out))


def stage_key(cfg: LatentMonitorConfig, run) -> dict:
    """What a monitored training stage's record depends on besides its weights: the monitor's
    settings and the config hashes of the SAE and diff it reads, so retraining either one under
    the same name reruns the stage instead of keeping a report about another SAE's latents."""
    out = {"monitor": to_dict(cfg)}
    if cfg.sae.startswith(refs.PRETRAINED):
        out["monitor_sae_hash"] = refs.sae(run, cfg.sae, "monitor.sae").hash
    for kind, name in (("sae", cfg.sae), ("diff", cfg.diff)):
        if name and f"monitor_{kind}_hash" not in out:
            out[f"monitor_{kind}_hash"] = run.completed_hash(
                f"{kind}/{name}",
                f"monitor.{kind}",
                f"run `emergent {kind.replace('sae', 'train-sae')}` first",
            )
    return out


@dataclasses.dataclass
class Watch:
    """What one monitored training run measures with (the SAE, its latents, the prompts and
    pairs), and its record: start values, history and flags (JSON, as saved in a checkpoint)."""

    cfg: LatentMonitorConfig
    sae: Any
    latents: list[int]
    docs: list[dict]
    pairs: list[dict]
    hv: HarvestConfig
    tok: Any
    run_name: str
    rec: dict = dataclasses.field(
        default_factory=lambda: {"start": None, "history": [], "flags": {}}
    )


# The live watches of this process, by key. A resumed run (a Ray Train worker-group restart)
# must keep comparing against the start value from before training, and keep its history and
# flags. Trainer saves the state() of an ExportableState callback into every checkpoint's
# trainer_state.json (``stateful_callbacks``, keyed by class name), but restores it only under
# ``restore_callback_states_from_checkpoint`` (default False), and then into a *new* instance,
# ``type(cb)(**args)`` plus setattr of the saved attributes, swapped into the callback handler
# while the caller keeps the old one to ask for report(). So a callback's args are only the key
# of its watch (JSON), every instance of one run shares the watch, and the monitor also restores
# the record itself in on_train_begin from the resumed TrainerState; both paths apply the same
# JSON. The key is the run's name: the checkpoint a resumed run restores from holds that name,
# and by then the resumed run has registered its own watch under it.
_WATCHES: dict[str, Watch] = {}


def callback(cfg: LatentMonitorConfig, run, world_stage: str, tok, run_name: str):
    """An HF ``TrainerCallback`` doing the monitoring (a :class:`LatentMonitor`). Attach it on
    every rank: the forward pass then runs on all of them together (ZeRO-3 gathers its
    partitioned weights that way); only rank 0 logs. ``report()`` goes into train.json."""
    sae_ref = refs.sae(run, cfg.sae, "monitor.sae")
    watch = Watch(
        cfg=cfg,
        sae=sae_ref.load(run),
        latents=watched(cfg, run),
        docs=prompt_docs(run, cfg.prompts, world_stage, cfg.max_prompts),
        pairs=[p for spec in cfg.pairs for p in lk.load_pairs(spec)],
        hv=HarvestConfig(layer=sae_ref.layer, positions="assistant_turn", context=256),
        tok=tok,
        run_name=run_name,
    )
    _WATCHES[run_name] = watch  # a resumed run (same name) takes over its predecessor's key
    return LatentMonitor(run_name)


class LatentMonitor(TrainerCallback, ExportableState):
    """Measures the watched latents (and the pairs' log-odds) every ``cfg.every`` optimizer
    steps and before the first, into its watch's record (see :data:`_WATCHES`)."""

    def __init__(self, key: str):
        import torch.distributed as dist

        self.key = key
        self.watch = _WATCHES[key]
        self.logs = not dist.is_initialized() or dist.get_rank() == 0

    @property
    def record(self) -> dict:
        """Start values, history and flags: JSON, as saved in a checkpoint."""
        return {"latents": self.watch.latents} | copy.deepcopy(self.watch.rec)

    @record.setter
    def record(self, saved: dict) -> None:
        w = self.watch
        if saved["latents"] != w.latents:
            log.warning(
                "%s: the checkpoint's monitor watched latents %s, this one %s: not restored",
                w.run_name,
                saved["latents"],
                w.latents,
            )
            return
        # trainer_state.json is written with sorted keys: put rows and flags back in the order
        # an uninterrupted run writes them (train.json then reads the same)
        order = {str(j): i for i, j in enumerate(w.latents)}
        w.rec["start"] = saved["start"]
        w.rec["history"] = [
            {"step": r["step"]}
            | {f"latent_{j}": r[f"latent_{j}"] for j in w.latents}
            | ({"log_odds": r["log_odds"]} if "log_odds" in r else {})
            for r in saved["history"]
        ]
        w.rec["flags"] = dict(sorted(saved["flags"].items(), key=lambda kv: (kv[1], order[kv[0]])))

    def state(self) -> dict:
        return {"args": {"key": self.key}, "attributes": {"record": self.record}}

    def measure(self, step: int, model) -> None:
        import torch

        w, rec = self.watch, self.watch.rec
        was = model.training
        model.eval()
        with torch.no_grad():
            device = str(next(model.parameters()).device)
            acts, _ = residuals(model, w.tok, w.docs, w.hv, device)
            odds = lk.measure(model, w.tok, w.pairs)["log_odds"]["mean"] if w.pairs else None
        model.train(was)
        if not self.logs:
            return
        means = [float(m) for m in encode(w.sae, acts)[:, w.latents].mean(0)]
        if rec["start"] is None:
            rec["start"] = means
        row = {"step": step} | {f"latent_{j}": m for j, m in zip(w.latents, means)}
        if odds is not None:
            row["log_odds"] = odds
        rec["history"].append(row)
        log.info(
            "%s: step %d latent means %s%s",
            w.run_name,
            step,
            ", ".join(f"{j}: {m:.4f}" for j, m in zip(w.latents, means)),
            "" if odds is None else f"; likelihood log-odds {odds:+.3f}",
        )

        for j, m, s in zip(w.latents, means, rec["start"]):
            telemetry.record("emergent_latent_activation", m, run=w.run_name, latent=str(j))
            if m - s >= w.cfg.threshold and str(j) not in rec["flags"]:
                rec["flags"][str(j)] = step
                log.warning(
                    "%s: EARLY WARNING at step %d: latent %d rose %.4f -> %.4f (threshold +%.4f)",
                    w.run_name,
                    step,
                    j,
                    s,
                    m,
                    w.cfg.threshold,
                )

    def on_train_begin(self, args, state, control, model=None, **kw):
        name = type(self).__name__
        if state.global_step == 0:
            self.measure(0, model)
        elif name in state.stateful_callbacks:
            self.record = state.stateful_callbacks[name]["attributes"]["record"]
        else:
            log.warning(
                "%s: resumed at step %d from a checkpoint without the monitor's state: "
                "its start values are those of the first measurement from here",
                self.watch.run_name,
                state.global_step,
            )
        # Trainer's _save_checkpoint updates stateful_callbacks[name] in place, a KeyError when
        # the checkpoint resumed from has none (saved before the monitor was attached)
        state.stateful_callbacks.setdefault(name, self.state())

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step % self.watch.cfg.every == 0 or state.global_step == state.max_steps:
            self.measure(state.global_step, model)

    def report(self) -> dict:
        w = self.watch
        return {"latents": w.latents, "history": w.rec["history"], "flags": w.rec["flags"]}
