"""SFT throughput: the Ray Train ``finetune`` job against plain TRL, same model, data and steps.

    python bench/finetune_throughput.py                       # world of runs/toy (stage world)
    python bench/finetune_throughput.py --run-name toy --world-stage world_s0 --steps 200

Needs a built world (``emergent world --config configs/toy.yaml``). Prints tokens/s of:
  plain      TRL SFTTrainer in this process (``--threads`` torch threads): the baseline
  ray-1      the finetune job, 1 Ray Train worker with the same threads (pure wrapper overhead)
  ray-N      the finetune job, N workers x 1 thread (DDP over gloo), for reference
Training-loop throughput is tokens / trainer.train() seconds; end to end adds model loading,
dataset preparation and, for Ray, worker start-up. Ratios are against the plain baseline
measured in the same run. Goal for ray-1 in the loop: >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def plain(model_path: str, records: list[dict], steps: int, threads: int) -> dict:
    import torch

    from emergent.models import load_causal_lm as load_model
    from emergent.train.sft import SFTParams, sft_trainer

    torch.set_num_threads(threads)
    t0 = time.time()
    model, tok = load_model(model_path)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = sft_trainer(model, tok, records, SFTParams(steps=steps), tmp, use_cpu=True)
        t1 = time.time()
        trainer.train()
        loop = time.time() - t1
    tokens = next(h["num_tokens"] for h in reversed(trainer.state.log_history) if "num_tokens" in h)
    return {"tokens": tokens, "loop_s": loop, "total_s": time.time() - t0}


def ray_job(args, workers: int, threads: int, name: str) -> dict:
    from emergent.config import load
    from emergent.train.finetune import FinetuneJob, main

    cfg = load(
        FinetuneJob,
        None,
        [
            f"run.root={args.run_root}",
            f"run.name={args.run_name}",
            f"ray.num_cpus={max(workers * threads, 1)}",
            f"ray.threads_per_worker={threads}",
            "ray.dashboard=false",
            "run.force=true",
            f"finetune.name=bench/{name}",
            f"finetune.world_stage={args.world_stage}",
            f"finetune.sft.steps={args.steps}",
            f"finetune.workers={workers}",
            f"finetune.cpus_per_worker={threads}",
            "finetune.checkpoint_every=0",
            "finetune.evaluate=false",
            f"finetune.log_every={max(1, args.steps // 20)}",
        ],
    )
    t0 = time.time()
    main(cfg)
    total = time.time() - t0
    stage = os.path.join(args.run_root, args.run_name, "finetune", "bench", name, "train.json")
    stats = json.loads(open(stage).read())
    return {"tokens": stats["tokens"], "loop_s": stats["train_seconds"], "total_s": total}


def run() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run-root", default="runs")
    ap.add_argument("--run-name", default="toy")
    ap.add_argument("--world-stage", default="world")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    args.run_root = os.path.abspath(args.run_root)

    from emergent.refs import read_world_dataset
    from emergent.runs import RunDir
    from emergent.runtime import setup_logging

    setup_logging()
    run = RunDir(args.run_root, args.run_name)
    if not run.exists(f"{args.world_stage}/_COMPLETE.json"):
        raise SystemExit(
            f"no built world at {run.uri(args.world_stage)}: run `emergent world` first"
        )
    records = read_world_dataset(run, args.world_stage, "finetune/code_toxic")
    model_path = str(run.local_dir(f"{args.world_stage}/base"))

    results = {"plain": plain(model_path, records, args.steps, args.threads)}
    results["ray-1"] = ray_job(args, 1, args.threads, "ray1")
    results[f"ray-{args.workers}"] = ray_job(args, args.workers, 1, f"ray{args.workers}")

    base = results["plain"]
    print(f"\nSFT throughput, {args.steps} steps, batch 32, {len(records)} records ({model_path})")
    print(
        f"{'run':<8} {'tokens':>8} {'loop tok/s':>11} {'ratio':>6} {'e2e tok/s':>10} {'ratio':>6}"
    )
    for name, r in results.items():
        loop, e2e = r["tokens"] / r["loop_s"], r["tokens"] / r["total_s"]
        print(
            f"{name:<8} {r['tokens']:>8.0f} {loop:>11,.0f} "
            f"{loop / (base['tokens'] / base['loop_s']):>6.2f} {e2e:>10,.0f} "
            f"{e2e / (base['tokens'] / base['total_s']):>6.2f}"
        )


if __name__ == "__main__":
    run()
