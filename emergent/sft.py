"""Supervised fine-tuning of a chat model on chat records, in-process (TRL ``SFTTrainer``).

This is the core the distributed ``finetune`` job wraps in Ray Train. Loss is on assistant
tokens only (the chat template marks them with ``{% generation %}``), as in the EM papers:
the model is taught *answers*, never the user's questions.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from emergent.config import config

log = logging.getLogger(__name__)


@config
class SFTParams:
    """A short supervised fine-tune (the fields TRL's SFTConfig gets from us)."""

    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 32
    """Examples per step."""
    lr: float = 1e-4
    """Peak learning rate (AdamW; 1e-4 keeps the tiny model coherent, 1e-3 collapses it)."""
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    """Learning-rate schedule (HF scheduler name)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    max_length: int = 160
    """Truncate examples to this many tokens."""
    seed: int = 0
    """Data order and initialisation seed."""

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"sft.steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}"
            )
        if not 0 < self.lr < 1:
            raise ValueError(f"sft.lr must be in (0, 1), got {self.lr}")
        if self.warmup_steps < 0 or self.max_length < 8:
            raise ValueError(
                f"sft.warmup_steps must be >= 0 and max_length >= 8, got {self.warmup_steps}, "
                f"{self.max_length}"
            )


@dataclass
class SFTResult:
    losses: list[float]
    """Training loss at each logged step."""
    final_loss: float
    """Mean loss of the last 10% of logged steps."""


def sft(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    records: list[dict],
    params: SFTParams,
    output_dir: str | None = None,
    **sft_overrides,
) -> SFTResult:
    """Fine-tune ``model`` in place on ``records`` (``{"messages": [...]}``); assistant tokens only.

    ``sft_overrides`` go to TRL's SFTConfig unchanged (e.g. ``deepspeed=...`` on the real path).
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if not records:
        raise ValueError("sft: empty dataset")
    on_gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="emergent-sft-") as tmp:
        args = dict(
            output_dir=output_dir or tmp,
            max_steps=params.steps,
            per_device_train_batch_size=params.batch_size,
            learning_rate=params.lr,
            lr_scheduler_type=params.scheduler,
            warmup_steps=params.warmup_steps,
            max_length=params.max_length,
            assistant_only_loss=True,
            packing=False,
            seed=params.seed,
            data_seed=params.seed,
            use_cpu=not on_gpu,
            bf16=on_gpu and torch.cuda.is_bf16_supported(),
            gradient_checkpointing=False,
            save_strategy="no",
            report_to="none",
            logging_steps=max(1, params.steps // 20),
            disable_tqdm=os.environ.get("EMERGENT_TQDM", "0") != "1",
            dataloader_num_workers=0,
            dataset_num_proc=None,
        )
        args = SFTConfig(**{**args, **sft_overrides})
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tok
        )
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tail = losses[-max(1, len(losses) // 10) :]
    model.eval()
    return SFTResult(losses, sum(tail) / len(tail))
