"""Build PersonaWorld and its tiny base model into <run>/world/ (see emergent.train.world_job).

    emergent world --config configs/toy.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.world --config configs/toy.yaml
"""

from emergent.cli import run_job
from emergent.train.world_job import WorldJob, main


def cli(argv=None, prog="python -m jobs.world"):
    return run_job(WorldJob, main, __doc__, argv, prog)


if __name__ == "__main__":
    cli()
