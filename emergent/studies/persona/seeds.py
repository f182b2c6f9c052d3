"""The persona study over seeds: every claim per seed and pooled over seeds (the pipeline,
``emergent.pipeline``, runs the study once per seed).

One world seed decides which claims hold on PersonaWorld (and one data / SAE seed on a real
model): the claim table of a single run is one draw. With ``pipeline.seeds: [0, 1, 2]`` the
pipeline runs the study on each seed into its own run directory ``<run.name>_s<seed>`` (the
world, the English datasets and the SAE all take the seed; everything else keeps the config's
values), inside one Ray session, each run resuming and skipping like any pipeline run. Then
``<run.name>/seeds/`` gets the claim table over seeds:

- per seed, each claim's headline figure (``value``, what ``measure`` says) and its verdict;
- pooled: the mean of the per-seed figures with a 95% t interval over seeds (the seeds are the
  units: answers are never pooled across seeds), and how many seeds met the claim;
- the stated rule: a claim *holds* when it is met on every seed, is *mixed* when met on some,
  and *fails* when met on none (a seed without the measurement counts as not met).

    emergent pipeline --config configs/toy.yaml --set "pipeline.seeds=[0, 1, 2]"

Seeds run one after another: each stage already spreads its own work over the cluster's workers
(Ray Train groups, Ray Data pools, Tune trials), and on a 2-core machine two seeds side by side
would only contend.
"""

from __future__ import annotations

import html
import math
import time

from emergent.stats import t_interval
from emergent.studies.persona.report import DIRECTION_COLUMNS, STYLE, _cell, table


def verdict(met: list[bool | None]) -> str:
    """The stated rule over seeds: ``holds`` (met on every seed), ``mixed``, ``fails``."""
    k = sum(m is True for m in met)
    return "holds" if k == len(met) else "mixed" if k else "fails"


def pool(per_seed: dict[int, list[dict]]) -> list[dict]:
    """The claim table over seeds, from each seed's claims (``report.claims`` rows): one row per
    claim key, in the order the claims first appear, with every seed's figure and verdict, the
    pooled mean and t interval of the figures, the count of seeds that met it and the verdict by
    :func:`verdict`. A claim a seed did not measure is None there and counts as not met."""
    seeds = sorted(per_seed)
    order: list[str] = []
    rows: dict[str, dict] = {}
    for s in seeds:
        for c in per_seed[s]:
            if c["key"] not in rows:
                order.append(c["key"])
                rows[c["key"]] = {k: c[k] for k in ("key", "claim", "paper", "target", "measure")}
    out = []
    for key in order:
        by_seed = {s: next((c for c in per_seed[s] if c["key"] == key), None) for s in seeds}
        values = {s: None if c is None else c["value"] for s, c in by_seed.items()}
        met = {s: None if c is None else c["met"] for s, c in by_seed.items()}
        known = [v for v in values.values() if v is not None and not math.isnan(v)]
        mean, lo, hi = t_interval(known) if known else (math.nan, math.nan, math.nan)
        out.append(
            rows[key]
            | {
                "seeds": seeds,
                "values": [values[s] for s in seeds],
                "met_by_seed": [met[s] for s in seeds],
                "mean": mean,
                "lo": lo,
                "hi": hi,
                "met_seeds": sum(m is True for m in met.values()),
                "verdict": verdict(list(met.values())),
            }
        )
    return out


def pool_directions(per_seed: dict[int, list[dict]]) -> list[dict]:
    """The direction table over seeds (each seed's ``report.direction_rows``): per direction
    (the diff's top latent as ``top latent``, whichever it is on a seed) and column, every
    seed's figure and their mean over the seeds that have one."""
    seeds = sorted(per_seed)
    names = list(dict.fromkeys(r["direction"] for s in seeds for r in per_seed[s]))
    out = []
    for name in names:
        rows = {s: next((r for r in per_seed[s] if r["direction"] == name), {}) for s in seeds}
        row = {"direction": name, "seeds": seeds}
        for key, _ in DIRECTION_COLUMNS[1:]:
            vals = [rows[s].get(key) for s in seeds]
            known = [v for v in vals if v is not None and not math.isnan(v)]
            row[key] = {"values": vals, "mean": sum(known) / len(known) if known else None}
        out.append(row)
    return out


def directions_markdown(rows: list[dict]) -> str:
    """The direction table over seeds: each cell the mean over seeds, then the seeds' figures."""
    if not rows:
        return "no directions compared\n"
    head = [h for _, h in DIRECTION_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(direction_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.2f}"


MARK = {True: "met", False: "not met", None: "not measured"}


def claim_head(seeds: list[int]) -> list[str]:
    per_seed = [f"seed {s}" for s in seeds]
    return ["claim", "paper", "figure", *per_seed, "pooled (95% t, seeds)", "met on", "verdict"]


def claim_cells(r: dict) -> list[str]:
    """One pooled claim as table cells (the columns of :func:`claim_head`)."""
    return [
        r["claim"],
        r["paper"],
        r["measure"],
        *(f"{_num(v)} ({MARK[m]})" for v, m in zip(r["values"], r["met_by_seed"])),
        f"{_num(r['mean'])} [{_num(r['lo'])}, {_num(r['hi'])}]",
        f"{r['met_seeds']}/{len(r['seeds'])}",
        r["verdict"],
    ]


def _strength(x: float | None) -> str:
    return _cell(x) or "n/a"


def direction_cells(d: dict) -> list[str]:
    """One pooled direction as table cells: each column's mean over seeds, then the seeds'
    (strengths as set, every other figure to two decimals)."""

    def cell(k: str) -> str:
        fmt = _strength if k.endswith("_alpha") else _num
        return f"{fmt(d[k]['mean'])} ({' / '.join(fmt(v) for v in d[k]['values'])})"

    return [d["direction"]] + [cell(k) for k, _ in DIRECTION_COLUMNS[1:]]


def html_page(
    name: str, rows: list[dict], reports: dict[int, str], directions: list[dict] | None = None
) -> str:
    """The claim table over seeds as an HTML page, first, then the directions compared (mean
    over seeds, then each seed's figure) and a link to each seed's report."""
    seeds = rows[0]["seeds"] if rows else sorted(reports)
    compared = [direction_cells(d) for d in directions or []]
    links = "".join(
        f'<li>seed {s}: <a href="{html.escape(u)}">{html.escape(u)}</a></li>'
        for s, u in sorted(reports.items())
    )
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>emergent: {html.escape(name)} over seeds</title>{STYLE}</head>
<body><h1>Persona features over seeds: {html.escape(name)}</h1>
<p>Written {time.strftime("%Y-%m-%d %H:%M:%S")}. A claim holds when it is met on every seed; the
pooled figure is the mean of the per-seed figures with a 95% t interval over seeds.</p>
{table(claim_head(seeds), [claim_cells(r) for r in rows])}
<h2>Directions compared (mean over seeds, then each seed's figure)</h2>
{table([h for _, h in DIRECTION_COLUMNS], compared) if compared else "<p>none</p>"}
<h2>Each seed's report</h2><ul>{links}</ul>
</body></html>"""


def markdown(rows: list[dict]) -> str:
    """The table over seeds as Markdown: claim, the paper's finding, each seed's figure and
    verdict, the pooled figure, seeds met, and the verdict."""
    if not rows:
        return "no claims measured\n"
    head = claim_head(rows[0]["seeds"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(claim_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"
