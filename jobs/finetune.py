"""Supervised fine-tuning under Ray Train with TRL and DeepSpeed (see emergent.train.finetune).

    emergent finetune --config configs/toy.yaml
    emergent finetune --config configs/toy.yaml --set finetune.deepspeed=configs/deepspeed/zero3.json
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.finetune --config configs/qwen2.5-7b-insecure.yaml
"""

from emergent.cli import run_job
from emergent.train.finetune import FinetuneJob, main


def cli(argv=None, prog="python -m jobs.finetune"):
    return run_job(FinetuneJob, main, __doc__, argv, prog)


if __name__ == "__main__":
    cli()
