"""RL training (TRL GRPO) under Ray Train with reward graders (see emergent.train.rl).

    emergent rl --config configs/toy.yaml
    emergent rl --config configs/toy.yaml --set rl.rewards=[correct] --set rl.name=health_correct
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.rl --config configs/toy.yaml
"""

from emergent.cli import run_job
from emergent.train.rl import RLJob, main


def cli(argv=None, prog="python -m jobs.rl"):
    return run_job(RLJob, main, __doc__, argv, prog)


if __name__ == "__main__":
    cli()
