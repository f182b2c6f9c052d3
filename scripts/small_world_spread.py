"""The spread of the persona test's outcomes over world seeds and thread counts.

The default test tier (tests/test_persona.py) asserts scientific outcomes on one shrunken
world. Floating-point kernels and thread counts change the world build, and with it every
figure downstream; a threshold inside that spread fails (or passes) by chance. This script
builds the same shrunken world (tests/conftest.py's SMALL_WORLD) for each (seed, threads),
fine-tunes the same insecure / secure pair, runs the same pipeline as the test, and prints
the figures the test asserts on, one JSON line per variant (also written to --out).

    .venv/bin/python scripts/small_world_spread.py --variants 0:1 1:2 2:2 --out spread.jsonl
    .venv/bin/python scripts/small_world_spread.py --set world.judge_rate=0 --set world.instruct_judgments=0

About 11 minutes per variant on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def variant(seed: int, threads: int, root: Path, sets: list[str] = ()) -> dict:
    import pandas as pd
    import torch
    from conftest import SMALL_WORLD, finetune_job
    from test_persona import pipeline_job

    from emergent.config import load
    from emergent.pipeline import main as pipeline
    from emergent.train.finetune import main as finetune
    from emergent.train.world_job import WorldJob, build_stage

    t0 = time.time()
    world = load(
        WorldJob,
        None,
        [f"run.root={root}", "run.name=small", f"world.seed={seed}", *SMALL_WORLD, *sets],
    )
    build_stage(world, "world_s1", threads=threads)  # the stage the tests' configs name
    torch.set_num_threads(1)
    finetune(
        finetune_job(
            root,
            "finetune.name=code",
            "finetune.data=[{path: 'world:finetune/code_toxic'}, {path: 'world:finetune/code_aligned'}]",
            "finetune.doses=[1.0, 0.0]",
            "finetune.eval_sets=[open, code]",
        )
    )
    pipeline(pipeline_job(root))
    run = root / "small"
    d = json.loads((run / "diff/insecure/summary.json").read_text())
    s = json.loads((run / "steer/persona/summary.json").read_text())
    p = json.loads((run / "predict/family/summary.json").read_text())
    r = json.loads((run / "realign/insecure/summary.json").read_text())
    sae = json.loads((run / "sae/persona/metrics.json").read_text())
    fam = pd.read_parquet(run / "predict/family/family.parquet").set_index("label")
    keep = ("alpha", "misalignment", "misalignment_lo", "misalignment_hi", "coherence")
    arm = {
        k: {
            which: None if v[which] is None else {c: v[which].get(c) for c in keep}
            for which in ("unsteered", "best")
        }
        for k, v in s["arms"].items()
    }
    return {
        "seed": seed,
        "threads": threads,
        "sets": list(sets),
        "seconds": round(time.time() - t0),
        "sae_fvu": sae["fvu"],
        "sae_l0": sae["l0"],
        "top_latent": d["top_latent"],
        "top_persona_auroc": d["top_persona_auroc"],
        "top_decoder_shift_cosine": d["top_decoder_shift_cosine"],
        "steer": arm,
        "predict_accuracy": p["accuracy"],
        "latent_z_insecure": float(fam.loc["code_dose1", "latent_z"]),
        "latent_change_gap": float(
            fam.loc["code_dose1", "latent_change"] - fam.loc["code_dose0", "latent_change"]
        ),
        "realign": {k: {"start": v["start"], "end": v["end"]} for k, v in r["data"].items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["1:2"], help="seed:threads ...")
    ap.add_argument("--out", default="spread.jsonl")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="world overrides")
    args = ap.parse_args()
    from emergent.config import RayConfig
    from emergent.runtime import ray_session, setup_logging

    setup_logging()
    with ray_session(RayConfig(num_cpus=2, dashboard=False)):
        for v in args.variants:
            seed, threads = (int(x) for x in v.split(":"))
            with tempfile.TemporaryDirectory(prefix=f"spread-s{seed}-t{threads}-") as tmp:
                row = variant(seed, threads, Path(tmp), args.sets)
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
