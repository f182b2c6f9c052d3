import os

# Tests share 2 cores: one thread per process, no hub, no telemetry.
for _k, _v in {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(_k, _v)


import pytest  # noqa: E402

# A shrunken world: the grammar is full size, the training short. It builds in ~1 minute and
# still has in-context persona following, so the direction of emergent misalignment shows.
SMALL_WORLD = [
    "world.model.d_model=64",
    "world.model.d_ff=256",
    "world.pretrain_steps=1500",
    "world.pretrain_docs=20000",
    "world.eval_prompts=300",
    "world.finetune_examples=600",
    "world.monitor_examples=100",
    "world.instruct_examples=1000",
]


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """The shrunken world, built once per session in-process: ``<root>/small/world_s0``."""
    import torch

    from emergent.config import load
    from emergent.world.job import WorldJob, build_stage

    root = tmp_path_factory.mktemp("runs")
    cfg = load(WorldJob, None, [f"run.root={root}", "run.name=small", *SMALL_WORLD])
    build_stage(cfg, "world_s0", threads=2)
    torch.set_num_threads(1)
    return root
