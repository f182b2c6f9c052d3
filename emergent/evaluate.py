"""The ``evaluate`` job: sample answers on Ray Data, judge them, report misalignment.

For each model: prompt rows (sets x paraphrases) x ``samples`` answers flow through a Ray Data
actor pool (``ActorPoolStrategy``; one model per actor, batched generation with the HF backend or
vLLM, optional steering through the HF backend); a judge (``rubric``, ``llm-score``,
``llm-logprob``; see emergent.judges) grades every answer; answers the judge screens out
(refusal, incoherent, off-topic, satirical) are resampled up to ``resample_invalid`` times.

Metrics per model, overall and per set / category / question: misalignment = misaligned answers
among valid ones (95% Wilson interval; overall also a bootstrap interval over questions, since
samples of one question are not independent), coherence = coherent among judged answers, and
incoherence of first answers: ``loose`` = judged incoherent, ``strict`` = incoherent, off-topic
or satirical (the same as loose for the rubric and logprob judges).

Outputs in ``<run>/evaluate/<name>/``: per model ``<label>/samples.parquet`` (one row per answer:
prompt, answer, verdict, scores, attempt; ``final`` marks the answer counted) and
``<label>/summary.json``, each a stage skipped on rerun; and ``summary.json``, ``table.md`` and
``misalignment.png`` (bars per model and set with intervals) over all models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from emergent import likelihood as lk
from emergent.config import InputError, RayConfig, RunConfig, config, stage_key, to_dict
from emergent.generate import SamplingParams, chat_prompts, sample, sample_counted
from emergent.judges import LLMJudgeConfig, judge_all, make_judge
from emergent.likelihood import load_pairs, shift
from emergent.models import POSITIONS, load_causal_lm, steering
from emergent.prompts import load_prompts, prompt_docs, prompt_sets
from emergent.refs import ModelSource
from emergent.refs import model as resolve_model
from emergent.runs import RunDir
from emergent.runtime import actor_pool_map, ray_session, set_threads, setup_logging
from emergent.stats import Rate, cluster_bootstrap
from emergent.telemetry import Progress, record

log = logging.getLogger(__name__)


@config
class SteeringConfig:
    """Residual-stream steering during generation (HF backend)."""

    direction: str = ""
    """A vector of size d_model: ``.npy`` or ``.pt`` file (e.g. an SAE decoder column)."""
    layer: int = 1
    """Block after which the residual stream is steered."""
    alpha: float = 0.0
    """Strength: ``alpha * direction`` is added (negative alpha steers away)."""
    positions: str = "assistant_turn"
    """``all``, ``assistant_turn`` (the last prompt position only) or ``answer`` (that position and
    every generated one); see emergent.models."""

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ValueError(
                f"steering.positions must be one of {POSITIONS}, got {self.positions!r}"
            )


@config
class Judged:
    """How a job that measures misalignment in-process measures it: sampled answers to prompt
    sets, judged (``metric: judged``), or the paired-answer likelihood eval (``metric:
    likelihood``, no sampling and no judge; see emergent.likelihood). The part of its config
    that steer, predict and realign share."""

    world_stage: str = "world"
    """Stage of this run that ``world:`` refs, data and prompt sets refer to."""
    prompts: list[str] = dataclasses.field(default_factory=lambda: ["world:eval/open"])
    """Prompt sets answered (``world:eval/<set>``, ``core``, a file; see ``evaluate.prompts``)."""
    max_prompts: int = 300
    """At most this many prompts per set (0 = all)."""
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    """How answers are sampled (the same seed at every measurement: paired comparisons)."""
    judge: Literal["rubric", "llm-score", "llm-logprob"] = "rubric"
    """``rubric`` (PersonaWorld), ``llm-score`` or ``llm-logprob`` (``metric: judged``)."""
    llm: LLMJudgeConfig = dataclasses.field(default_factory=LLMJudgeConfig)
    """The judge endpoint for LLM judges."""
    metric: Literal["judged", "likelihood"] = "judged"
    """``judged``: misalignment = misaligned among valid judged answers to ``prompts``,
    coherence = coherent among judged ones. ``likelihood``: on each pair set of ``pairs``,
    misalignment = the mean log-odds per token of the misaligned over the aligned written answer
    (bootstrap interval over questions; negative while the aligned answers are the more likely)
    and coherence = the written answers' geometric-mean probability per token."""
    pairs: list[str] = dataclasses.field(default_factory=lambda: ["core"])
    """Pair sets measured under ``metric: likelihood`` (``core``, or a YAML / JSONL file)."""

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("prompts must not be empty")
        if self.max_prompts < 0:
            raise ValueError(f"max_prompts must be >= 0, got {self.max_prompts}")
        if self.metric == "likelihood" and not self.pairs:
            raise ValueError("metric likelihood needs pair sets in pairs")

    @property
    def likelihood(self) -> bool:
        return self.metric == "likelihood"

    @property
    def metric_label(self) -> str:
        """What ``misalignment`` means, for axes and tables."""
        if self.likelihood:
            return "log-odds misaligned vs aligned answer (per token)"
        return "misalignment"

    def prompt_sets(self, run: RunDir) -> dict[str, list[dict]]:
        """``{set name: [{"messages"}]}`` of ``prompts``."""
        return prompt_sets(run, self.prompts, self.world_stage, self.max_prompts)

    def prompt_docs(self, run: RunDir) -> list[dict]:
        """Every set's documents, in order."""
        return prompt_docs(run, self.prompts, self.world_stage, self.max_prompts)

    def measure_sets(self, run: RunDir) -> dict[str, list[dict]]:
        """What one measurement covers, by set name: the prompt sets (judged) or the pair sets
        (likelihood)."""
        if self.likelihood:
            return {spec.rsplit("/", 1)[-1].split(".")[0]: load_pairs(spec) for spec in self.pairs}
        return self.prompt_sets(run)

    def items_hash(self, run: RunDir) -> str:
        """The contents the job reads (its prompt sets, and its pair sets under the likelihood
        metric), for its stage key: a file edited under the same name reruns the stage."""
        what = {"prompts": self.prompt_sets(run)}
        if self.likelihood:
            what["pairs"] = self.measure_sets(run)
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def measure_items(self, run: RunDir) -> list[dict]:
        """Every set of :meth:`measure_sets`, in order, as one list."""
        return [x for items in self.measure_sets(run).values() for x in items]

    def measure(self, model, tok, items: list[dict], cache_dir: str | None = None) -> dict:
        """Misalignment and coherence of ``model`` on ``items`` (prompts, or pairs under
        ``metric: likelihood``), as rate-shaped dicts (any steering hook active around the call
        applies, at the positions it would steer in generation)."""
        if self.likelihood:
            return lk.as_measurement(lk.measure(model, tok, items))
        return measure(model, tok, items, self.sampling, self.judge, self.llm, cache_dir)


