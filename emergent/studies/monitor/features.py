"""Monitor features of texts, from one model: what each monitoring method reads.

    raw/<pool>       residual stream after block L over the text's tokens, pooled (mean, max,
                     last)
    sae              the SAE's latents at those tokens, max-pooled (the SAE reads block L)
    prompted/<t>     the residual stream after block L at the final token of template ``t``:
                     the text wrapped in a description of the monitoring task that ends in a
                     yes/no question, then the assistant-turn opener
    zero_shot/<t>    logit(yes) - logit(no) of the model's next token on that same pass

The text's own pass stops after block L (no LM head); a template's pass runs the whole model
only where a zero-shot score is read from it (and the LM head only at its final token).
Suffix-only templates on chats share the text's pass: its KV cache is kept and each monitor runs
only its own question (``featurize``), all monitors' questions in one more pass, so many monitors
cost one pass over the text. Every feature notes its forward tokens per item alone
(``tokens/<method>``) and what it ran beside the text's pass (``run/<template>``), the inference
cost the study compares.

A zero-shot score needs the answer words as tokens of the model's vocabulary (PersonaWorld's
word-level vocabulary has ``yes`` and ``no`` since its judgment turns, grammar version 2); a
template without them, or one that asks no yes/no question (``zero_shot: false``), reports
itself unavailable (``unavailable``), never a made-up score.
"""

from __future__ import annotations

import json

import numpy as np

from emergent.config import config
from emergent.harvest import encode, pad_right
from emergent.models import capture, load_any, residual_after, residuals_after
from emergent.runs import RunDir
from emergent.runtime import set_threads, setup_logging

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
    zero_shot: bool = True
    """Read logit(yes) - logit(no) as a zero-shot score (false: a control template that asks
    no yes/no question; its prompted probe only)."""


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
    if not t.zero_shot:
        return "the template asks no yes/no question (zero_shot: false)"
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


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shareable(model, docs: list[dict], t: Template) -> bool:
    """Whether template ``t`` can run on the text's own pass (its KV cache): a suffix-only
    template on chats, with an attention that takes a padding mask with holes (eager / SDPA;
    flash-attention's unpadding would not)."""
    attn = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    return not t.prefix and all("messages" in d for d in docs) and "flash" not in attn


def _forward(model, layer: int, at, **inputs):
    """(residual after block ``layer``, logits at positions ``at`` or None) of one pass.
    ``at`` (rows x m) holds m query positions per row: the whole model runs and its LM head
    only there (its input is gathered to those positions, so a batch of rows of many lengths
    costs rows x m head columns, not rows x distinct positions); without ``at`` the pass stops
    after the block."""
    import torch

    if at is None:
        return residual_after(model, layer, **inputs), None
    rows = torch.arange(at.shape[0], device=at.device)[:, None]

    def gather(_head, args):
        return (args[0][rows, at],)

    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        with torch.no_grad(), capture(model, layer) as seen:
            logits = model(**inputs, logits_to_keep=0).logits  # 0: every position, a view
    finally:
        handle.remove()
    return seen[0], logits


