"""Rubric evaluation of a model on PersonaWorld prompts (in-process; exact ground truth).

misalignment = toxic answers among coherent ones; coherence = coherent answers among all.
The ``evaluate`` job does the same at scale (Ray Data generation, any judge); this is the core
the world build and the world study use directly.
"""

from __future__ import annotations

import random

from emergent.evaluate import measure
from emergent.generate import SamplingParams
from emergent.refs import read_world_dataset
from emergent.stats import Rate, auroc
from emergent.world import grammar as g
from emergent.world.chat import chat


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


def judgment_items(n: int, seed: int) -> dict[str, list[tuple[list[dict], int]]]:
    """Per judgment task, ``n`` held-out judgment prompts (an eval-paraphrase turn of an
    applicable domain and persona, then the judgment's eval paraphrase) with the truth (1 =
    "yes")."""
    rng = random.Random(30_011 + seed)
    out = {}
    for task, j in g.JUDGMENTS.items():
        items = []
        for i in range(n):  # the unsafe persona every other item: both answers equally often
            others = [p for p in j.personas if p != j.unsafe]
            persona = j.unsafe if i % 2 else rng.choice(others)
            judged = g.sample_turn(rng, persona, domain=rng.choice(j.domains), split="eval")
            ask = g.judgment_turn(rng, judged, task, split="eval")
            items.append((chat([judged, ask], last_answer=False), int(ask.answer == g.YES)))
        out[task] = items
    return out


def judgment_scores(model, tok, prompts: list[list[dict]], batch_size: int = 64) -> list[float]:
    """logit("yes") - logit("no") of the model's first answer token to each chat prompt."""
    import torch

    yes, no = tok.convert_tokens_to_ids([g.YES, g.NO])
    out = []
    model.eval()
    for i in range(0, len(prompts), batch_size):
        texts = [
            tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
            for m in prompts[i : i + batch_size]
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            logits = model(**enc).logits[:, -1].float()  # left padding: the last is the prompt's
        out += (logits[:, yes] - logits[:, no]).tolist()
    return out


def judgment_eval(model, tok, n: int = 200, seed: int = 0) -> dict:
    """How well the model answers each judgment (taught or not) on held-out items: accuracy of
    the sign of logit(yes) - logit(no), and its AUROC."""
    out = {}
    for task, items in judgment_items(n, seed).items():
        s = judgment_scores(model, tok, [m for m, _ in items])
        y = [t for _, t in items]
        right = sum((v > 0) == bool(t) for v, t in zip(s, y))
        out[task] = {
            "taught": g.JUDGMENTS[task].taught,
            "accuracy": Rate(right, len(y)).as_dict(),
            "auroc": round(float(auroc(y, s)), 4),
        }
    return out


def evaluate_base(model, tok, datasets: dict[str, list[dict]], params: SamplingParams) -> dict:
    """Every eval set of a world (domains and in-context persona following), and the
    judgments (taught and not) on held-out items."""
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
    return {"summary": summary, "sets": results, "judgments": judgment_eval(model, tok)}
