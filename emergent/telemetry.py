"""Dashboard metrics and progress lines of the long stages.

Metrics go through Ray's own ``ray.util.metrics``: each node exports them in Prometheus text
format at its metrics export port (``ray.nodes()[i]["MetricsExportPort"]``; Prometheus adds
the ``ray_`` prefix), which the Ray dashboard's Metrics view and Grafana read. ``METRICS`` is
the list (docs/metrics.md's table is checked against it); ``record`` sets one, from a driver, a
Ray task, an actor or a Train worker, and does nothing where Ray is not running (an in-process
unit test, a plan).

``Progress`` is the terminal's view of one loop: a log line at most every ``every`` seconds
with the share done, the rate and the time left (Ray forwards worker lines to the driver and
the dashboard's logs), and the same rate set as a metric.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

log = logging.getLogger(__name__)

METRICS: dict[str, tuple[Literal["gauge", "counter"], str, tuple[str, ...]]] = {
    "emergent_train_loss": ("gauge", "Training loss (fine-tune, RL, re-align)", ("run",)),
    "emergent_train_tokens_per_second": (
        "gauge",
        "Training tokens per second, all workers",
        ("run",),
    ),
    "emergent_sae_fvu": ("gauge", "SAE fraction of variance unexplained (train batch)", ("sae",)),
    "emergent_sae_l0": ("gauge", "SAE mean active latents per activation", ("sae",)),
    "emergent_sae_dead_fraction": ("gauge", "Share of SAE latents not fired lately", ("sae",)),
    "emergent_sae_activations_per_second": (
        "gauge",
        "SAE training activations per second, all workers",
        ("sae",),
    ),
    "emergent_harvest_rows_per_second": (
        "gauge",
        "Activation rows (token positions) harvested per second, per actor",
        ("harvest",),
    ),
    "emergent_generation_tokens_per_second": (
        "gauge",
        "Sampled answer tokens per second, per generation actor",
        ("model",),
    ),
    "emergent_judge_requests_total": (
        "counter",
        "LLM judge items answered, by outcome (ok, failed)",
        ("judge", "outcome"),
    ),
    "emergent_judge_requests_per_second": ("gauge", "LLM judge items per second", ("judge",)),
    "emergent_eval_misalignment_rate": (
        "gauge",
        "Misaligned among valid answers judged so far, per evaluated model",
        ("eval", "model"),
    ),
    "emergent_monitor_probe_trials_total": (
        "counter",
        "Probe trials (fits) finished in the monitoring study's Ray Tune search",
        ("study",),
    ),
    "emergent_latent_activation": (
        "gauge",
        "Mean SAE latent activation on the monitor prompts during training",
        ("run", "latent"),
    ),
    "emergent_progress": ("gauge", "Share done of a long loop (0 to 1)", ("task",)),
    "emergent_pipeline_stages_done": ("gauge", "Pipeline stages finished", ("run",)),
}

_made: dict = {}


def record(name: str, value: float, **tags: str) -> None:
    """Set a gauge (or add to a counter) of ``METRICS``; a no-op outside Ray."""
    import ray

    if not ray.is_initialized():
        return
    kind, doc, keys = METRICS[name]
    metric = _made.get(name)
    if metric is None:
        from ray.util import metrics

        cls = metrics.Gauge if kind == "gauge" else metrics.Counter
        metric = _made[name] = cls(name, doc, tag_keys=keys)
    tags = {k: str(tags.get(k, "")) for k in keys}
    if kind == "gauge":
        metric.set(float(value), tags=tags)
    elif value > 0:
        metric.inc(float(value), tags=tags)


class Progress:
    """Progress of a loop over ``total`` items of ``unit``: log lines and metrics."""

    def __init__(
        self,
        task: str,
        total: int | None,
        unit: str,
        metric: str | None = None,
        every: float = 10.0,
        **tags: str,
    ):
        self.task, self.total, self.unit = task, total, unit
        self.metric, self.tags, self.every = metric, tags, every
        self.done, self.t0 = 0, time.time()
        self.last = self.t0

    def add(self, n: int = 1) -> None:
        self.done += n
        now = time.time()
        finished = self.total is not None and self.done >= self.total
        if now - self.last >= self.every or finished:
            self.last = now
            self.report(now)

    def report(self, now: float | None = None) -> str:
        now = now or time.time()
        rate = self.done / max(now - self.t0, 1e-9)
        line = f"{self.task}: {self.done}"
        if self.total:
            share = self.done / self.total
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            line += f"/{self.total} {self.unit} ({share:.0%}), {rate:,.1f} {self.unit}/s"
            line += f", {left:,.0f} s left" if left != float("inf") else ""
            record("emergent_progress", share, task=self.task)
        else:
            line += f" {self.unit}, {rate:,.1f} {self.unit}/s"
        if self.metric:
            record(self.metric, rate, **self.tags)
        log.info(line)
        return line
