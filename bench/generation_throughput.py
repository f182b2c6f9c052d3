"""Generation throughput: the ``evaluate`` job's Ray Data path against a plain sequential HF
``generate`` loop, same model, prompts, sampling parameters and batch size.

    python bench/generation_throughput.py                       # world of runs/toy (stage world)
    python bench/generation_throughput.py --run-name toy --world-stage world_s0 --prompts 4000

Needs a built world (``emergent world --config configs/toy.yaml``). Prints generated tokens/s of:
  plain-T    batched ``generate`` over every prompt in this process with T torch threads (the
             baseline: T = --cpus, all of the machine)
  ray-AxT    the Ray Data actor pool (emergent.evaluate.generate): A actors x T threads each,
             wall time including actor start and model loading
Ratios are against the plain baseline measured in the same run. On a GPU cluster the same
comparison holds per GPU; the Ray path's point is scaling out over actors and nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def prompt_rows(args) -> list[dict]:
    from emergent.evaluate import EvaluateConfig, prompt_rows
    from emergent.runs import RunDir

    cfg = EvaluateConfig(
        prompts=[f"world:eval/{s}" for s in ("open", "health", "finance", "legal", "auto", "code")],
        world_stage=args.world_stage,
    )
    rows = prompt_rows(cfg, RunDir(args.run_root, args.run_name))
    rows = (rows * (args.prompts // len(rows) + 1))[: args.prompts]
    return [dict(r, seed=i) for i, r in enumerate(rows)]


def plain(path: str, rows: list[dict], args, threads: int) -> dict:
    import torch

    from emergent.generate import SamplingParams, chat_prompts, sample_counted
    from emergent.models import load_causal_lm

    torch.set_num_threads(threads)
    t0 = time.time()
    model, tok = load_causal_lm(path)
    prompts = chat_prompts(tok, [json.loads(r["messages"]) for r in rows])
    params = SamplingParams(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    t1 = time.time()
    _, counts = sample_counted(model, tok, prompts, params)
    return {"tokens": sum(counts), "loop_s": time.time() - t1, "total_s": time.time() - t0}


def ray_path(path: str, rows: list[dict], args, actors: int, threads: int) -> dict:
    from emergent.evaluate import EvaluateConfig, generate
    from emergent.generate import SamplingParams
    from emergent.refs import ModelSource

    cfg = EvaluateConfig(
        actors=actors,
        cpus_per_actor=threads,
        sampling=SamplingParams(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size),
    )
    t0 = time.time()
    out = generate(rows, ModelSource(path, "bench"), cfg)
    total = time.time() - t0
    return {"tokens": int(sum(int(r["answer_tokens"]) for r in out)), "total_s": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run-root", default="runs")
    ap.add_argument("--run-name", default="toy")
    ap.add_argument("--world-stage", default="world")
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray

    from emergent.runs import RunDir
    from emergent.runtime import setup_logging

    setup_logging()
    run = RunDir(os.path.abspath(args.run_root), args.run_name)
    path = str(run.local_dir(f"{args.world_stage}/base"))
    rows = prompt_rows(args)
    results = {f"plain-{args.cpus}": plain(path, rows, args, args.cpus)}
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False)
    try:
        results[f"ray-{args.cpus}x1"] = ray_path(path, rows, args, args.cpus, 1)
        results[f"ray-1x{args.cpus}"] = ray_path(path, rows, args, 1, args.cpus)
    finally:
        ray.shutdown()
    base = results[f"plain-{args.cpus}"]
    base_rate = base["tokens"] / base["total_s"]
    print(f"\n{len(rows)} prompts, max {args.max_new_tokens} new tokens, batch {args.batch_size}")
    print(f"{'path':<12} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'vs plain':>9}")
    for name, r in results.items():
        rate = r["tokens"] / r["total_s"]
        print(
            f"{name:<12} {r['tokens']:>8} {r['total_s']:>8.1f} {rate:>9.0f} {rate / base_rate:>9.2f}"
        )
    print(
        f"(plain generate loop alone: {base['tokens'] / base['loop_s']:.0f} tokens/s; "
        "times above include model loading, and actor start for Ray)"
    )


if __name__ == "__main__":
    main()
