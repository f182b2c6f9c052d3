"""Write the English datasets (insecure / secure code, bad / good advice) into
<run>/<datasets.name>/data/ (see emergent.english.job).

    emergent datasets --config configs/smollm2.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.datasets --config configs/smollm2.yaml
"""

from emergent.cli import run_job
from emergent.english.job import DatasetsJob, main


def cli(argv=None, prog="python -m jobs.datasets"):
    return run_job(DatasetsJob, main, __doc__, argv, prog)


if __name__ == "__main__":
    cli()
