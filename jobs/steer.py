"""Steering on Ray Tune, strengths searched or fixed, judged (see emergent.studies.persona.steering).

    emergent steer --config configs/toy.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.steer --config configs/toy.yaml
"""

from emergent.cli import run_job
from emergent.studies.persona.steering import SteerJob, main


def cli(argv=None, prog="python -m jobs.steer"):
    return run_job(SteerJob, main, __doc__, argv, prog)


if __name__ == "__main__":
    cli()
