"""Re-alignment: a few benign samples vs misalignment, step by step (see emergent.studies.persona.realign).

    emergent realign --config configs/toy.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.realign --config configs/toy.yaml
"""

from emergent.cli import run_job
from emergent.studies.persona.realign import RealignJob, main


def cli(argv=None, prog="python -m jobs.realign"):
    return run_job(RealignJob, main, __doc__, argv, prog)


if __name__ == "__main__":
    cli()
