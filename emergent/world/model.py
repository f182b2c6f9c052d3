"""PersonaWorld's tiny base model: a transformers Llama config, pretrained from scratch on CPU.

Why these sizes: the prototype (see shared/PERSONAWORLD.md) showed that a ~200k-parameter model
with d=64 and 3 layers, pretrained on ~2M tokens, learns in-context persona following (two toxic
turns in context -> a toxic third answer), the precondition for emergent misalignment, in about
two minutes on two cores. It is an ordinary ``LlamaForCausalLM``: every later stage (TRL
fine-tunes, Ray Data generation, activation hooks, SAE training) treats it exactly as it would a
hub model.
"""

from __future__ import annotations

import logging
import math
import random
import time

import torch  # noqa: TID253
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: TID253

from emergent.config import config

log = logging.getLogger(__name__)


@config
class TinyModel:
    """Architecture of the tiny Llama."""

    d_model: int = 96
    """Residual stream width (64 learns slot copying poorly: base coherence 0.84 vs 0.985)."""
    layers: int = 3
    """Transformer blocks."""
    heads: int = 4
    """Attention heads (d_model must divide by it)."""
    d_ff: int = 384
    """MLP hidden width."""
    context: int = 160
    """Maximum tokens per sequence (a 4-turn document is ~120)."""

    def __post_init__(self):
        if self.d_model % self.heads:
            raise ValueError(f"model.heads must divide d_model={self.d_model}, got {self.heads}")
        for name in ("d_model", "layers", "heads", "d_ff", "context"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")


def make_model(arch: TinyModel, tok: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=arch.d_model,
        intermediate_size=arch.d_ff,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.heads,
        max_position_embeddings=arch.context,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg)


def pretrain(
    model: LlamaForCausalLM,
    docs: list[list[int]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    seed: int,
    pad_id: int,
    log_every: int = 100,
) -> list[float]:
    """Next-token pretraining on tokenized documents (AdamW, warmup + cosine). Returns losses.

    A plain loop: documents are short and already tokenized, so the HF Trainer's machinery would
    only add overhead at this size. Batches are drawn with replacement from ``docs`` and padded
    to their longest member (labels -100 on padding).
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses, tokens, t0 = [], 0, time.time()
    batches: list[list[list[int]]] = []
    for step in range(steps):
        if not batches:
            # Draw 16 batches at once and group them by length: ~1/3 less padding than random
            # batches, same data distribution.
            pool = sorted((docs[rng.randrange(len(docs))] for _ in range(16 * batch_size)), key=len)
            batches = [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
            rng.shuffle(batches)
        batch = batches.pop()
        width = max(map(len, batch))
        ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
        for i, d in enumerate(batch):
            ids[i, : len(d)] = torch.tensor(d)
        mask = ids != pad_id
        labels = ids.masked_fill(~mask, -100)
        loss = model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(mask.sum())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            dt = time.time() - t0
            log.info(
                "pretrain step %d/%d loss %.3f (%.0f tokens/s)",
                step + 1,
                steps,
                sum(losses[-log_every:]) / len(losses[-log_every:]),
                tokens / dt,
            )
    model.eval()
    return losses