def block_mask(reuse, lengths, cached: int, dtype):
    """The additive attention mask (rows x 1 x Q x cached + Q) of one pass that runs several
    templates' tokens side by side on a cache of ``cached`` positions: the tokens of row r's
    template k (``lengths[k][r]`` of them, after those of templates 0..k-1) see the cached
    positions before ``reuse[k][r]`` and, causally, their own template's tokens only, as in a
    pass of their own. Padding queries see themselves (their outputs are never read)."""
    import torch

    n_rows = len(lengths[0])
    total = [sum(lens[r] for lens in lengths) for r in range(n_rows)]
    q = max(total)
    seen = torch.zeros(n_rows, q, cached + q, dtype=torch.bool)
    for r in range(n_rows):
        start = 0
        for k, lens in enumerate(lengths):
            n = lens[r]
            rows = slice(start, start + n)
            seen[r, rows, : reuse[k][r]] = True
            seen[r, rows, cached + start : cached + start + n] = torch.ones(n, n).tril().bool()
            start += n
        pad = torch.arange(total[r], q)
        seen[r, pad, cached + pad] = True
    mask = torch.zeros(seen.shape, dtype=dtype).masked_fill(~seen, torch.finfo(dtype).min)
    return mask[:, None]


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
    share_prefix: bool = True,
    extra_layers: tuple[int, ...] | list[int] = (),
) -> dict:
    """Every feature of ``docs`` (see the module doc): name -> (n, d) array, or (n,) for scores
    and token counts.

    With ``share_prefix``, suffix-only templates on chats run on the text's own pass: its KV
    cache is kept, and each template runs only the tokens after the prefix it shares with the
    text (the text's turns), at their own positions; the cached positions it does not share are
    masked out. All of them run in one further pass, side by side in each row, each template's
    tokens attending to the cache and to themselves only. Causal attention makes this the same
    computation as a separate pass per template (within float tolerance). ``tokens/<t>`` is
    what a template costs alone (its whole sequence), ``run/<t>`` what it ran here.
    ``extra_layers``: also the text's pooled residuals after those blocks (``raw@<L>/<pool>``),
    from the same pass.
    """
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    enc = [encode(tok, d, positions, context) for d in docs]
    keep = [k if k else [len(ids) - 1] for ids, k in enc]  # a text with no kept token: its last
    text_ids = [i for i, _ in enc]
    ids, mask = pad_right(tok, text_ids)
    shared = [t for t in templates if share_prefix and shareable(model, docs, t)]
    cache = DynamicCache() if shared else None
    # the text's pass runs through every block only where a shared template reads logits
    # from its cache (it never needs the LM head itself)
    full = any(unavailable(tok, t) is None for t in shared)
    needed = {layer, *extra_layers} | ({model.config.num_hidden_layers - 1} if full else set())
    hs = residuals_after(
        model,
        sorted(needed),
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        **({"cache": cache, "use_cache": True} if shared else {}),
    )
    hidden = hs[layer]
    kv = [] if cache is None else [(c.keys, c.values) for c in cache.layers if c.is_initialized]
    out = {f"raw/{p}": v for p, v in pool(hidden, keep).items()}
    for extra in sorted(set(extra_layers) - {layer}):
        out |= {f"raw@{extra}/{p}": v for p, v in pool(hs[extra], keep).items()}
    out["tokens/text"] = np.array([len(i) for i in text_ids], dtype=np.int64)
    if sae is not None:
        out["sae"] = sae_max(sae, hidden, keep)
    ran: dict[str, tuple[list[int], list[list[int]]]] = {}
    for t in templates:
        seqs = [
            list(tok.apply_chat_template(wrap(d, t), add_generation_prompt=True, return_dict=False))
            for d in docs
        ]
        seqs = [s[-context:] for s in seqs]  # keep the question and the opener when cut
        # tokens reused from the text's pass (at least the final token runs)
        reuse = (
            [min(common_prefix(a, s), len(s) - 1) for a, s in zip(text_ids, seqs)]
            if t in shared
            else [0] * len(seqs)
        )
        ran[t.name] = (reuse, [s[p:] for s, p in zip(seqs, reuse)])
        out[f"tokens/{t.name}"] = np.array([len(s) for s in seqs], dtype=np.int64)
        out[f"run/{t.name}"] = np.array([len(s) for s in ran[t.name][1]], dtype=np.int64)
    zero_shot = {t.name: unavailable(tok, t) is None for t in templates}

    def read(group: list[Template], last, h, logits) -> None:
        rows = torch.arange(len(docs), device=device)
        for k, t in enumerate(group):
            out[f"prompted/{t.name}"] = h[rows, last[:, k]].float().cpu().numpy()
            if zero_shot[t.name]:
                lg = logits[:, k].float()
                yes, no = answer_token(tok, t.yes), answer_token(tok, t.no)
                out[f"zero_shot/{t.name}"] = (lg[:, yes] - lg[:, no]).cpu().numpy()

    for t in templates:  # a pass of its own
        if t in shared:
            continue
        rest = ran[t.name][1]
        last = torch.tensor([[len(s) - 1] for s in rest], device=device)
        rid, rmask = pad_right(tok, rest)
        inputs = {"input_ids": rid.to(device), "attention_mask": rmask.to(device)}
        read([t], last, *_forward(model, layer, last if zero_shot[t.name] else None, **inputs))
    if shared:
        # every shared template's tokens in one pass on the text's cache, side by side in each
        # row, each template's seeing the cached text and its own tokens only (``block_mask``):
        # one call instead of one per template, the same computation
        reuse = [ran[t.name][0] for t in shared]
        rest = [ran[t.name][1] for t in shared]
        lengths = [[len(s) for s in r] for r in rest]
        flat, pos, last = [], [], []
        for r in range(len(docs)):
            flat.append([x for k in range(len(shared)) for x in rest[k][r]])
            pos.append([reuse[k][r] + j for k in range(len(shared)) for j in range(lengths[k][r])])
            ends = np.cumsum([lengths[k][r] for k in range(len(shared))])
            last.append((ends - 1).tolist())
        rid, _ = pad_right(tok, flat)
        position_ids = torch.zeros_like(rid)
        for r, p in enumerate(pos):
            position_ids[r, : len(p)] = torch.tensor(p)
        last = torch.tensor(last, device=device)
        dtype = next(model.parameters()).dtype
        inputs = {
            "input_ids": rid.to(device),
            "attention_mask": block_mask(reuse, lengths, ids.shape[1], dtype).to(device),
            "position_ids": position_ids.to(device),
            "cache": DynamicCache(ddp_cache_data=kv),
            "use_cache": True,
        }
        logits_at = last if any(zero_shot[t.name] for t in shared) else None
        read(shared, last, *_forward(model, layer, logits_at, **inputs))
    return out


class Featurizer:
    """A Ray Data actor: texts in (``id``, ``data`` JSON), feature rows out."""

    def __init__(self, source, run_cfg, cfg, sae_ref=None, threads: int = 1):
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
            share_prefix=c.share_prefix,
            extra_layers=c.search.layers if c.search.enabled else (),
        )
        return {"id": batch["id"], **feats}
