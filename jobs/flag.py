"""Fine-tuning data scored for the misalignment it will cause, before training (see emergent.studies.persona.flagging).

    emergent flag --config configs/toy.yaml --set 'flag.predict=null' \
        --set "flag.families=[{name: code, data: [{path: 'world:finetune/code_toxic'}]}]"
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.flag --config configs/toy.yaml --set ...
"""

from emergent.cli import run_job
from emergent.studies.persona.flagging import FlagJob, main


def cli(argv=None, prog="python -m jobs.flag"):
    return run_job(FlagJob, main, __doc__, argv, prog)


if __name__ == "__main__":
    cli()
