"""Held-out metrics of a saved SAE (FVU, L0, dead and dense fractions, CE increase with the
reconstruction spliced into the model against zero-ablation) and its top-activating examples."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from emergent.harvest import HarvestConfig, encode, harvest_encoded, pad_right
from emergent.models import edit_residual, load_any
from emergent.refs import ModelSource
from emergent.runs import RunDir
from emergent.runtime import set_threads, setup_logging
from emergent.sae.model import load_sae


def evaluate_sae(sae_dir: str, source: ModelSource, hv: HarvestConfig, docs: list[dict], top: int):
    """Held-out metrics of a saved SAE, and its top-activating examples (a DataFrame).

    Accumulated batch by batch: sums for FVU and L0, per-latent firing counts and a running
    top-``top`` per latent, so memory stays at one batch plus ``top`` x d_sae (never the dense
    N x d_sae features, GBs for a wide SAE on a big held-out set). Runs where it is called: the
    train-sae job calls it in a Ray task (``evaluate_task``), off the driver."""
    import pandas as pd
    import torch

    model, tok = load_any(source.local())
    device = next(model.parameters()).device
    sae = load_sae(sae_dir).to(device)
    n, l0, err = 0, 0.0, 0.0
    sum_x = sum_sq = fired = None
    best_v = best_i = None  # (k, d_sae): the running top activations and their row numbers
    meta_all = {"row": [], "pos": [], "token": []}
    ce = {"clean": [], "spliced": [], "zero": []}
    causal = model.get_output_embeddings() is not None
    enc = [encode(tok, d, hv.positions, hv.context) for d in docs]  # once: acts, CE, contexts
    for i in range(0, len(docs), hv.batch_size):
        chunk = enc[i : i + hv.batch_size]
        a, meta = harvest_encoded(model, tok, chunk, dataclasses.replace(hv, dtype="float32"))
        for k in meta_all:
            meta_all[k].append(meta[k] + (i if k == "row" else 0))
        if causal and len(meta["pos"]):
            for mode, value in _ce(
                model, tok, [ids for ids, _ in chunk], hv.layer, sae, meta
            ).items():
                ce[mode].append(value)
        if not len(a):
            continue
        x = torch.from_numpy(a).to(device)
        with torch.no_grad():
            f = sae.encode(x)
            recon = sae.decode(f)
        x64 = x.double()
        err += float(((x - recon) ** 2).double().sum())
        sum_x = x64.sum(0) if sum_x is None else sum_x + x64.sum(0)
        sum_sq = float((x64**2).sum()) + (sum_sq or 0.0)
        active = f > 0
        l0 += float(active.sum())
        fired = active.sum(0) if fired is None else fired + active.sum(0)
        rows = torch.arange(n, n + len(f), device=device).unsqueeze(1).expand(-1, f.shape[1])
        cand_v = f if best_v is None else torch.cat([best_v, f])
        cand_i = rows if best_i is None else torch.cat([best_i, rows])
        best_v, at = torch.topk(cand_v, min(top, len(cand_v)), dim=0)
        best_i = torch.gather(cand_i, 0, at)
        n += len(f)
    if n == 0:
        raise ValueError("evaluate_sae: no activations in the held-out documents")
    total = sum_sq - float((sum_x**2).sum()) / n  # sum of squared deviations from the mean
    freq = fired.double() / n
    metrics = {
        "tokens": n,
        "fvu": err / total,
        "l0": l0 / n,
        "dead_fraction": float((freq == 0).double().mean()),
        "dense_fraction": float((freq > 0.1).double().mean()),
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
    vals, idx = best_v.cpu(), best_i.cpu()
    ex = []
    for latent in range(vals.shape[1]):
        for r in range(vals.shape[0]):
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


def evaluate_task(root: str, run_name: str, sae_rel: str, source, hv, docs, top: int, threads: int):
    """``evaluate_sae`` as a Ray task: the SAE fetched from the run where the task runs (a
    KubeRay head has no CPUs to spare and the driver should not hold a model)."""
    setup_logging()
    set_threads(threads)
    sae_dir = str(RunDir(root, run_name).local_dir(sae_rel))
    return evaluate_sae(sae_dir, source, hv, docs, top)


def _context(tok, ids: list[int], pos: int, before: int = 12, after: int = 3) -> str:
    left = tok.convert_ids_to_tokens(ids[max(0, pos - before) : pos])
    here = tok.convert_ids_to_tokens(ids[pos])
    right = tok.convert_ids_to_tokens(ids[pos + 1 : pos + 1 + after])
    return " ".join([*left, f"[[{here}]]", *right])


def _ce(model, tok, seqs: list[list[int]], layer: int, sae, meta) -> dict[str, tuple[float, int]]:
    """(summed next-token CE, predicted tokens) with the residual after ``layer`` at the kept
    positions left alone (``clean``), replaced by the SAE reconstruction (``spliced``), or
    zeroed (``zero``)."""
    import torch

    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in pad_right(tok, seqs))
    rows = torch.as_tensor(meta["row"], device=device)
    pos = torch.as_tensor(meta["pos"], device=device)
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