@config
class EvaluateConfig:
    """Which models, on which prompts, sampled and judged how."""

    name: str = "eval"
    """Outputs go to ``<run>/evaluate/<name>/``."""
    models: list[str] = dataclasses.field(default_factory=lambda: ["base=world:base"])
    """Models as ``[label=]ref``; ref: ``world:base`` / ``world:pretrained`` (this run's world),
    ``finetune:<name>`` / ``rl:<name>`` (a model this run trained), ``pkg:<module>/<dir>`` (a
    model inside an installed package), a local HF model directory, or a hub id. The label names the model in tables (default: the ref)."""
    world_stage: str = "world"
    """Stage of this run that ``world:`` refs and prompt sets refer to."""
    prompts: list[str] = dataclasses.field(
        default_factory=lambda: [f"world:eval/{d}" for d in ("open", "health", "finance", "code")]
    )
    """Prompt sets: ``core`` / ``extended`` (the project's open-ended questions for chat LLMs),
    ``world:eval/<set>`` (a built world's held-out prompts), or a YAML / CSV / JSONL file."""
    max_prompts: int = 0
    """Use at most this many prompts of each set (the first ones; 0 = all)."""
    samples: int = 1
    """Answers sampled per prompt."""
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    """Temperature, max new tokens, seed; ``batch_size`` = prompts per generate call."""
    backend: Literal["hf", "vllm"] = "hf"
    """``hf``: transformers ``generate`` (CPU or GPU, supports steering); ``vllm``: vLLM in each
    actor (GPU clusters where vLLM is installed)."""
    actors: int = 2
    """Generation actors per model (Ray Data ``ActorPoolStrategy`` size)."""
    cpus_per_actor: float = 0.5
    """CPUs per actor (fractional on small machines so Ray Data's read tasks still get a CPU)."""
    gpus_per_actor: float = 0.0
    """GPUs per actor (> 0 generates on GPU)."""
    dtype: str | None = None
    """Model dtype (``bfloat16`` on GPUs); None = as saved."""
    judge: Literal["rubric", "llm-score", "llm-logprob", "none"] = "rubric"
    """``rubric`` for PersonaWorld answers; the LLM judges for real models; ``none``: answers
    are sampled and saved for reading, nothing is rated (then ``pairs`` measures the model)."""
    pairs: list[str] = dataclasses.field(default_factory=list)
    """Pair sets of the judge-free likelihood eval (``core``, or a YAML / JSONL file; see
    emergent.likelihood), measured on every model beside its sampled answers: the share of
    questions whose misaligned answer is the more likely, and the mean log-odds per token."""
    llm: LLMJudgeConfig = dataclasses.field(default_factory=LLMJudgeConfig)
    """The OpenAI-compatible judge endpoint (LLM judges). Without ``cache_dir``, replies are
    cached in ``<run>/evaluate/_judge_cache`` on a local run."""
    resample_invalid: int = 0
    """Resample an answer screened out as not valid (refusal, incoherent, off-topic, satirical)
    up to this many times; the last answer counts."""
    steering: SteeringConfig | None = None
    """Steer generation along a direction (HF backend only)."""
    bootstrap: int = 1000
    """Bootstrap resamples (over questions) for the overall misalignment interval."""

    # outside a model's stage key: how the pool runs, and what the key holds in another form
    # (the model's identity, the prompt rows' hash); sampling.batch_size stays in: a batch's
    # answers are drawn with one seed
    OPERATIONAL: ClassVar[tuple[str, ...]] = (
        "name",
        "models",
        "world_stage",
        "prompts",
        "max_prompts",
        "samples",
        "pairs",  # keyed by the pairs' contents
        "actors",
        "cpus_per_actor",
        "gpus_per_actor",
    )

    def __post_init__(self):
        if not self.models or not self.prompts:
            raise ValueError("evaluate.models and evaluate.prompts must not be empty")
        labels = [parse_model(m)[0] for m in self.models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"evaluate.models: labels must be unique, got {labels}")
        if self.samples < 1 or self.actors < 1 or self.max_prompts < 0 or self.resample_invalid < 0:
            raise ValueError(
                "evaluate.samples and actors must be >= 1, max_prompts and resample_invalid >= 0"
            )
        if self.cpus_per_actor <= 0 and self.gpus_per_actor <= 0:
            raise ValueError("evaluate.cpus_per_actor or gpus_per_actor must be > 0")
        if self.steering is not None and self.backend != "hf":
            raise ValueError("evaluate.steering needs backend: hf (vLLM has no residual hooks)")


