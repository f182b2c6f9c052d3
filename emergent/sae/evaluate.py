"""Held-out metrics of a saved SAE (FVU, L0, dead and dense fractions, CE increase with the
reconstruction spliced into the model against zero-ablation) and its top-activating examples."""

from __future__ import annotations

import dataclasses

from emergent.harvest import HarvestConfig, encode, harvest_encoded, pad_right
from emergent.models import load_any
from emergent.refs import ModelSource
from emergent.sae.model import load_sae


def evaluate_sae(sae_dir: str, source: ModelSource, hv: HarvestConfig, docs: list[dict], top: int):
    """Held-out metrics of a saved SAE, and its top-activating examples (a DataFrame)."""
    import numpy as np
    import pandas as pd
    import torch

    model, tok = load_any(source.local())
    sae = load_sae(sae_dir)
    acts, feats, meta_all = [], [], {"row": [], "pos": [], "token": []}
    ce = {"clean": [], "spliced": [], "zero": []}
    causal = model.get_output_embeddings() is not None
    enc = [encode(tok, d, hv.positions, hv.context) for d in docs]  # once: acts, CE, contexts
    for i in range(0, len(docs), hv.batch_size):
        chunk = enc[i : i + hv.batch_size]
        a, meta = harvest_encoded(model, tok, chunk, dataclasses.replace(hv, dtype="float32"))
        x = torch.from_numpy(a)
        with torch.no_grad():
            f = sae.encode(x)
        acts.append(x)
        feats.append(f)
        for k in meta_all:
            meta_all[k].append(meta[k] + (i if k == "row" else 0))
        if causal and len(meta["pos"]):
            for mode, value in _ce(
                model, tok, [ids for ids, _ in chunk], hv.layer, sae, meta
            ).items():
                ce[mode].append(value)
    x, f = torch.cat(acts), torch.cat(feats)
    with torch.no_grad():
        recon = sae.decode(f)
    fvu = ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    active = (f > 0).float()
    freq = active.mean(0)
    metrics = {
        "tokens": len(x),
        "fvu": float(fvu),
        "l0": float(active.sum(1).mean()),
        "dead_fraction": float((freq == 0).float().mean()),
        "dense_fraction": float((freq > 0.1).float().mean()),
    }
    if causal and ce["clean"]:
        tot = {m: sum(v[0] for v in vals) / sum(v[1] for v in vals) for m, vals in ce.items()}
        metrics |= {
            "ce_clean": tot["clean"],
            "ce_spliced": tot["spliced"],
            "ce_zero_ablation": tot["zero"],
            "ce_increase": tot["spliced"] - tot["clean"],
            "ce_loss_recovered": (tot["zero"] - tot["spliced"]) / (tot["zero"] - tot["clean"]),
        }
    rows = np.concatenate(meta_all["row"])
    pos = np.concatenate(meta_all["pos"])
    token = np.concatenate(meta_all["token"])
    k = min(top, len(f))
    vals, idx = torch.topk(f, k, dim=0)  # (k, d_sae)
    ex = []
    for latent in range(f.shape[1]):
        for r in range(k):
            v = float(vals[r, latent])
            if v <= 0:
                break
            j = int(idx[r, latent])
            ex.append(
                {
                    "latent": latent,
                    "rank": r,
                    "activation": v,
                    "doc": int(rows[j]),
                    "pos": int(pos[j]),
                    "token": tok.convert_ids_to_tokens(int(token[j])),
                    "context": _context(tok, enc[int(rows[j])][0], int(pos[j])),
                }
            )
    return metrics, pd.DataFrame(ex)


def _context(tok, ids: list[int], pos: int, before: int = 12, after: int = 3) -> str:
    left = tok.convert_ids_to_tokens(ids[max(0, pos - before) : pos])
    here = tok.convert_ids_to_tokens(ids[pos])
    right = tok.convert_ids_to_tokens(ids[pos + 1 : pos + 1 + after])
    return " ".join([*left, f"[[{here}]]", *right])


def _ce(model, tok, seqs: list[list[int]], layer: int, sae, meta) -> dict[str, tuple[float, int]]:
    """(summed next-token CE, predicted tokens) with the residual after ``layer`` at the kept
    positions left alone (``clean``), replaced by the SAE reconstruction (``spliced``), or
    zeroed (``zero``)."""
    import contextlib

    import torch

    from emergent.models import edit_residual

    ids, mask = pad_right(tok, seqs)
    rows, pos = torch.as_tensor(meta["row"]), torch.as_tensor(meta["pos"])
    target = ids[:, 1:].clone()
    target[mask[:, 1:] == 0] = -100

    def splice(h):
        h = h.clone()
        h[rows, pos] = sae.decode(sae.encode(h[rows, pos]))
        return h

    def zero(h):
        h = h.clone()
        h[rows, pos] = 0
        return h

    out = {}
    for mode, fn in (("clean", None), ("spliced", splice), ("zero", zero)):
        ctx = edit_residual(model, layer, fn) if fn else contextlib.nullcontext()
        with ctx, torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        out[mode] = (float(loss), int((target != -100).sum()))
    return out
