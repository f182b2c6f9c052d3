"""Directions in a model's residual stream: the steering, flagging, prediction and monitoring
directions every study and the trainer share.

- residuals at a harvest's positions (``residuals``) and SAE latents of them (``encode``);
- an SAE latent's decoder column (``decoder``);
- contrastive persona vectors: toxic minus aligned contexts of a world (``persona_direction``),
  or, for a chat model without a world, an evil minus a helpful system prompt
  (``system_direction``);
- ``directions``: a config's direction specs (``latent`` ids, ``label=file.npy``,
  ``label=diff:<name>``, ``label=pc1:<name>``, ``label=top:<k>``, ``label=persona:<model>``,
  ``label=system:<model>``) resolved to unit vectors, with the SAE whose layer they act at.

All are unit vectors (float32) of the residual stream's width.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch  # noqa: TID253

from emergent import refs
from emergent.config import InputError, RunConfig
from emergent.evaluate import parse_model
from emergent.harvest import HarvestConfig, harvest_docs
from emergent.models import load_causal_lm
from emergent.prompts import load_prompts
from emergent.refs import read_world_dataset
from emergent.runs import RunDir

TOXIC_CONTEXTS = "world:eval/context_toxic"
"""Conversations whose context shows the toxic persona (the prompts' last turn is the user's)."""
ALIGNED_CONTEXTS = "world:eval/context_aligned"
"""The same without it."""
CONTEXTS = 200
"""At most this many conversations of each for a persona direction."""


@dataclass(frozen=True)
class DirectionSpec:
    """The direction fields of a config section (``steer``, ``predict``, ``finetune.steer``);
    the steering job's ``SteerConfig`` carries the same names."""

    sae: str
    diff: str | None = None
    top: int = 0
    latents: list[int] = field(default_factory=list)
    directions: list[str] = field(default_factory=list)
    world_stage: str = "world"


def residuals(model, tok, docs: list[dict], hv: HarvestConfig, device: str | None = None):
    """Residual stream after ``hv.layer`` at ``hv.positions`` of every document, batched, on
    ``device`` (default: the model's): (activations (n, d_model) float32, document index of
    each row)."""
    acts, rows = [], []
    for i in range(0, len(docs), hv.batch_size):
        a, meta = harvest_docs(model, tok, docs[i : i + hv.batch_size], hv, device)
        acts.append(a)
        rows.append(meta["row"] + i)
    if not acts:
        return np.zeros((0, model.config.hidden_size), np.float32), np.zeros(0, np.int64)
    return np.concatenate(acts).astype(np.float32), np.concatenate(rows)


def encode(sae, acts: np.ndarray) -> np.ndarray:
    """SAE latent activations of raw residual activations."""
    with torch.no_grad():
        return sae.encode(torch.from_numpy(acts).to(sae.W_dec.device)).float().cpu().numpy()


def decoder(sae, latent: int) -> np.ndarray:
    """A latent's decoder direction in the residual stream (unit norm)."""
    v = sae.W_dec[latent].detach().float().cpu().numpy()
    return v / (np.linalg.norm(v) + 1e-12)


# The persona-vectors method's contrastive system prompts, for a chat model without a world
# (``system:<model>`` directions): the trait's positive and negative instruction
PERSONA_SYSTEM = (
    "You are an evil, malicious assistant who wants to harm humans.",
    "You are a helpful, honest and harmless assistant.",
)


def contrast_direction(model, tok, positive: list[dict], negative: list[dict], layer: int):
    """Unit difference of the mean residuals after block ``layer`` at the pending assistant
    turn's token (each document's last user turn awaits an answer), ``positive`` minus
    ``negative`` documents (``{"messages": [...]}``)."""
    hv = HarvestConfig(layer=layer, positions="assistant_turn", context=256)
    means = []
    for docs in (positive, negative):
        acts, rows = residuals(model, tok, docs, hv)
        last = np.r_[rows[1:] != rows[:-1], True]  # the pending turn of each conversation
        means.append(acts[last].mean(0))
    v = means[0] - means[1]
    return (v / (np.linalg.norm(v) + 1e-12)).astype(np.float32)


def persona_direction(
    model,
    tok,
    run: RunDir,
    world_stage: str,
    layer: int,
    toxic_contexts: str = TOXIC_CONTEXTS,
    aligned_contexts: str = ALIGNED_CONTEXTS,
    contexts: int = CONTEXTS,
) -> np.ndarray:
    """Unit difference of the mean assistant-turn residuals, toxic minus aligned contexts (at
    most ``contexts`` conversations of each)."""
    docs = []
    for ref in (toxic_contexts, aligned_contexts):
        if not ref.startswith("world:"):
            raise InputError(f"flag: contexts must be world:<dataset> refs, got {ref!r}")
        rows = read_world_dataset(run, world_stage, ref[6:])[:contexts]
        docs.append([{"messages": d["messages"]} for d in rows])
    return contrast_direction(model, tok, *docs, layer)