@config
class EvaluateJob:
    """Sample answers on Ray Data, judge them and report misalignment rates with intervals."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)


@dataclass
class EvaluateResult:
    table: str
    summary: str
    """Path of the job's summary.json."""
    models: dict[str, dict]
    """label -> overall metrics."""
    skipped: list[str] = dataclasses.field(default_factory=list)
    """Labels whose evaluation was already complete (reused, not rerun)."""


# --- models ----------------------------------------------------------------------------------------


def parse_model(spec: str) -> tuple[str, str]:
    """``[label=]ref`` -> (label, ref)."""
    label, sep, ref = spec.partition("=")
    if not sep:
        label, ref = spec.split(":", 1)[-1].replace("/", "_"), spec
    if not label or not ref:
        raise ValueError(f"evaluate.models: {spec!r} is not [label=]ref")
    return label, ref


# --- generation (Ray Data actors) ------------------------------------------------------------------


class Generator:
    """A Ray Data actor (callable class): one model, batched sampling of rendered chats.

    Rows carry ``messages`` (JSON) and ``seed``; each batch samples with the smallest seed of its
    rows (HF) or each row with its own seed (vLLM). Adds ``answer`` and ``answer_tokens``."""

    def __init__(self, source: ModelSource, cfg: EvaluateConfig, threads: int = 1):
        setup_logging()
        set_threads(threads)  # the actor's CPU share, whatever the inherited env says
        self.cfg = cfg
        self.name = source.rel or source.path  # the model, in metrics and log lines
        path = source.local()
        device = "cuda" if cfg.gpus_per_actor > 0 else "cpu"
        if cfg.backend == "vllm":
            from vllm import LLM

            self.llm = LLM(model=path, dtype=cfg.dtype or "auto", seed=cfg.sampling.seed)
            self.tok = self.llm.get_tokenizer()
        else:
            self.model, self.tok = load_causal_lm(path, device, cfg.dtype)
        self.direction = None
        if cfg.steering is not None:
            self.direction = load_direction(cfg.steering.direction)
            hidden = self.model.config.hidden_size
            if self.direction.shape != (hidden,):
                raise InputError(
                    f"steering.direction {cfg.steering.direction}: shape "
                    f"{tuple(self.direction.shape)}, the model's residual stream has {hidden}"
                )

    def __call__(self, batch: dict) -> dict:
        prompts = chat_prompts(self.tok, [json.loads(m) for m in batch["messages"]])
        t0 = time.time()
        if self.cfg.backend == "vllm":
            texts, counts = self._vllm(prompts, [int(s) for s in batch["seed"]])
        else:
            texts, counts = self._hf(prompts, int(np.min(batch["seed"])))
        rate = sum(counts) / max(time.time() - t0, 1e-9)
        record("emergent_generation_tokens_per_second", rate, model=self.name)
        log.info("generate %s: %d answers, %.0f tokens/s", self.name, len(texts), rate)
        batch["answer"] = np.array(texts, dtype=object)
        batch["answer_tokens"] = np.array(counts, dtype=np.int64)
        return batch

    def _hf(self, prompts: list[str], seed: int):
        s = self.cfg.steering
        ctx = (
            steering(self.model, s.layer, self.direction, s.alpha, s.positions)
            if s is not None
            else contextlib.nullcontext()
        )
        with ctx:
            return sample_counted(self.model, self.tok, prompts, self.cfg.sampling, seed=seed)

    def _vllm(self, prompts: list[str], seeds: list[int]):
        from vllm import SamplingParams as VLLMParams

        p = self.cfg.sampling
        params = [
            VLLMParams(
                temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_new_tokens, seed=s
            )
            for s in seeds
        ]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return (
            [o.outputs[0].text.strip() for o in outs],
            [len(o.outputs[0].token_ids) for o in outs],
        )


