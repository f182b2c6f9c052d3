"""Sparse autoencoder on residual-stream activations under Ray Train (see emergent.sae).

    emergent train-sae --config configs/toy.yaml
    emergent train-sae --config configs/toy.yaml --set train_sae.source=cache
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.train_sae --config configs/toy.yaml
"""

from emergent.cli import run_job
from emergent.train.sae import TrainSAEJob, main


def cli(argv=None, prog="python -m jobs.train_sae"):
    return run_job(TrainSAEJob, main, __doc__, argv, prog)


if __name__ == "__main__":
    cli()
