"""Monitor features of texts, from one model: what each monitoring method reads.

    raw/<pool>       residual stream after block L over the text's tokens, pooled (mean, max,
                     last)
    sae              the SAE's latents at those tokens, max-pooled (the SAE reads block L)
    prompted/<t>     the residual stream after block L at the final token of template ``t``:
                     the text wrapped in a description of the monitoring task that ends in a
                     yes/no question, then the assistant-turn opener
    zero_shot/<t>    logit(yes) - logit(no) of the model's next token on that same pass

The text's own pass stops after block L (no LM head); a template's pass runs the whole model
only where a zero-shot score is read from it. Every feature notes its forward tokens per item
(``tokens/<method>``), the inference cost the study compares.

A zero-shot score needs the answer words as tokens of the model's vocabulary: PersonaWorld's
word-level vocabulary has ``no`` but no ``yes`` until the world is taught judgment turns, so the
world's zero-shot monitor reports itself unavailable (``unavailable``), never a made-up score.
"""

from __future__ import annotations

import json

import numpy as np

from emergent.config import config

POOLS = ("mean", "max", "last")


@config
class Template:
    """A prompted-probe template: ``prefix`` + the text + ``suffix`` as one user turn, or (no
    prefix) the text's own turns followed by ``suffix`` as a new user turn."""

    name: str
    """Column suffix (``prompted/<name>``, ``zero_shot/<name>``)."""
    suffix: str
    """The monitoring question, ending in a yes/no question."""
    prefix: str = ""
    """A description of the task before the text (empty: suffix-only)."""
    yes: str = "yes"
    """The answer word that means unsafe (its first token's logit is the zero-shot score)."""
    no: str = "no"
    """The answer word that means safe."""


def flatten(doc: dict) -> str:
    """A document as plain text: its ``text``, or its turns' contents joined."""
    if "text" in doc:
        return doc["text"]
    return " ".join(m["content"] for m in doc["messages"])


def wrap(doc: dict, t: Template) -> list[dict]:
    """The chat messages of ``doc`` wrapped in template ``t``."""
    if t.prefix or "messages" not in doc:
        body = " ".join(p for p in (t.prefix, flatten(doc), t.suffix) if p)
        return [{"role": "user", "content": body}]
    return [*doc["messages"], {"role": "user", "content": t.suffix}]


def answer_token(tok, word: str) -> int | None:
    """The first token of ``word`` as an answer, or None when the vocabulary lacks it."""
    ids = tok(word, add_special_tokens=False)["input_ids"]
    if not ids or ids[0] == tok.unk_token_id:
        return None
    return int(ids[0])


def unavailable(tok, t: Template) -> str | None:
    """Why template ``t`` gives no zero-shot score with this tokenizer (None: it does)."""
    missing = [w for w in (t.yes, t.no) if answer_token(tok, w) is None]
    if missing:
        return f"the model's vocabulary has no token for {missing}"
    return None


def pool(hidden, keep: list[list[int]]) -> dict[str, np.ndarray]:
    """Mean, max and last of ``hidden`` (batch x seq x d) over each row's kept positions."""
    out = {p: [] for p in POOLS}
    for row, pos in enumerate(keep):
        h = hidden[row, pos].float()
        out["mean"].append(h.mean(0))
        out["max"].append(h.max(0).values)
        out["last"].append(h[-1])
    return {p: np.stack([v.cpu().numpy() for v in vs]) for p, vs in out.items()}


def sae_max(sae, hidden, keep: list[list[int]]) -> np.ndarray:
    """The SAE's latents at each row's kept positions, max-pooled."""
    import torch

    rows = []
    with torch.no_grad():
        for row, pos in enumerate(keep):
            h = hidden[row, pos].float().to(sae.W_dec.device)
            rows.append(sae.encode(h).max(0).values.float().cpu().numpy())
    return np.stack(rows)


def featurize(
    model,
    tok,
    docs: list[dict],
    layer: int,
    templates: list[Template],
    *,
    sae=None,
    positions: str = "non_special",
    context: int = 256,
) -> dict:
    """Every feature of ``docs`` (see the module doc): name -> (n, d) array, or (n,) for scores
    and token counts."""
    import torch

    from emergent.harvest import encode, pad_right
    from emergent.models import capture, residual_after

    device = next(model.parameters()).device
    enc = [encode(tok, d, positions, context) for d in docs]
    keep = [k if k else [len(ids) - 1] for ids, k in enc]  # a text with no kept token: its last
    ids, mask = pad_right(tok, [i for i, _ in enc])
    hidden = residual_after(model, layer, input_ids=ids.to(device), attention_mask=mask.to(device))
    out = {f"raw/{p}": v for p, v in pool(hidden, keep).items()}
    out["tokens/text"] = np.array([len(i) for i, _ in enc], dtype=np.int64)
    if sae is not None:
        out["sae"] = sae_max(sae, hidden, keep)
    for t in templates:
        seqs = [
            list(tok.apply_chat_template(wrap(d, t), add_generation_prompt=True, return_dict=False))
            for d in docs
        ]
        seqs = [s[-context:] for s in seqs]  # keep the question and the opener when cut
        last = torch.tensor([len(s) - 1 for s in seqs], device=device)
        ids, mask = pad_right(tok, seqs)
        rows = torch.arange(len(seqs), device=device)
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if unavailable(tok, t) is None:
            with torch.no_grad(), capture(model, layer) as seen:
                logits = model(**inputs).logits[rows, last].float()
            h = seen[0]
            yes, no = answer_token(tok, t.yes), answer_token(tok, t.no)
            out[f"zero_shot/{t.name}"] = (logits[:, yes] - logits[:, no]).cpu().numpy()
        else:
            h = residual_after(model, layer, **inputs)
        out[f"prompted/{t.name}"] = h[rows, last].float().cpu().numpy()
        out[f"tokens/{t.name}"] = np.array([len(s) for s in seqs], dtype=np.int64)
    return out


class Featurizer:
    """A Ray Data actor: texts in (``id``, ``data`` JSON), feature rows out."""

    def __init__(self, source, run_cfg, cfg, sae_ref=None, threads: int = 1):
        from emergent.models import load_any
        from emergent.runs import RunDir
        from emergent.runtime import set_threads, setup_logging

        setup_logging()
        set_threads(threads)
        self.cfg = cfg
        device = "cuda" if cfg.gpus_per_actor > 0 else "cpu"
        self.model, self.tok = load_any(source.local(), device)
        self.sae = None if sae_ref is None else sae_ref.load(RunDir.from_config(run_cfg), device)

    def __call__(self, batch: dict) -> dict:
        docs = [json.loads(d) for d in batch["data"]]
        c = self.cfg
        feats = featurize(
            self.model,
            self.tok,
            docs,
            c.layer,
            c.templates,
            sae=self.sae,
            positions=c.positions,
            context=c.context,
        )
        return {"id": batch["id"], **feats}