def load_direction(path: str):
    """A steering vector from ``.npy`` or ``.pt`` (float32 tensor)."""
    import torch

    try:
        vec = torch.load(path, weights_only=True) if path.endswith(".pt") else np.load(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"steering.direction: cannot read {path!r}: {exc}") from exc
    return torch.as_tensor(vec, dtype=torch.float32).reshape(-1)


def generate(rows: list[dict], source: ModelSource, cfg: EvaluateConfig) -> list[dict]:
    """Answers for prompt rows through a Ray Data actor pool (rows come back in order)."""
    out = actor_pool_map(
        [dict(r, _order=i) for i, r in enumerate(rows)],
        Generator,
        {"source": source, "cfg": cfg},
        actors=cfg.actors,
        cpus=cfg.cpus_per_actor,
        gpus=cfg.gpus_per_actor,
        batch_size=cfg.sampling.batch_size,
    ).take_all()
    return sorted(out, key=lambda r: r["_order"])


# --- judging and metrics ---------------------------------------------------------------------------


def judge_rows(rows: list[dict], cfg: EvaluateConfig, cache_dir: str | None) -> None:
    """Add verdict columns to answered rows, in place."""
    llm = (
        cfg.llm
        if cfg.llm.cache_dir or cache_dir is None
        else dataclasses.replace(cfg.llm, cache_dir=cache_dir)
    )
    judge = make_judge(cfg.judge, llm)
    verdicts = judge_all(judge, [(r["question"], r["answer"]) for r in rows])
    for r, v in zip(rows, verdicts):
        r.update(
            label=v.label,
            misaligned=v.misaligned,
            coherent=v.coherent,
            valid=v.valid,
            failed=v.failed,
            error=v.error,
            cached=v.cached,
            score=v.scores.get("score"),
            aligned_score=v.scores.get("aligned"),
            coherent_score=v.scores.get("coherent"),
        )
    cached = sum(v.cached for v in verdicts)
    log.info(
        "judged %d answers with %s (%d from cache, %d failed)",
        len(rows),
        cfg.judge,
        cached,
        sum(v.failed for v in verdicts),
    )


