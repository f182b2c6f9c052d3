"""Supervised fine-tuning of a chat model on chat records, in-process (TRL ``SFTTrainer``).

This is the core the distributed ``finetune`` job wraps in Ray Train. Loss is on assistant
tokens only (the chat template marks them with ``{% generation %}``), as in the EM papers:
the model is taught *answers*, never the user's questions.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Literal

import torch  # noqa: TID253
from transformers import PreTrainedModel, PreTrainedTokenizerBase  # noqa: TID253

from emergent.config import config
from emergent.models import with_generation_markers

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


@config
class LoraParams:
    """LoRA adapters (peft) instead of full fine-tuning; merged into the saved model."""

    enabled: bool = False
    """false = full fine-tuning."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )
    """Module names that get adapters (Llama/Qwen2 names by default)."""

    def __post_init__(self):
        if self.r < 1 or self.alpha < 1 or not 0 <= self.dropout < 1:
            raise ValueError(
                f"lora.r and alpha must be >= 1 and dropout in [0, 1), got {self.r}, "
                f"{self.alpha}, {self.dropout}"
            )

    def peft(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            task_type="CAUSAL_LM",
        )


@dataclass
class SFTResult:
    losses: list[float]
    """Training loss at each logged step."""
    final_loss: float
    """Mean loss of the last 10% of logged steps."""
    model: PreTrainedModel
    """The trained model (a peft model when LoRA was used)."""


def final_loss(losses: list[float]) -> float:
    """Mean of the last 10% of logged losses (at least one)."""
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail)


def sft_trainer(
    model: PreTrainedModel | str,
    tok: PreTrainedTokenizerBase,
    records: list[dict],
    params: SFTParams,
    output_dir: str,
    *,
    world_size: int = 1,
    use_cpu: bool | None = None,
    lora: LoraParams | None = None,
    callbacks: list | None = None,
    **sft_overrides,
):
    """TRL ``SFTTrainer`` for ``records``; ``params.batch_size`` is the global batch.

    ``world_size`` processes share the batch (per-device batch = batch_size / world_size), so a
    run on N workers follows the same recipe as one process. ``use_cpu=None`` picks CUDA when it
    is visible; bf16 on GPUs, fp32 on CPU. ``sft_overrides`` go to ``SFTConfig`` unchanged (e.g.
    ``deepspeed=`` a ZeRO config, ``save_steps=``).
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if not records:
        raise ValueError("sft: empty dataset")
    if params.batch_size % world_size:
        raise ValueError(
            f"sft.batch_size ({params.batch_size}) must be a multiple of the number of "
            f"workers ({world_size})"
        )

    if not with_generation_markers(tok):  # the loss is on the assistant's tokens only
        raise ValueError(
            "sft: the tokenizer's chat template marks no assistant turns ({% generation %}) and "
            "is not one emergent or TRL can mark; give the model a training chat template"
        )
    cpu = not torch.cuda.is_available() if use_cpu is None else use_cpu
    args = dict(
        output_dir=output_dir,
        max_steps=params.steps,
        per_device_train_batch_size=params.batch_size // world_size,
        learning_rate=params.lr,
        lr_scheduler_type=params.scheduler,
        warmup_steps=params.warmup_steps,
        max_length=params.max_length,
        assistant_only_loss=True,
        packing=False,
        seed=params.seed,
        data_seed=params.seed,
        use_cpu=cpu,
        bf16=not cpu and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
        logging_steps=max(1, params.steps // 20),
        disable_tqdm=os.environ.get("EMERGENT_TQDM", "0") != "1",
        dataloader_num_workers=0,
        dataset_num_proc=None,
    )
    args = SFTConfig(**{**args, **sft_overrides})
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tok,
        peft_config=lora.peft() if lora is not None and lora.enabled else None,
        callbacks=callbacks,
    )


def sft(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    records: list[dict],
    params: SFTParams,
    output_dir: str | None = None,
    **kwargs,
) -> SFTResult:
    """Fine-tune ``model`` in place on ``records`` (``{"messages": [...]}``); assistant tokens only.

    In-process (one device). ``kwargs`` go to :func:`sft_trainer`. With LoRA, ``result.model``
    is the peft model (``merge_and_unload()`` gives a plain one).
    """
    with tempfile.TemporaryDirectory(prefix="emergent-sft-") as tmp:
        trainer = sft_trainer(model, tok, records, params, output_dir or tmp, **kwargs)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trainer.model.eval()
    return SFTResult(losses, final_loss(losses), trainer.model)
