"""Residual-stream activations on Ray Data, written as Parquet shards (see emergent.harvest).

    emergent harvest --config configs/toy.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.harvest --config configs/toy.yaml
"""

from emergent.cli import run_job
from emergent.harvest import HarvestJob, main


def cli(argv=None, prog="python -m jobs.harvest"):
    return run_job(HarvestJob, main, __doc__, argv, prog)


if __name__ == "__main__":
    cli()