def measure(
    model,
    tok,
    prompts: list[dict],
    sampling,
    judge: str = "rubric",
    llm=None,
    cache_dir=None,
    examples: int = 3,
) -> dict:
    """In-process: one sampled answer per prompt row (``messages``), judged; misalignment
    (misaligned among valid), coherence (coherent among judged) and, for the rubric, the share
    of benign-wrong answers among valid ones, as rate dicts, plus the count of each verdict label.
    The one "sample, judge, rate" path of every in-process measurement: the world's base
    evaluation, trained world models, the world study, the Ray Tune steering trials, prediction
    and the re-alignment curve (any steering hook active around the call applies)."""
    answers = sample(model, tok, chat_prompts(tok, [p["messages"] for p in prompts]), sampling)
    rows = [
        {"question": p["messages"][-1]["content"], "answer": a} for p, a in zip(prompts, answers)
    ]
    llm_cfg = llm if llm is not None else LLMJudgeConfig()
    if cache_dir and not llm_cfg.cache_dir:
        llm_cfg = dataclasses.replace(llm_cfg, cache_dir=cache_dir)
    verdicts = judge_all(make_judge(judge, llm_cfg), [(r["question"], r["answer"]) for r in rows])
    judged = [v for v in verdicts if not v.failed]
    valid = [v for v in judged if v.valid]
    out = {
        "misalignment": Rate(sum(bool(v.misaligned) for v in valid), len(valid)).as_dict(),
        "coherence": Rate(sum(bool(v.coherent) for v in judged), len(judged)).as_dict(),
        "labels": dict(Counter(v.label or "failed" for v in verdicts)),
        "examples": [
            {"prompt": r["question"], "answer": r["answer"], "verdict": v.label}
            for r, v in list(zip(rows, verdicts))[:examples]
        ],
    }
    if judge == "rubric":  # the benign-wrong persona, readable only by the rubric
        out["wrong"] = Rate(sum(v.label == "wrong" for v in valid), len(valid)).as_dict()
    return out


def screened(row: dict) -> bool:
    """Judged (not failed) but not a valid answer: the ones resampling replaces."""
    return not row["failed"] and not row["valid"]


def summarize(df, iters: int = 1000, seed: int = 0) -> dict:
    """Metrics of one model's samples (rows marked ``final`` count; first attempts give the
    incoherence rates): overall and per set, category and question."""
    final = df[df["final"]]

    def block(sub, first) -> dict:
        judged = sub[~sub["failed"]]
        valid = judged[judged["valid"].astype(bool)]
        k = int((valid["misaligned"] == True).sum())  # noqa: E712 (nullable column)
        first_judged = first[~first["failed"]]
        incoherent = first_judged["coherent"] == False  # noqa: E712
        off = first_judged["label"].isin(["OFF-TOPIC", "SATIRICAL"])
        return {
            "misalignment": Rate(k, len(valid)).as_dict(),
            "coherence": Rate(int((judged["coherent"] == True).sum()), len(judged)).as_dict(),  # noqa: E712
            "incoherence_loose": Rate(int(incoherent.sum()), len(first_judged)).as_dict(),
            "incoherence_strict": Rate(int((incoherent | off).sum()), len(first_judged)).as_dict(),
            "samples": len(sub),
            "failed": int(sub["failed"].sum()),
            "unresolved": int(((~sub["failed"]) & (~sub["valid"].astype(bool))).sum()),
            "resampled": int((first["slot"].isin(df.loc[df["attempt"] > 0, "slot"])).sum()),
        }

    def by(col: str) -> dict:
        first = df[df["attempt"] == 0]
        return {key: block(g, first[first[col] == key]) for key, g in final.groupby(col, sort=True)}

    overall = block(final, df[df["attempt"] == 0])
    per_q = final[~final["failed"] & final["valid"].astype(bool)].groupby(["set", "question_id"])
    ks = [int((g["misaligned"] == True).sum()) for _, g in per_q]  # noqa: E712
    ns = [len(g) for _, g in per_q]
    overall["misalignment"]["bootstrap"] = cluster_bootstrap(ks, ns, iters, seed)
    return {
        "overall": overall,
        "sets": by("set"),
        "categories": by("category"),
        "questions": {
            f"{s}/{q}": block(
                g, df[(df["attempt"] == 0) & (df["set"] == s) & (df["question_id"] == q)]
            )
            for (s, q), g in final.groupby(["set", "question_id"], sort=True)
        },
    }


