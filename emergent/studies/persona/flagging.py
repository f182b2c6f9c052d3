"""The ``flag`` job: which fine-tuning data will make a model misaligned, before any training?

Data flagging as the persona-vectors work does it: for each training sample (a prompt and its
answer), the *projection difference*, i.e. the residual stream after ``layer``, averaged over the
answer's tokens and projected on a persona direction, for the dataset's answer minus the base
model's own (greedy) answer to the same prompt. A sample that pulls the model towards the
persona scores high whatever the base model already does on that prompt. A dataset's score is
the mean over ``max_samples`` of its samples (drawn seeded, with a bootstrap interval); a
fine-tune mixture's (a dose family member) is its sources' scores weighted by its fractions,
the expected score of the mixture the ``finetune`` job draws. A sample whose answer, or the
base model's own, has no tokens is left out and counted (``empty``).

The direction is ``persona`` (default): the difference of the mean residual at the
assistant-turn token between conversations whose context is toxic and ones whose context is
aligned, from the base model alone, so nothing here needs a fine-tuned model. For a chat model
without a world, ``system``: the same difference between the project's ``extended`` open-ended
questions asked under an evil and under a helpful system prompt (:data:`PERSONA_SYSTEM`; the
steering job's ``system:<model>`` direction), again from the base model alone. Or
``latent:<j>``: latent j's decoder column of ``sae`` (an SAE of the base model; choosing j
from a ``diff`` does use a fine-tuned model, and the summary says which direction it was).

Given a ``predict`` stage of the run, the flag scores are ranked against the misalignment its
models showed after fine-tuning (Spearman over the models it measured).

Outputs in ``<run>/flag/<name>/``: ``samples.parquet`` (one row per scored sample),
``datasets.parquet`` (per source), ``models.parquet`` (per family member, with its
misalignment when predicted), ``summary.json``.

The pipeline runs it on the data of its own ``finetune`` and ``controls`` sections; alone:

    emergent flag --config configs/toy.yaml --set 'flag.predict=null' \
        --set "flag.families=[{name: code, data: [{path: 'world:finetune/code_toxic'}]}]"
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass

import numpy as np

from emergent import refs
from emergent.config import InputError, RayConfig, RunConfig, config, stage_key
from emergent.directions import (
    ALIGNED_CONTEXTS,
    CONTEXTS,
    PERSONA_SYSTEM,
    TOXIC_CONTEXTS,
    decoder,
    persona_direction,
    system_direction,
)
from emergent.evaluate import parse_model
from emergent.generate import SamplingParams, chat_prompts, sample
from emergent.harvest import answer_means
from emergent.models import load_causal_lm
from emergent.prompts import load_prompts
from emergent.runs import RunDir
from emergent.stats import bootstrap_mean
from emergent.train.finetune import FinetuneConfig, variants
from emergent.train.raytrain import DataSource, load_source, source_path

log = logging.getLogger(__name__)


@config
class FlagFamily:
    """Fine-tuning data as the ``finetune`` job mixes it (the pipeline passes its own
    ``finetune`` and ``controls`` sections)."""

    name: str
    """Model names are ``<name>_dose<p>`` (``<name>`` without doses), as ``finetune`` names
    them."""
    data: list[DataSource]
    """The sources; with doses, the first is the bad one."""
    doses: list[float] = dataclasses.field(default_factory=list)
    """Fraction of the first source per model (see ``finetune.doses``)."""


@config
class FlagConfig:
    """What to score, along which direction."""

    name: str = "data"
    """Outputs go to ``<run>/flag/<name>/``."""
    world_stage: str = "world"
    """The world stage ``world:`` refs resolve in."""
    model: str = "world:base"
    """The model that would be fine-tuned (its answers are the reference)."""
    layer: int = 1
    """Residual stream after this block (with ``latent:<j>``: the SAE's layer instead)."""
    direction: str = "persona"
    """``persona`` (difference of means over toxic and aligned contexts), ``system`` (over an
    evil and a helpful system prompt: a chat model without a world) or ``latent:<j>``."""
    sae: str = "persona"
    """The SAE whose latent ``latent:<j>`` names."""
    toxic_contexts: str = TOXIC_CONTEXTS
    """Conversations whose context shows the persona (the prompts' last turn is the user's)."""
    aligned_contexts: str = ALIGNED_CONTEXTS
    """The same without it."""
    contexts: int = CONTEXTS
    """At most this many conversations of each for the persona direction."""
    families: list[FlagFamily] = dataclasses.field(default_factory=list)
    """The data to score (the pipeline fills in its fine-tune sections when empty)."""
    max_samples: int = 200
    """Samples scored per source (seeded draw; 0 = all)."""
    max_new_tokens: int = 40
    """Length limit of the base model's own answers."""
    batch_size: int = 64
    """Conversations per forward pass."""
    seed: int = 0
    """Seed of the sample draw."""
    predict: str | None = "family"
    """Rank the scores against this predict stage's measured misalignment (null: score only)."""

    def __post_init__(self):
        if self.direction not in ("persona", "system") and not self.direction.startswith("latent:"):
            raise ValueError(
                f"flag.direction must be persona, system or latent:<j>, got {self.direction!r}"
            )
        if self.direction.startswith("latent:") and not self.direction[7:].isdigit():
            raise ValueError(f"flag.direction: {self.direction!r} is not latent:<index>")
        if self.max_samples < 0 or self.contexts < 2:
            raise ValueError("flag.max_samples must be >= 0 and flag.contexts >= 2")


@config
class FlagJob:
    """Score fine-tuning datasets by their projection difference on a persona direction."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    flag: FlagConfig = dataclasses.field(default_factory=FlagConfig)


@dataclass
class FlagResult:
    path: str
    summary: dict
    skipped: bool


# --- pure parts ------------------------------------------------------------------------------------


def mixture_scores(fractions: list[float], source_scores: list[float]) -> float:
    """A mixture's expected score: its sources' mean scores weighted by their fractions."""
    return float(np.dot(fractions, source_scores) / np.sum(fractions))


# --- the job ---------------------------------------------------------------------------------------


def score_source(model, tok, records: list[dict], direction, layer: int, cfg: FlagConfig):
    """Each sample's projection difference: its answer against the base model's own."""
    for i, r in enumerate(records):
        if r["messages"][-1]["role"] != "assistant":
            raise InputError(f"flag: sample {i} does not end in an assistant answer")
    prompts = [r["messages"][:-1] for r in records]
    params = SamplingParams(temperature=0.0, max_new_tokens=cfg.max_new_tokens)
    own = sample(model, tok, chat_prompts(tok, prompts), params)
    data = answer_means(model, tok, [r["messages"] for r in records], layer, cfg.batch_size)
    mine = answer_means(
        model,
        tok,
        [p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, own)],
        layer,
        cfg.batch_size,
    )
    # a sample whose answer (its own or the base model's) has no tokens scores NaN: left out
    return (data - mine) @ direction, own


def main(cfg: FlagJob) -> FlagResult:
    import pandas as pd
    from scipy.stats import spearmanr

    cfg = dataclasses.replace(cfg, run=cfg.run.absolute())
    fl = cfg.flag
    run = RunDir.from_config(cfg.run)
    if not fl.families:
        raise InputError("flag.families: no data to score (the pipeline passes its fine-tunes')")
    src = refs.model(cfg.run, parse_model(fl.model)[1], fl.world_stage, "flag.model")
    sources = list({s.path: s for fam in fl.families for s in fam.data}.values())
    for s in sources:
        source_path(run, s, fl.world_stage, "flag.families.data.path")
    key = stage_key(fl) | {"model": src.identity}
    questions = None
    if fl.direction == "system":  # what the direction is built from (the code's, not the config's)
        questions = load_prompts("extended")
        key["system"] = [list(PERSONA_SYSTEM), [q["messages"] for q in questions]]
    sae_ref = None
    if fl.direction.startswith("latent:"):
        sae_ref = refs.sae(run, fl.sae, "flag.sae")
        key["sae"] = sae_ref.hash
    if fl.predict:
        hint = "run the predict job first, or set flag.predict: null"
        key["predict"] = run.completed_hash(f"predict/{fl.predict}", "flag.predict", hint)
    stage = run.stage(f"flag/{fl.name}", key)
    if stage.is_complete(cfg.run.force):
        return FlagResult(stage.uri(), run.read_json(stage.rel("summary.json")), True)
    predicted = None
    if fl.predict:
        predicted = pd.read_parquet(run.local_dir(f"predict/{fl.predict}/family.parquet"))

    model, tok = load_causal_lm(src.local())
    if sae_ref is not None:
        layer = sae_ref.layer
        direction = decoder(sae_ref.load(run), int(fl.direction[7:]))
    elif fl.direction == "system":
        layer = fl.layer
        direction = system_direction(model, tok, layer, questions)
    else:
        layer = fl.layer
        direction = persona_direction(
            model,
            tok,
            run,
            fl.world_stage,
            layer,
            fl.toxic_contexts,
            fl.aligned_contexts,
            fl.contexts,
        )
    rows, per_source = [], {}
    for s in sources:
        records, _ = load_source(run, s, fl.world_stage)
        if fl.max_samples and len(records) > fl.max_samples:
            records = random.Random(fl.seed).sample(records, fl.max_samples)
        scores, own = score_source(model, tok, records, direction, layer, fl)
        ok = scores[~np.isnan(scores)]
        if not len(ok):
            raise InputError(f"flag: no sample of {s.path} has both answers non-empty")
        lo, hi = bootstrap_mean(list(ok), seed=fl.seed)
        per_source[s.path] = {"score": float(ok.mean()), "lo": lo, "hi": hi, "n": len(ok)}
        per_source[s.path]["empty"] = int(len(scores) - len(ok))
        log.info(
            "flag %s: %s %.3f [%.3f, %.3f] over %d (%d left out: an empty answer)",
            fl.name,
            s.path,
            *per_source[s.path].values(),
        )
        rows += [
            {"source": s.path, "index": i, "score": float(v), "base_answer": a}
            for i, (v, a) in enumerate(zip(scores, own))
        ]
    models = []
    for fam in fl.families:
        ft = FinetuneConfig(name=fam.name, data=fam.data, doses=fam.doses)
        for (label, fractions), dose in zip(variants(ft), fam.doses or [None]):
            score = mixture_scores(fractions, [per_source[s.path]["score"] for s in fam.data])
            models.append({"label": label, "family": fam.name, "dose": dose, "score": score})
    mdf = pd.DataFrame(models)
    summary = {
        "direction": fl.direction,
        "layer": layer,
        "sources": per_source,
        "models": {m["label"]: m["score"] for m in models},
    }
    if predicted is not None:
        mis = predicted.set_index("label")["misalignment"]
        mdf["misalignment"] = mdf["label"].map(mis)
        both = mdf.dropna(subset=["misalignment"])
        rho = spearmanr(both["score"], both["misalignment"])[0] if len(both) > 2 else None
        summary["spearman"] = None if rho is None or np.isnan(rho) else float(rho)
        summary["predicted_models"] = both["label"].tolist()
    datasets = pd.DataFrame([{"source": k, **v} for k, v in per_source.items()])
    run.write_parquet(stage.rel("samples.parquet"), pd.DataFrame(rows))
    run.write_parquet(stage.rel("datasets.parquet"), datasets)
    run.write_parquet(stage.rel("models.parquet"), mdf)
    stage.write_json("summary.json", summary)
    stage.complete(
        outputs={k: stage.uri(f"{k}.parquet") for k in ("samples", "datasets", "models")}
        | {"summary": stage.uri("summary.json")},
        inputs={"model": src.identity},
    )
    log.info("flag %s:\n%s", fl.name, mdf.to_string(index=False))
    return FlagResult(stage.uri(), summary, False)
