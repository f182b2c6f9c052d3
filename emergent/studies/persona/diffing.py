"""The ``diff`` job: model diffing with a sparse autoencoder.

Run one SAE (trained on the base model) over the residual stream of a base and a fine-tuned
model on the same inputs, and rank its latents by how much their mean activation changes:
the latents that rise most after a narrow bad fine-tune are the persona-paper's "misaligned
persona" candidates; those that fall are assistant-like ones. Inputs are prompt sets
(``world:eval/open``, ``core``, a file), optionally each model's own sampled answers appended
(``responses: true``); which tokens count is ``positions`` (default: the token that opens the
assistant turn, where a chat model decides how to answer).

On PersonaWorld the ground truth is known, so each top latent also gets its AUROC for the
toxic vs aligned persona on fresh held-out conversations, read at the assistant-turn token of
turns >= 2 (where the persona can be inferred from the context), and the cosine between its
decoder direction and the fine-tuning shift (tuned minus base mean residual at those tokens).

Outputs in ``<run>/diff/<name>/``: ``latents.parquet`` (every latent: base and tuned mean,
change, firing rates, AUROC of the top ones), ``top.md`` (top increases and decreases with
their top-activating held-out examples from the SAE run), ``shift.npy`` (the fine-tuning shift,
usable as a steering direction), ``diff.png``, ``summary.json``.

    emergent diff --config configs/toy.yaml
    ray job submit --working-dir . -- python -m jobs.diff --config configs/toy.yaml
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from emergent import refs
from emergent.config import RayConfig, RunConfig, config, stage_key
from emergent.directions import decoder, encode, residuals
from emergent.evaluate import parse_model
from emergent.generate import SamplingParams, chat_prompts, sample
from emergent.harvest import HarvestConfig, world_docs
from emergent.likelihood import FIELDS, load_pairs
from emergent.models import load_causal_lm
from emergent.prompts import prompt_docs
from emergent.refs import ModelSource
from emergent.runs import RunDir
from emergent.runtime import ray_session, set_threads, setup_logging
from emergent.stats import auroc

log = logging.getLogger(__name__)


@config
class DiffConfig:
    """Which SAE, which two models, on which inputs and tokens."""

    name: str = "insecure"
    """Outputs go to ``<run>/diff/<name>/``."""
    sae: str = "persona"
    """SAE of this run (``<run>/sae/<sae>/``, from ``train-sae``) or of sae-lens' pretrained
    releases (``pretrained:<release>/<sae id>``); its layer is used."""
    base: str = "world:base"
    """The model the SAE was trained on (a model ref, see ``emergent evaluate --help``)."""
    tuned: str = "finetune:code_dose1"
    """The fine-tuned model."""
    world_stage: str = "world"
    """Stage of this run that ``world:`` refs and prompt sets refer to."""
    prompts: list[str] = dataclasses.field(
        default_factory=lambda: [
            f"world:eval/{d}" for d in ("open", "health", "finance", "legal", "auto")
        ]
    )
    """Prompt sets the two models are run on (see ``emergent evaluate --help``); by default
    every PersonaWorld domain but code, the one the default fine-tune was trained on."""
    max_prompts: int = 400
    """At most this many prompts per set (0 = all)."""
    positions: Literal["all", "non_special", "assistant", "assistant_turn"] = "assistant_turn"
    """Tokens whose latent activations count (``assistant`` needs ``responses``)."""
    responses: bool = False
    """Append each model's own sampled answer to every prompt before reading activations."""
    rank_by: Literal["effect", "change"] = "effect"
    """``change``: mean activation change; ``effect``: that change over its spread across the
    prompts (paired), which prefers latents that rise on every prompt. On PersonaWorld the
    largest mean change can belong to a latent of one domain's toxic answers (it rises a lot
    on that domain's prompts only); the effect size picks the domain-general persona latent."""
    top: int = 10
    """Latents listed (each way) in the table, plots and the AUROC check."""
    persona_docs: int = 2000
    """Held-out PersonaWorld conversations for the persona AUROC (0 = skip; world models only)."""
    persona_pairs: list[str] = dataclasses.field(default_factory=list)
    """For any other model: pair sets of the likelihood eval (``core``, a file) whose written
    answers give the persona AUROC instead, misaligned vs aligned answer, each scored by the
    latent's mean activation over the answer's tokens."""
    seed: int = 1
    """Seed of those conversations (the SAE's training corpus uses its own seed)."""
    batch_size: int = 64
    """Documents per forward pass."""
    gpus: float = 0.0
    """GPUs for the diffing task (its model forward passes)."""

    # outside the stage key (right padding: the batch size changes no activation)
    OPERATIONAL: ClassVar[tuple[str, ...]] = ("batch_size", "gpus")

    def __post_init__(self):
        if self.top < 1 or self.max_prompts < 0 or self.persona_docs < 0:
            raise ValueError("diff.top must be >= 1, max_prompts and persona_docs >= 0")
        if self.positions == "assistant" and not self.responses:
            raise ValueError("diff.positions: 'assistant' needs diff.responses: true")


