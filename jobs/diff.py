"""Model diffing: rank SAE latents by activation change from a base to a fine-tuned model (see emergent.studies.persona.diffing).

    emergent diff --config configs/toy.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.diff --config configs/toy.yaml
"""

from emergent.cli import run_job
from emergent.studies.persona.diffing import DiffJob, main


def cli(argv=None, prog="python -m jobs.diff"):
    return run_job(DiffJob, main, __doc__, argv, prog)


if __name__ == "__main__":
    cli()
