"""A Ray Tune search of probe settings: which layer, pooling or template (the feature method),
inverse regularisation C and SAE top-k monitor each task best, chosen on validation data only.

Each trial is one setting, a small CPU task: on every task it fits a probe with that setting on
the fitting part of the task's training items and reports its AUROC on the validation part (the
rest of the training items). The best setting per task is the one of highest validation AUROC
(ties: the earlier in the grid); it is then refitted on the whole training part and scored once
on the task's test items, which no trial saw. The study's other probes choose C by
cross-validation instead; the table sets the two side by side.
"""

from __future__ import annotations

import dataclasses

from emergent.config import config
from emergent.runtime import drop_tune_run, set_threads, tune_grid
from emergent.stats import auroc, auroc_interval
from emergent.studies.monitor.probes import (
    fit_probe,
    fixed_probe,
    score,
    top_k_by_difference,
)


@config
class SearchConfig:
    """The Ray Tune search of the monitor job (``monitor.search``)."""

    enabled: bool = True
    """Run the search (a handful of seconds per trial on CPU)."""
    methods: list[str] = dataclasses.field(default_factory=list)
    """Feature methods searched (empty: every probe method: ``raw/<pool>``, ``raw@<L>/<pool>``
    of ``layers``, ``sae``, ``prompted/<template>``)."""
    layers: list[int] = dataclasses.field(default_factory=list)
    """Other blocks whose pooled residuals are searched too (``raw@<L>/<pool>``, read in the
    same pass as the study's block)."""
    cs: list[float] = dataclasses.field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0])
    """Inverse regularisation strengths."""
    top_k: list[int] = dataclasses.field(default_factory=lambda: [0, 16, 64])
    """SAE latents kept by class difference (0: all), for the SAE method."""
    val_share: float = 0.25
    """Share of each task's training items held out for validation."""
    cpus_per_trial: float = 0.5
    """CPUs per trial (trials run in parallel)."""

    def __post_init__(self):
        if not self.cs or any(c <= 0 for c in self.cs):
            raise ValueError(f"monitor.search.cs: positive values, got {self.cs}")
        if not 0 < self.val_share < 1:
            raise ValueError("monitor.search.val_share must be in (0, 1)")
        if any(k < 0 for k in self.top_k) or not self.top_k:
            raise ValueError("monitor.search.top_k: one or more values >= 0")


def grid(methods: list[str], cfg: SearchConfig) -> list[dict]:
    """Every setting: method x C (x top-k for the SAE)."""
    out = []
    for m in methods:
        for c in cfg.cs:
            for k in cfg.top_k if m == "sae" else [0]:
                out.append({"method": m, "c": float(c), "top_k": int(k)})
    return out


def fit_score(x_tr, y_tr, x_tests: list, c: float, top_k: int) -> list:
    """A probe at C = ``c`` on the training items (``top_k`` columns by class difference, 0:
    all), scored on each test set."""
    cols = top_k_by_difference(x_tr, y_tr, top_k)
    probe = fixed_probe(x_tr[:, cols], y_tr, c)
    return [score(probe, x[:, cols]) for x in x_tests]


def validation_auroc(setting: dict, parts: dict, feats: dict) -> dict[str, float]:
    """Validation AUROC of one setting on every task (``parts``: task -> (fit ids, fit labels,
    validation ids, validation labels))."""
    x = feats[setting["method"]]
    out = {}
    for task, (fit, y_fit, val, y_val) in parts.items():
        (s,) = fit_score(x[fit], y_fit, [x[val]], setting["c"], setting["top_k"])
        out[task] = auroc(y_val, s)
    return out


def best_settings(trials: list[dict], tasks: list[str]) -> dict[str, dict]:
    """Per task, the trial of highest validation AUROC (the first in grid order among ties)."""
    out = {}
    for task in tasks:
        i = max(range(len(trials)), key=lambda j: (trials[j][f"val/{task}"], -j))
        out[task] = trials[i]
    return out


def trial(config: dict, ctx: dict) -> None:
    import ray.tune

    set_threads(1)
    got = validation_auroc(config["setting"], ctx["parts"], ctx["feats"])
    ray.tune.report({f"val/{t}": v for t, v in got.items()})


def search(run, name: str, hash_: str, cfg: SearchConfig, parts: dict, feats: dict, force: bool):
    """All trials' settings and validation AUROCs, from a Ray Tune grid in the running Ray
    session (stored under the run's ``_ray/``, resumed if interrupted, removed when done)."""
    import ray.tune

    methods = cfg.methods or [
        k for k in feats if k.startswith(("raw/", "raw@", "prompted/")) or k == "sae"
    ]
    settings = grid(methods, cfg)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(trial, ctx={"parts": parts, "feats": feats}),
        {"cpu": cfg.cpus_per_trial},
    )
    tune_name = f"monitor-{name}-{hash_[:8]}"
    counter = ("emergent_monitor_probe_trials_total", {"study": name})
    results = tune_grid(run, tune_name, trainable, settings, force, counter)
    rows = []
    for r in results:
        if r.error is not None:
            raise RuntimeError(f"monitor {name}: trial {r.config['setting']} failed: {r.error}")
        rows.append(
            {**r.config["setting"]} | {k: v for k, v in r.metrics.items() if k.startswith("val/")}
        )
    order = {tuple(s.values()): i for i, s in enumerate(settings)}
    rows.sort(key=lambda r: order[(r["method"], r["c"], r["top_k"])])
    drop_tune_run(run, tune_name)
    return rows


def table(best: list[dict]) -> str:
    lines = [
        "| task | best setting (validation) | val AUROC | test AUROC [95%] | CV-tuned "
        "probe of that method, test |",
        "|---|---|---|---|---|",
    ]
    for r in best:
        k = f", top-{r['top_k']}" if r["top_k"] else ""
        lines.append(
            f"| {r['task']} | {r['method']}, C={r['c']:g}{k} | {r['val']:.3f} | "
            f"{r['test']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] | {r['cv_test']:.3f} |"
        )
    return "\n".join(lines)


def final(task: str, ids, y, tr, te, setting: dict, val: float, feats: dict, seed: int) -> dict:
    """The best setting refitted on the whole training part, scored on the test items, beside
    the study's CV-tuned probe of the same method."""
    x = feats[setting["method"]][ids]
    (s,) = fit_score(x[tr], y[tr], [x[te]], setting["c"], setting["top_k"])
    lo, hi = auroc_interval(y[te], s, seed=seed)
    cv = score(fit_probe(x[tr], y[tr], seed), x[te])
    return {"task": task, **setting, "val": val, "test": auroc(y[te], s), "lo": lo, "hi": hi} | {
        "cv_test": auroc(y[te], cv)
    }
