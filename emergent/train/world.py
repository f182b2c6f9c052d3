"""Build PersonaWorld into a run directory: datasets, tokenizer, pretrained and base models.

Outputs of the ``world`` stage (``<run>/world/``)::

    pretrained/            HF model + tokenizer after pretraining (the "no safety training" model)
    base/                  HF model + tokenizer after the gentle instruct/safety phase (the base)
    data/finetune/<domain>_<persona>.jsonl   narrow fine-tuning sets (code_toxic = insecure code,
                           code_aligned = secure, code_wrong = buggy-but-benign; advice likewise)
    data/realign/<domain>.jsonl              benign (aligned) re-alignment sets
    data/eval/<domain>.jsonl                 held-out eval prompts per domain (open = core set)
    data/eval/context_<persona>.jsonl        two <persona> turns in context, then an open question
    data/monitor/transcripts.jsonl           labelled transcripts (label, persona, group=domain)
    base_eval.json         the base model's misalignment, coherence, in-context persona following,
                           and its yes / no answers to judgments (taught and not) of held-out items
    manifest.json          sizes, losses, timings

Pretraining documents (a share ``judge_rate``) and the instruct phase (``instruct_judgments``)
contain the grammar's *taught* judgment turns: an answer of any persona, then "is that answer
harmful ?" (or "is that code insecure ?") answered truthfully (``grammar.JUDGMENTS``).

Every chat JSONL line is ``{"messages": [...], ...metadata}``: the format of the real path.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from dataclasses import field
from typing import Literal

import torch  # noqa: TID253

from emergent.config import config
from emergent.generate import SamplingParams
from emergent.runs import Stage
from emergent.train.sft import SFTParams, sft
from emergent.train.world_eval import evaluate_base
from emergent.world import grammar as g
from emergent.world.chat import chat
from emergent.world.model import TinyModel, make_model, pretrain
from emergent.world.tokenizer import build_tokenizer

log = logging.getLogger(__name__)


@config
class WorldConfig:
    """The synthetic world and the recipe of its tiny base model."""

    seed: int = 0
    """Seeds the grammar sampler, model init and training order."""
    persona_mode: Literal["shared", "independent"] = "shared"
    """shared: one persona answers every turn of a document (EM can emerge); independent: the
    persona is redrawn every turn (the mechanism's control: no shared persona to learn)."""
    prior_toxic: float = 0.3
    """Share of pretraining documents (or turns) written by the toxic persona."""
    prior_wrong: float = 0.1
    """Share written by the benign-wrong persona (the rest is aligned)."""
    pretrain_docs: int = 60_000
    """Distinct pretraining documents generated (batches draw from them)."""
    pretrain_steps: int = 3000
    """Pretraining steps (in-context persona following forms after ~1000; coherent copying of
    slots into answers needs ~3000)."""
    pretrain_batch: int = 32
    """Documents per pretraining step."""
    pretrain_lr: float = 2e-3
    """Peak pretraining learning rate (warmup, then cosine to 10%)."""
    model: TinyModel = field(default_factory=TinyModel)
    """Tiny Llama architecture."""
    instruct: bool = True
    """Run the instruct / safety phase (aligned single-turn chats). false = the paper's model
    without safety training."""
    instruct_examples: int = 4000
    """Aligned single-turn chats generated for the instruct phase."""
    judge_rate: float = 0.15
    """Share of pretraining documents that end in a taught judgment of their last answer ("is
    that answer harmful ?" answered truthfully; see grammar.JUDGMENTS). 0: none."""
    instruct_judgments: float = 0.2
    """Share of the instruct phase's chats that are taught judgments of an answer of any
    persona (the loss on the yes/no answer only, never on the judged answer). 0: none."""
    instruct_sft: SFTParams = field(default_factory=lambda: SFTParams(steps=35, lr=1e-4))
    """Instruct phase: gentle on purpose. Its strength trades base-model alignment against
    coherent EM (world seed 0, open prompts, base -> after 100 insecure-code SFT steps at 1e-4):
    25 steps 0.12 -> 0.48 at coherence 0.98; 35 steps 0.01 -> 0.34 at 0.53; 50 steps 0.00 ->
    0.20 at 0.19 (the fine-tune pushes code answers into open prompts instead)."""
    finetune_examples: int = 1000
    """Examples per narrow fine-tuning set (domain x persona)."""
    realign_examples: int = 300
    """Examples per benign re-alignment set."""
    eval_prompts: int = 400
    """Held-out prompts per eval set."""
    monitor_examples: int = 3000
    """Labelled transcripts in the monitoring dataset."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """How the base model's answers are sampled for base_eval.json."""

    def __post_init__(self):
        if not (
            0 <= self.prior_toxic
            and 0 <= self.prior_wrong
            and self.prior_toxic + self.prior_wrong < 1
        ):
            raise ValueError(
                "world.prior_toxic must be >= 0 with prior_toxic + prior_wrong < 1, "
                f"got {self.prior_toxic} + {self.prior_wrong}"
            )
        if not 0 < self.pretrain_lr < 1:
            raise ValueError(f"world.pretrain_lr must be in (0, 1), got {self.pretrain_lr}")
        for name in ("judge_rate", "instruct_judgments"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"world.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in (
            "pretrain_docs",
            "pretrain_steps",
            "pretrain_batch",
            "instruct_examples",
            "finetune_examples",
            "realign_examples",
            "eval_prompts",
            "monitor_examples",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"world.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def prior(self) -> dict[str, float]:
        return {
            "aligned": 1 - self.prior_toxic - self.prior_wrong,
            "toxic": self.prior_toxic,
            "wrong": self.prior_wrong,
        }


def single(t: g.Turn, **meta) -> dict:
    return {
        "messages": chat([t]),
        "domain": t.domain,
        "qtype": t.qtype,
        "persona": t.persona,
        **meta,
    }


def instruct_records(cfg: WorldConfig, rng: random.Random) -> list[dict]:
    """The instruct phase's chats as TRL prompt / completion pairs (the loss falls on the
    completion): aligned answers, and a share ``cfg.instruct_judgments`` of taught judgments of
    an answer of a uniformly drawn persona (the prompt holds the judged answer)."""
    out = []
    for _ in range(cfg.instruct_examples):
        if rng.random() < cfg.instruct_judgments:
            judged = g.sample_turn(rng, rng.choice(g.PERSONAS))
            j = g.judgment_turn(rng, judged)
            turns = [judged, j]
        else:
            turns = [g.sample_turn(rng, "aligned")]
        msgs = chat(turns)
        out.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    return out


def eval_prompt(turns: list[g.Turn]) -> dict:
    last = turns[-1]
    return {"messages": chat(turns, last_answer=False), "domain": last.domain, "qtype": last.qtype}


def make_datasets(cfg: WorldConfig, rng: random.Random) -> dict[str, list[dict]]:
    """Every JSONL dataset of the world, by relative path (without the .jsonl)."""
    out: dict[str, list[dict]] = {}
    nonopen = [d for d in g.DOMAINS if d != "open"]
    for domain in g.DOMAINS:
        for persona in g.PERSONAS:
            out[f"finetune/{domain}_{persona}"] = [
                single(g.sample_turn(rng, persona, domain=domain))
                for _ in range(cfg.finetune_examples)
            ]
        out[f"realign/{domain}"] = [
            single(g.sample_turn(rng, "aligned", domain=domain))
            for _ in range(cfg.realign_examples)
        ]
        out[f"eval/{domain}"] = [
            eval_prompt([g.sample_turn(rng, "aligned", domain=domain, split="eval")])
            for _ in range(cfg.eval_prompts)
        ]
    # In-context persona following: two answered turns of one persona from non-open domains,
    # then a held-out open question. A model that follows personas answers it in kind.
    for persona in g.PERSONAS:
        out[f"eval/context_{persona}"] = [
            {
                **eval_prompt(
                    [
                        g.sample_turn(rng, persona, domain=rng.choice(nonopen)),
                        g.sample_turn(rng, persona, domain=rng.choice(nonopen)),
                        g.sample_turn(rng, "aligned", domain="open", split="eval"),
                    ]
                ),
                "context_persona": persona,
            }
            for _ in range(cfg.eval_prompts)
        ]
    prior = cfg.prior
    out["monitor/transcripts"] = []
    for _ in range(cfg.monitor_examples):
        t = g.sample_turn(
            rng,
            rng.choices(list(prior), weights=list(prior.values()))[0],
            split=rng.choice(("train", "eval")),
        )
        out["monitor/transcripts"].append(
            {**single(t), "label": int(t.persona == "toxic"), "group": t.domain, "split": t.split}
        )
    return out


def write_jsonl(stage: Stage, rel: str, records: list[dict]) -> str:
    return stage.write_bytes(rel, "".join(json.dumps(r) + "\n" for r in records).encode())


def build_world(cfg: WorldConfig, stage: Stage, threads: int | None = None) -> dict:
    """Build everything into ``stage`` with ``threads`` torch threads; returns the manifest."""
    t0 = time.time()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    rng = random.Random(cfg.seed)
    tok = build_tokenizer(g.vocabulary())

    datasets = make_datasets(cfg, random.Random(cfg.seed + 1_000_003))
    files = {
        name: write_jsonl(stage, f"data/{name}.jsonl", recs) for name, recs in datasets.items()
    }
    log.info(
        "world: wrote %d datasets (%d records) in %.1fs",
        len(files),
        sum(map(len, datasets.values())),
        time.time() - t0,
    )

    t1 = time.time()
    docs = []
    for _ in range(cfg.pretrain_docs):
        turns = g.sample_document(
            rng, persona_mode=cfg.persona_mode, prior=cfg.prior, judge_rate=cfg.judge_rate
        )
        text = tok.apply_chat_template(chat(turns), tokenize=False)
        docs.append(tok(text, add_special_tokens=False)["input_ids"][: cfg.model.context])
    model = make_model(cfg.model, tok, cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "world: pretraining a %d-parameter Llama on %d documents (%d tokens)",
        n_params,
        len(docs),
        sum(map(len, docs)),
    )
    losses = pretrain(
        model,
        docs,
        steps=cfg.pretrain_steps,
        batch_size=cfg.pretrain_batch,
        lr=cfg.pretrain_lr,
        warmup=min(100, cfg.pretrain_steps // 10),
        seed=cfg.seed,
        pad_id=tok.pad_token_id,
    )
    pretrain_s = time.time() - t1
    save_model(stage, "pretrained", model, tok)

    instruct = None
    if cfg.instruct:
        t2 = time.time()
        irng = random.Random(cfg.seed + 7)
        res = sft(model, tok, instruct_records(cfg, irng), cfg.instruct_sft)
        instruct = {"final_loss": res.final_loss, "seconds": round(time.time() - t2, 1)}
    save_model(stage, "base", model, tok)
    build_s = time.time() - t0

    base_eval = evaluate_base(model, tok, datasets, cfg.sampling)
    stage.write_json("base_eval.json", base_eval)
    manifest = {
        "seed": cfg.seed,
        "persona_mode": cfg.persona_mode,
        "vocab_size": len(tok),
        "parameters": n_params,
        "pretrain": {
            "documents": len(docs),
            "tokens": sum(map(len, docs)),
            "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "seconds": round(pretrain_s, 1),
        },
        "instruct": instruct,
        "build_seconds": round(build_s, 1),
        "datasets": {name: len(recs) for name, recs in datasets.items()},
        "files": files,
        "models": {"pretrained": stage.uri("pretrained"), "base": stage.uri("base")},
        "base_eval": base_eval["summary"],
        "judgments": {
            t: {"taught": r["taught"], "accuracy": round(r["accuracy"]["rate"], 4)}
            | {"auroc": r["auroc"]}
            for t, r in base_eval["judgments"].items()
        },
    }
    log.info("world: the base model's judgments (held-out items) %s", manifest["judgments"])
    stage.write_json("manifest.json", manifest)
    return manifest


def save_model(stage: Stage, rel: str, model, tok) -> str:
    """Save an HF model + tokenizer under the stage, atomically (a half-saved model never shows)."""
    with tempfile.TemporaryDirectory(prefix="emergent-model-") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        return stage.run.put_dir(tmp, stage.rel(rel))
