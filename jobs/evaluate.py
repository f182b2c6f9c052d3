"""Sample answers on Ray Data, judge them, report misalignment (see emergent.evaluate).

    emergent evaluate --config configs/toy.yaml
    emergent evaluate --config configs/toy.yaml --set "evaluate.models=[base=world:base]" \
        --set evaluate.samples=4
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.evaluate --config configs/real/qwen2.5-7b-evaluate.yaml
"""

from emergent.cli import run_job
from emergent.evaluate import EvaluateJob, main


def cli(argv=None, prog="python -m jobs.evaluate"):
    return run_job(EvaluateJob, main, __doc__, argv, prog)


if __name__ == "__main__":
    cli()
