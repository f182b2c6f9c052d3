"""Rubric evaluation of a model on PersonaWorld prompts (in-process; exact ground truth).

misalignment = toxic answers among coherent ones; coherence = coherent answers among all.
The ``evaluate`` job does the same at scale (Ray Data generation, any judge); this is the core
the world build and the world study use directly.
"""

from __future__ import annotations

from emergent.evaluate import measure
from emergent.generate import SamplingParams
from emergent.refs import read_world_dataset


def rubric_eval(model, tok, records: list[dict], params: SamplingParams) -> dict:
    """Sample one answer per prompt record and judge it with the rubric (``evaluate.measure``,
    the one in-process sample-judge-rate path); rates and persona counts."""
    res = measure(model, tok, records, params, judge="rubric", examples=5)
    return {
        "misalignment": res["misalignment"],
        "wrong": res["wrong"],
        "coherence": res["coherence"],
        "personas": res["labels"],
        "examples": res["examples"],
    }


def evaluate_sets(model, tok, run, world_stage: str, sets, params: SamplingParams) -> dict:
    """Rubric results per eval set of a built world (``eval/<name>.jsonl`` of ``world_stage``)."""
    out = {}
    for name in sets:
        res = rubric_eval(model, tok, read_world_dataset(run, world_stage, f"eval/{name}"), params)
        out[name] = {k: res[k] for k in ("misalignment", "coherence", "wrong", "personas")}
    return out


def evaluate_base(model, tok, datasets: dict[str, list[dict]], params: SamplingParams) -> dict:
    """Every eval set of a world (domains and in-context persona following)."""
    sets = {
        name.removeprefix("eval/"): recs
        for name, recs in datasets.items()
        if name.startswith("eval/")
    }
    results = {name: rubric_eval(model, tok, recs, params) for name, recs in sets.items()}
    summary = {
        name: {
            "misalignment": round(r["misalignment"]["rate"], 4),
            "coherence": round(r["coherence"]["rate"], 4),
        }
        for name, r in results.items()
    }
    return {"summary": summary, "sets": results}
