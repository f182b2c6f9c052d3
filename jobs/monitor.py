"""The activation-monitoring study (see emergent.studies.monitor.study).

    emergent monitor --config configs/toy.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.monitor --config configs/toy.yaml
"""

from emergent.cli import run_job
from emergent.studies.monitor.study import MonitorJob, main


def cli(argv=None, prog="python -m jobs.monitor"):
    return run_job(MonitorJob, main, __doc__, argv, prog)


if __name__ == "__main__":
    cli()
