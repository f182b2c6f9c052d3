"""The whole persona-features study as one job, ending in report.html (see emergent.pipeline).

    emergent pipeline --config configs/toy.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.pipeline --config configs/toy.yaml
"""

from emergent.cli import run_job
from emergent.pipeline import PipelineJob, main, stage_jobs


def cli(argv=None, prog="python -m jobs.pipeline"):
    return run_job(PipelineJob, main, __doc__, argv, prog, stage_jobs)


if __name__ == "__main__":
    cli()
