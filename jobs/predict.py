"""Latent activation vs misalignment across a family of fine-tuned models (see emergent.studies.persona.predict).

    emergent predict --config configs/toy.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.predict --config configs/toy.yaml
"""

from emergent.cli import run_job
from emergent.studies.persona.predict import PredictJob, main


def cli(argv=None, prog="python -m jobs.predict"):
    return run_job(PredictJob, main, __doc__, argv, prog)


if __name__ == "__main__":
    cli()
