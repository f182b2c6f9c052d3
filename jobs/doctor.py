"""Cluster report: nodes, resources, GPUs, stack versions, DeepSpeed ops (see emergent.doctor).

emergent doctor
ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.doctor
"""

from emergent.cli import run_job
from emergent.doctor import DoctorJob, main


def cli(argv=None, prog="python -m jobs.doctor"):
    return run_job(DoctorJob, main, __doc__, argv, prog)


if __name__ == "__main__":
    cli()