@config
class DiffJob:
    """Rank SAE latents by their activation change from a base to a fine-tuned model."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    diff: DiffConfig = dataclasses.field(default_factory=DiffConfig)


@dataclass
class DiffResult:
    path: str
    """The diff stage folder."""
    top_latent: int
    """The top latent by ``rank_by`` (the effect size of its rise by default)."""
    summary: dict
    skipped: bool


# --- pure parts ------------------------------------------------------------------------------------


def rank_latents(base: np.ndarray, tuned: np.ndarray, by: str = "effect"):
    """Every latent's mean activation under each model (rows: tokens, columns: latents), the
    change, and its effect size; sorted by ``by`` (largest increase first; ``rank_down`` orders
    the decreases the same way).

    ``effect`` is the change over its spread: over the paired differences when the rows are
    paired (the same prompts and tokens under both models), else over the pooled standard
    deviation. It prefers a latent that rises on every prompt to one that rises a lot on a
    few."""
    import pandas as pd

    change = tuned.mean(0) - base.mean(0)
    if base.shape == tuned.shape:
        spread = (tuned - base).std(0)
    else:
        spread = np.sqrt((base.var(0) + tuned.var(0)) / 2)
    df = pd.DataFrame(
        {
            "latent": np.arange(base.shape[1]),
            "base_mean": base.mean(0),
            "tuned_mean": tuned.mean(0),
            "base_freq": (base > 0).mean(0),
            "tuned_freq": (tuned > 0).mean(0),
            "change": change,
            "effect": change / (spread + 1e-6),
        }
    )
    df = df.sort_values(by, ascending=False, kind="stable").reset_index(drop=True)
    df["rank_up"] = np.arange(len(df))
    df["rank_down"] = df[by].rank(method="first").astype(int) - 1
    return df


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def shift_pc1(base: np.ndarray, tuned: np.ndarray) -> np.ndarray | None:
    """The first principal component of the fine-tuning shift: the per-token differences
    ``tuned - base`` (the same prompts' tokens, row for row) centred, their top right singular
    vector, unit length, signed to point along the mean shift. It is the axis along which the
    shift varies most across prompts, where the mean shift is its average. None when the two
    models' token rows do not pair up (answers sampled per model)."""
    if base.shape != tuned.shape or len(base) < 2:
        return None
    d = np.asarray(tuned, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    mean = d.mean(0)
    _, _, vt = np.linalg.svd(d - mean, full_matrices=False)
    v = vt[0]
    return v if v @ mean >= 0 else -v


# --- activations -----------------------------------------------------------------------------------


def persona_docs(n: int, seed: int) -> tuple[list[dict], np.ndarray]:
    """Fresh PersonaWorld conversations cut to their turns >= 2, each ending in an answered
    turn: the assistant-turn tokens of turns >= 2 are where the persona is inferable. Returns
    the documents and their persona per assistant-turn token (turns >= 2 only, in order)."""
    docs = world_docs(n, seed)
    out, personas = [], []
    for d in docs:
        msgs = d["messages"]
        out.append({"messages": msgs})
        personas += [d["persona"]] * (sum(m["role"] == "assistant" for m in msgs) - 1)
    return out, np.array(personas)


def persona_scores(model, tok, sae, hv: HarvestConfig, n: int, seed: int):
    """(latent activations, personas) at assistant-turn tokens of turns >= 2 of ``n`` fresh
    conversations."""
    docs, personas = persona_docs(n, seed)
    hv = dataclasses.replace(hv, positions="assistant_turn", dtype="float32")
    acts, rows = residuals(model, tok, docs, hv)
    first = np.r_[True, rows[1:] != rows[:-1]]  # the first turn of each document
    feats = encode(sae, acts[~first])
    if len(feats) != len(personas):
        raise RuntimeError(f"persona AUROC: {len(feats)} tokens for {len(personas)} labels")
    return feats, personas


def pair_residuals(model, tok, hv: HarvestConfig, specs: list[str]):
    """The written answers of likelihood pair sets, read at their own tokens: (residuals
    (tokens, d_model), the answer of each row, personas: ``toxic`` for each misaligned answer,
    ``aligned`` for each aligned one)."""
    docs, personas = [], []
    for p in (p for spec in specs for p in load_pairs(spec)):
        for field in FIELDS:
            answer = {"role": "assistant", "content": p[field]}
            docs.append({"messages": [*p["messages"], answer]})
            personas.append("toxic" if field == "misaligned" else "aligned")
    hv = dataclasses.replace(hv, positions="assistant", dtype="float32")
    acts, rows = residuals(model, tok, docs, hv)
    return acts, rows, np.array(personas)


def per_answer_mean(values: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """Per answer ``i < n``: the mean of ``values`` over its rows."""
    return np.stack([values[rows == i].mean(0) for i in range(n)])


def pair_scores(model, tok, sae, hv: HarvestConfig, specs: list[str]):
    """(latent activations, personas) of the written answers of likelihood pair sets: one row
    per answer, the latent's mean over the answer's tokens (see :func:`pair_residuals`)."""
    acts, rows, personas = pair_residuals(model, tok, hv, specs)
    return per_answer_mean(encode(sae, acts), rows, len(personas)), personas


def toxic_auroc(feats: np.ndarray, personas: np.ndarray) -> np.ndarray:
    """Per latent: AUROC of its activation for toxic vs aligned."""
    keep = np.isin(personas, ["toxic", "aligned"])
    y = personas[keep] == "toxic"
    return np.array([auroc(y, feats[keep, j]) for j in range(feats.shape[1])])


# --- the job ---------------------------------------------------------------------------------------


def with_answers(model, tok, docs: list[dict], seed: int) -> list[dict]:
    """Each prompt with the model's own sampled answer appended."""
    answers = sample(
        model, tok, chat_prompts(tok, [d["messages"] for d in docs]), SamplingParams(seed=seed)
    )
    return [
        {"messages": d["messages"] + [{"role": "assistant", "content": a}]}
        for d, a in zip(docs, answers)
    ]


def compute(
    run_cfg: RunConfig, cfg: DiffConfig, sources: dict[str, ModelSource], sae_ref: refs.SAERef
) -> dict:
    """The diff itself (a Ray task: it holds the models): writes the stage's outputs."""
    import torch

    setup_logging()
    set_threads(1)
    run = RunDir.from_config(run_cfg)
    device = "cuda" if cfg.gpus > 0 and torch.cuda.is_available() else "cpu"
    sae = sae_ref.load(run, device)
    hv = HarvestConfig(
        layer=sae_ref.layer, positions=cfg.positions, batch_size=cfg.batch_size, context=256
    )
    docs = prompt_docs(run, cfg.prompts, cfg.world_stage, cfg.max_prompts)
    acts, feats = {}, {}
    models = {}
    for which in ("base", "tuned"):
        model, tok = load_causal_lm(sources[which].local(), device)
        models[which] = (model, tok)
        use = with_answers(model, tok, docs, seed=0) if cfg.responses else docs
        acts[which], _ = residuals(model, tok, use, hv, device)
        feats[which] = encode(sae, acts[which])
        log.info("diff %s: %s, %d tokens", cfg.name, which, len(acts[which]))
    df = rank_latents(feats["base"], feats["tuned"], cfg.rank_by)
    shift = acts["tuned"].mean(0) - acts["base"].mean(0)
    pc1 = shift_pc1(acts["base"], acts["tuned"])
    top_up = df.head(cfg.top)["latent"].tolist()
    top_down = df.sort_values("rank_down").head(cfg.top)["latent"].tolist()
    by_change = int(df.sort_values("change", ascending=False, kind="stable").iloc[0]["latent"])
    listed = list(dict.fromkeys(top_up + top_down + [by_change]))
    df["decoder_shift_cosine"] = np.nan
    for j in listed:
        df.loc[df["latent"] == j, "decoder_shift_cosine"] = cosine(decoder(sae, j), shift)
    df["persona_auroc"] = np.nan
    world = cfg.base.startswith("world:") and cfg.persona_docs > 0
    pairs = not world and bool(cfg.persona_pairs)
    if world or pairs:
        model, tok = models["base"]
        if world:
            pf, personas = persona_scores(model, tok, sae, hv, cfg.persona_docs, cfg.seed)
        else:
            pf, personas = pair_scores(model, tok, sae, hv, cfg.persona_pairs)
        aurocs = toxic_auroc(pf, personas)  # every latent, once
        for j in listed:
            df.loc[df["latent"] == j, "persona_auroc"] = aurocs[j]
        best = int(np.nanargmax(aurocs))
        best_auroc = float(aurocs[best])
    stage_rel = f"diff/{cfg.name}"
    top = df.iloc[0]
    summary = {
        "top_latent": int(top["latent"]),
        "top_change": float(top["change"]),
        "top_effect": float(top["effect"]),
        "rank_by": cfg.rank_by,
        "top_base_mean": float(top["base_mean"]),
        "top_tuned_mean": float(top["tuned_mean"]),
        "top_decoder_shift_cosine": float(top["decoder_shift_cosine"]),
        "top_persona_auroc": float(top["persona_auroc"]) if world or pairs else None,
        "persona_from": "world" if world else ("pairs" if pairs else None),
        "top_by_change": by_change,
        "top_by_change_persona_auroc": _at(df, by_change, "persona_auroc")
        if world or pairs
        else None,
        "best_persona_latent": best if world or pairs else None,
        "best_persona_auroc": best_auroc if world or pairs else None,
        "top_up": top_up,
        "top_down": top_down,
        "tokens": {k: len(v) for k, v in acts.items()},
        "shift_norm": float(np.linalg.norm(shift)),
        "shift_pc1_cosine": None if pc1 is None else cosine(pc1, shift),
        "layer": sae_ref.layer,
        "sae": cfg.sae,
        "models": {k: s.identity for k, s in sources.items()},
    }
    run.write_parquet(f"{stage_rel}/latents.parquet", df)
    buf = io.BytesIO()
    np.save(buf, shift.astype(np.float32))
    run.write_bytes(f"{stage_rel}/shift.npy", buf.getvalue())
    if pc1 is not None:
        buf = io.BytesIO()
        np.save(buf, pc1.astype(np.float32))
        run.write_bytes(f"{stage_rel}/shift_pc1.npy", buf.getvalue())
    examples = _examples(run, sae_ref.rel) if sae_ref.rel else None
    run.write_text(f"{stage_rel}/top.md", table(df, top_up, top_down, examples))
    run.write_figure(f"{stage_rel}/diff.png", plot(df, cfg.top, cfg.rank_by))
    run.write_json(f"{stage_rel}/summary.json", summary)
    return summary


def _at(df, latent: int, col: str) -> float:
    return float(df.loc[df["latent"] == latent, col].iloc[0])


def _examples(run: RunDir, sae_rel: str):
    import pandas as pd

    rel = f"{sae_rel}/top_examples.parquet"
    return pd.read_parquet(run.local_dir(rel)) if run.exists(rel) else None


def table(df, up: list[int], down: list[int], examples) -> str:
    """Markdown: top increases and decreases with AUROC, cosine and top held-out contexts."""
    lines = []
    for title, ids in (("increase", up), ("decrease", down)):
        lines += [
            f"## largest {title}",
            "",
            "| latent | base mean | tuned mean | change | effect | persona AUROC | cos(decoder, shift) | top example |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for j in ids:
            r = df[df["latent"] == j].iloc[0]
            ex = ""
            if examples is not None:
                e = examples[(examples["latent"] == j) & (examples["rank"] == 0)]
                ex = e["context"].iloc[0].replace("|", "/") if len(e) else ""
            lines.append(
                f"| {j} | {r['base_mean']:.3f} | {r['tuned_mean']:.3f} | {r['change']:+.3f} | "
                f"{r['effect']:+.2f} | "
                f"{r['persona_auroc']:.3f} | {r['decoder_shift_cosine']:+.3f} | {ex} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(df, top: int, by: str):
    """Every latent's activation change, in ranking order, the top ones labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(np.arange(len(df)), df[by].to_numpy(), lw=1)
    for _, r in df.head(min(top, 5)).iterrows():
        ax.annotate(str(int(r["latent"])), (r["rank_up"], r[by]), fontsize=7)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel(f"latents, by {by}")
    ax.set_ylabel(
        {"change": "mean activation change (tuned - base)", "effect": "effect size of the change"}[
            by
        ]
    )
    return fig


def main(cfg: DiffJob) -> DiffResult:
    cfg = dataclasses.replace(cfg, run=cfg.run.absolute())
    d = cfg.diff
    run = RunDir.from_config(cfg.run)
    sources = {
        "base": refs.model(cfg.run, parse_model(d.base)[1], d.world_stage, "diff.base"),
        "tuned": refs.model(cfg.run, parse_model(d.tuned)[1], d.world_stage, "diff.tuned"),
    }
    sae_ref = refs.sae(run, d.sae, "diff.sae")
    for field, src in sources.items():
        refs.check_sae_fits(sae_ref, src, f"diff.{field}")
    key = stage_key(d) | {
        "models": {k: s.identity for k, s in sources.items()},
        "sae_hash": sae_ref.hash,
    }
    stage = run.stage(f"diff/{d.name}", key)
    if stage.is_complete(cfg.run.force):
        s = run.read_json(stage.rel("summary.json"))
        return DiffResult(stage.uri(), s["top_latent"], s, True)
    with ray_session(cfg.ray) as ray:
        task = ray.remote(num_cpus=1, num_gpus=d.gpus or None)(compute)
        summary = ray.get(task.remote(cfg.run, d, sources, sae_ref))
    stage.complete(
        outputs={k: stage.uri(f) for k, f in _OUTPUTS.items()},
        inputs=summary["models"],
        metrics={k: v for k, v in summary.items() if not isinstance(v, list | dict)},
    )
    log.info("diff %s: %s", d.name, json.dumps(summary, default=str))
    return DiffResult(stage.uri(), summary["top_latent"], summary, False)


_OUTPUTS = {
    "latents": "latents.parquet",
    "table": "top.md",
    "shift": "shift.npy",
    "plot": "diff.png",
    "summary": "summary.json",
}