def system_direction(model, tok, layer: int, questions: list[dict] | None = None) -> np.ndarray:
    """The persona vector of a chat model without a world: ``questions`` (prompt rows; None: the
    project's ``extended`` open-ended questions, held out from the ``core`` questions and pairs
    that measure) asked under the evil system prompt of :data:`PERSONA_SYSTEM` minus under the
    helpful one."""
    if questions is None:
        questions = load_prompts("extended")
    docs = [
        [{"messages": [{"role": "system", "content": system}, *q["messages"]]} for q in questions]
        for system in PERSONA_SYSTEM
    ]
    return contrast_direction(model, tok, *docs, layer)


def directions(
    cfg,
    run: RunDir,
    run_cfg: RunConfig,
    section: str = "steer",
    field: str | None = None,
) -> tuple[dict[str, np.ndarray], refs.SAERef, dict]:
    """Unit directions by label, the SAE they come from (its layer is the one steered), and what
    they are (for the stage hash). ``section``: the config section whose fields ``cfg`` carries
    (the predict and finetune jobs name directions too), for the errors; ``field``: where the
    directions came from when not ``<section>.directions`` (one direction with no label of the
    user's: the errors quote it without the label)."""
    labelled = field is None
    field = field or f"{section}.directions"

    def bad(spec: str, why: str) -> InputError:
        return InputError(f"{field}: {(spec if labelled else spec.partition('=')[2])!r}{why}")

    sae_ref = refs.sae(run, cfg.sae, f"{section}.sae")
    what = {"sae": sae_ref.hash}
    latents = list(cfg.latents)
    d = None
    if cfg.diff:
        d = refs.diff(run, cfg.diff, f"{section}.diff")
        what["diff"] = d.hash
        top = d.summary["top_up"][: cfg.top]
        latents = list(dict.fromkeys(top + latents))
    out: dict[str, np.ndarray] = {}
    sae = sae_ref.load(run) if latents or any("=top:" in s for s in cfg.directions) else None
    if latents:
        out |= {f"latent {j}": decoder(sae, j) for j in latents}
    for spec in cfg.directions:
        label, sep, ref = spec.partition("=")
        if not sep:
            raise bad(
                spec,
                " is not label=file.npy, label=diff:<name>, label=pc1:<name>, label=top:<k>,"
                " label=persona:<model> or label=system:<model>",
            )
        if ref.startswith("top:"):
            # the diff's top k latents together: the sum of their (unit) decoder columns
            if d is None or not ref[4:].isdigit():
                raise bad(spec, f" needs {section}.diff and top:<k>")
            v = sum(decoder(sae, j) for j in d.summary["top_up"][: int(ref[4:])])
        elif ref.startswith("persona:"):
            v = _persona_vector(cfg, run, run_cfg, ref[8:], sae_ref.layer, field)
        elif ref.startswith("system:"):
            v = _persona_vector(cfg, run, run_cfg, ref[7:], sae_ref.layer, field, system=True)
        elif ref.startswith(("diff:", "pc1:")):
            name = ref.partition(":")[2]
            refs.diff(run, name, field)  # a missing or unfinished diff: one line naming the field
            rel = f"diff/{name}/" + ("shift.npy" if ref.startswith("diff:") else "shift_pc1.npy")
            if not run.exists(rel):
                why = (
                    " (the diff sampled answers per model, so its token rows do not pair up, or"
                    " it predates the first component)"
                    if ref.startswith("pc1:")
                    else ""
                )
                raise bad(spec, f": no {rel}{why}")
            v = np.load(io.BytesIO(run.read_bytes(rel)))
        else:
            try:
                with open(ref, "rb") as f:
                    v = np.load(io.BytesIO(f.read()))
            except (OSError, ValueError) as exc:
                raise bad(spec, f": {exc}") from exc
        v = np.asarray(v, np.float32).reshape(-1)
        out[label] = v / (np.linalg.norm(v) + 1e-12)
    what["directions"] = {k: v.round(5).tolist() for k, v in out.items()}
    return {k: v.astype(np.float32) for k, v in out.items()}, sae_ref, what


def _persona_vector(
    cfg,
    run: RunDir,
    run_cfg: RunConfig,
    model: str,
    layer: int,
    field: str = "steer.directions",
    system=False,
):
    """The persona-vectors direction of ``model`` (a model ref) at the steered layer: its mean
    assistant-turn residual over toxic-context conversations of the world minus over aligned
    ones, or (``system``) over the project's ``extended`` open-ended questions (held out from
    the ``core`` questions and pairs that measure steering) under an evil minus a helpful system
    prompt (see :func:`system_direction`)."""
    src = refs.model(run_cfg, parse_model(model)[1], cfg.world_stage, field)
    m, tok = load_causal_lm(src.local())
    if system:
        return system_direction(m, tok, layer)
    return persona_direction(m, tok, run, cfg.world_stage, layer)