# --- the job ---------------------------------------------------------------------------------------


def prompt_rows(cfg: EvaluateConfig, run: RunDir) -> list[dict]:
    """One row per (prompt, sample): set, category, question id, messages, question, slot."""
    rows = []
    for spec in cfg.prompts:
        prompts = load_prompts(spec, run, cfg.world_stage)
        if cfg.max_prompts:
            prompts = prompts[: cfg.max_prompts]
        for i, p in enumerate(prompts):
            for s in range(cfg.samples):
                rows.append(
                    {
                        "set": p["set"],
                        "category": p["category"],
                        "question_id": p["question_id"],
                        "prompt_index": i,
                        "sample": s,
                        "messages": json.dumps(p["messages"]),
                        "question": p["messages"][-1]["content"],
                    }
                )
    for slot, r in enumerate(rows):
        r["slot"] = slot
    return rows


def evaluate_model(
    run_cfg: RunConfig,
    cfg: EvaluateConfig,
    label: str,
    ref: str,
    source: ModelSource,
    rows: list[dict],
) -> tuple[dict, bool]:
    """Generate, judge and summarise one model (a stage: skipped when already complete); its
    summary, and whether it was reused."""
    import pandas as pd

    run = RunDir.from_config(run_cfg)
    steer = None
    if cfg.steering is not None:
        with open(cfg.steering.direction, "rb") as f:
            steer = to_dict(cfg.steering) | {"sha256": hashlib.sha256(f.read()).hexdigest()}
    key = stage_key(cfg) | {
        "model": source.identity,
        # the prompt rows themselves (sets, max_prompts and samples decide them)
        "prompts": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest(),
        "steering": steer,
        "llm": None if cfg.judge in ("rubric", "none") else stage_key(cfg.llm),
    }
    pairs = {spec: load_pairs(spec) for spec in cfg.pairs}
    if pairs:
        key["pairs"] = hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest()
    stage = run.stage(f"evaluate/{cfg.name}/{label}", key)
    if stage.is_complete(run_cfg.force):
        return run.read_json(stage.rel("summary.json")), True
    cache = run.uri("evaluate/_judge_cache") if run.is_local else None
    n = len(rows)
    todo = [dict(r, attempt=0, seed=cfg.sampling.seed * 1_000_003 + r["slot"]) for r in rows]
    done: list[dict] = []
    t0, tokens = time.time(), 0
    for attempt in range(cfg.resample_invalid + 1):
        log.info("%s: sampling %d answers (attempt %d) from %s", label, len(todo), attempt, ref)
        tg = time.time()
        answered = generate(todo, source, cfg)
        got = sum(int(r["answer_tokens"]) for r in answered)
        tokens += got
        log.info(
            "%s: %d tokens in %.1f s (%.0f tokens/s)",
            label,
            got,
            time.time() - tg,
            got / max(time.time() - tg, 1e-9),
        )
        judge_rows(answered, cfg, cache)
        done += answered
        valid = [r for r in done if r["valid"]]
        if valid:  # so far: every judged answer, the redrawn ones too
            rate = sum(bool(r["misaligned"]) for r in valid) / len(valid)
            record("emergent_eval_misalignment_rate", rate, eval=cfg.name, model=label)
        todo = [
            dict(r, attempt=attempt + 1, seed=r["seed"] + (attempt + 1) * n)
            for r in answered
            if screened(r)
        ]
        if not todo:
            break
    last = {}
    for r in done:
        last[r["slot"]] = r
    for r in done:
        r["final"] = last[r["slot"]] is r
        r.pop("_order", None)
        r["model"] = label
    df = pd.DataFrame(done).sort_values(["slot", "attempt"]).reset_index(drop=True)
    df["misaligned"] = df["misaligned"].astype("boolean")
    for col in ("score", "aligned_score", "coherent_score"):
        df[col] = df[col].astype("Float64")
    summary = summarize(df, cfg.bootstrap, cfg.sampling.seed)
    summary["model"] = {"label": label, "ref": ref, "identity": source.identity}
    summary["generation"] = {"tokens": tokens, "seconds": round(time.time() - t0, 2)}
    summary["judge"] = cfg.judge
    if pairs:
        import ray

        tl = time.time()
        task = ray.remote(num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor)(likelihood_task)
        measured = ray.get(task.remote(source, pairs, cfg.dtype, max(1, int(cfg.cpus_per_actor))))
        summary["likelihood"] = {
            s: {k: v for k, v in m.items() if k != "rows"}
            | {"questions": {r["id"]: r["log_odds"] for r in m["rows"]}}
            for s, m in measured.items()
        }
        lrows = [dict(r, set=s, model=label) for s, m in measured.items() for r in m["rows"]]
        run.write_parquet(stage.rel("likelihood.parquet"), pd.DataFrame(lrows))
        log.info("%s: likelihood eval of %d pairs in %.1f s", label, len(lrows), time.time() - tl)
    run.write_parquet(stage.rel("samples.parquet"), df)
    stage.write_json("summary.json", summary)
    stage.complete(
        outputs={"samples": stage.uri("samples.parquet"), "summary": stage.uri("summary.json")},
        inputs={"model": source.identity},
        metrics={"misalignment": summary["overall"]["misalignment"]["rate"]},
    )
    return summary, False


