"""Emergent misalignment in PersonaWorld across seeds, controls, doses and variants
(see emergent.studies.world.study).

    emergent world-study --config configs/toy.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.world_study --config configs/toy.yaml --set study.seeds=[0,1,2,3,4]
"""

from emergent.cli import run_job
from emergent.studies.world.study import WorldStudyJob, main


def cli(argv=None, prog="python -m jobs.world_study"):
    return run_job(WorldStudyJob, main, __doc__, argv, prog)


if __name__ == "__main__":
    cli()