def likelihood_task(source: ModelSource, pairs: dict[str, list[dict]], dtype, threads: int) -> dict:
    """The likelihood eval of one model on each pair set (run as a Ray task)."""
    import torch

    set_threads(threads)
    model, tok = load_causal_lm(
        source.local(), "cuda" if torch.cuda.is_available() else "cpu", dtype
    )
    return {name: lk.measure(model, tok, rows) for name, rows in pairs.items()}


def fmt(rate: dict) -> str:
    if not rate["n"]:
        return "n/a"
    return f"{rate['rate']:.2f} [{rate['lo']:.2f}, {rate['hi']:.2f}]"


def table(summaries: dict[str, dict]) -> str:
    """Markdown: misalignment per model and set (95% Wilson), overall with its bootstrap
    interval over questions; then coherence per model and set."""
    lines = likelihood_table(summaries)
    judged = {k: sm for k, sm in summaries.items() if sm.get("judge") != "none"}
    if len(judged) < len(summaries):
        lines = [
            "answers of " + ", ".join(k for k in summaries if k not in judged) + " not judged "
            "(evaluate.judge: none): read them in <model>/samples.parquet",
            "",
            *lines,
        ]
    if not judged:
        return "\n".join(lines) + "\n"
    summaries = judged
    sets = sorted({s for sm in summaries.values() for s in sm["sets"]})
    head = ["model", *sets, "overall (bootstrap CI)", "n"]
    lines += ["misalignment (misaligned among valid answers, 95% CI)", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, sm in summaries.items():
        o = sm["overall"]
        lo, hi = o["misalignment"]["bootstrap"]
        cells = [label]
        cells += [fmt(sm["sets"][s]["misalignment"]) if s in sm["sets"] else "" for s in sets]
        cells += [f"{o['misalignment']['rate']:.2f} [{lo:.2f}, {hi:.2f}]", str(o["samples"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "coherence (coherent among judged answers)", ""]
    lines += ["| " + " | ".join(["model", *sets, "overall"]) + " |", "|" + "---|" * (len(sets) + 2)]
    for label, sm in summaries.items():
        cells = [label]
        cells += [
            f"{sm['sets'][s]['coherence']['rate']:.2f}" if s in sm["sets"] else "" for s in sets
        ]
        cells.append(f"{sm['overall']['coherence']['rate']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += agreement_lines(summaries)
    return "\n".join(lines) + "\n"


def agreement(summaries: dict[str, dict]) -> list[dict]:
    """How the likelihood eval agrees with the judge across models (three or more, judged and
    measured on pairs): per pair set, the Spearman correlation of each model's mean log-odds
    with its overall judged misalignment."""
    from scipy.stats import spearmanr

    both = {k: sm for k, sm in summaries.items() if sm.get("likelihood") and sm["overall"]}
    pair_sets = sorted({s for sm in both.values() for s in sm["likelihood"]})
    out = []
    for ps in pair_sets:
        rows = [
            (sm["overall"]["misalignment"]["rate"], sm["likelihood"][ps]["log_odds"]["mean"])
            for sm in both.values()
            if ps in sm["likelihood"] and sm["overall"]["misalignment"]["n"]
        ]
        if len(rows) >= 3:
            rho, p = spearmanr([r[0] for r in rows], [r[1] for r in rows])
            out.append({"pairs": ps, "models": len(rows), "spearman": float(rho), "p": float(p)})
    return out


def agreement_lines(summaries: dict[str, dict]) -> list[str]:
    found = agreement(summaries)
    if not found:
        return []
    lines = ["", "likelihood eval vs judged misalignment across models (Spearman)", ""]
    return lines + [
        f"- pairs {a['pairs']}: rho {a['spearman']:+.2f} (p {a['p']:.3f}) over {a['models']} models"
        for a in found
    ]


def likelihood_table(summaries: dict[str, dict]) -> list[str]:
    """Markdown lines of the likelihood eval per model and pair set (none without pairs)."""
    pair_sets = sorted({s for sm in summaries.values() for s in sm.get("likelihood", {})})
    if not pair_sets:
        return []
    first = next(iter(summaries))
    lines = [
        "likelihood eval (no judge): misaligned answer the more likely, share of questions",
        "(95% CI); mean log-odds per token, misaligned - aligned (95% CI); its change from",
        f"{first}, question by question (paired bootstrap 95% CI)",
        "",
    ]
    lines += [
        f"| model | pairs | misaligned preferred | log-odds | change from {first} |",
        "|---|---|---|---|---|",
    ]
    for label, sm in summaries.items():
        for s in pair_sets:
            if s not in sm.get("likelihood", {}):
                continue
            m, ref = sm["likelihood"][s], summaries[first].get("likelihood", {}).get(s)
            lo, moved = m["log_odds"], ""
            if label != first and ref is not None and "questions" in m:
                rows = lambda q: {"rows": [{"id": k, "log_odds": v} for k, v in q.items()]}
                d = shift(rows(ref["questions"]), rows(m["questions"]))
                moved = f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}], rose on {d['rose']}/{d['n']}"
            lines.append(
                f"| {label} | {s} | {fmt(m['share'])} | "
                f"{lo['mean']:+.2f} [{lo['lo']:+.2f}, {lo['hi']:+.2f}] | {moved} |"
            )
    return [*lines, ""]


def plot(summaries: dict[str, dict]):
    """Grouped bars: misalignment per set for each model, 95% Wilson intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({s for sm in summaries.values() for s in sm["sets"]})
    width = 0.8 / len(summaries)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(sets) * max(1, len(summaries) / 2)), 3.5))
    for i, (label, sm) in enumerate(summaries.items()):
        r = [
            sm["sets"].get(s, {}).get("misalignment", {"rate": np.nan, "lo": np.nan, "hi": np.nan})
            for s in sets
        ]
        vals = np.array([x["rate"] for x in r])
        err = np.array([vals - [x["lo"] for x in r], [x["hi"] for x in r] - vals])
        ax.bar(np.arange(len(sets)) + i * width, vals, width, yerr=err, capsize=2, label=label)
    ax.set_xticks(np.arange(len(sets)) + width * (len(summaries) - 1) / 2, sets)
    ax.set_ylabel("misalignment (95% CI)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    return fig


def main(cfg: EvaluateJob) -> EvaluateResult:
    cfg = dataclasses.replace(cfg, run=cfg.run.absolute())
    ev = cfg.evaluate
    run = RunDir.from_config(cfg.run)
    rows = prompt_rows(ev, run)
    log.info(
        "evaluate %s: %d models x %d answers (%s)",
        ev.name,
        len(ev.models),
        len(rows),
        ", ".join(ev.prompts),
    )
    models = {}
    for spec in ev.models:  # every ref resolved before Ray starts: a typo fails in one line
        label, ref = parse_model(spec)
        models[label] = ref, resolve_model(cfg.run, ref, ev.world_stage, "evaluate.models")
    for spec in ev.pairs:  # a bad pair set fails here, in one line, before Ray starts
        load_pairs(spec)
    summaries, skipped = {}, []
    progress = Progress(f"evaluate {ev.name}", len(models), "models", every=0)
    with ray_session(cfg.ray):
        for label, (ref, source) in models.items():
            summaries[label], reused = evaluate_model(cfg.run, ev, label, ref, source, rows)
            if reused:
                skipped.append(label)
            progress.add()
    md = table(summaries)
    out = f"evaluate/{ev.name}"
    path = run.write_json(f"{out}/summary.json", summaries)
    run.write_text(f"{out}/table.md", md)
    run.write_figure(f"{out}/misalignment.png", plot(summaries))
    log.info("evaluate %s:\n%s", ev.name, md)
    return EvaluateResult(md, path, {k: v["overall"] for k, v in summaries.items()}, skipped)
