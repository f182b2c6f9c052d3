"""Sampling answers from a chat model, in-process (batched HF ``generate``).

The core that the ``evaluate`` job runs inside Ray Data actors. Sampling follows the EM papers:
temperature 1, no top-k / top-p truncation unless configured.
"""

from __future__ import annotations

import torch  # noqa: TID253
from transformers import PreTrainedModel, PreTrainedTokenizerBase  # noqa: TID253

from emergent.config import config


@config
class SamplingParams:
    """How answers are sampled."""

    temperature: float = 1.0
    """Softmax temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = off)."""
    max_new_tokens: int = 40
    """Answer length limit in tokens."""
    batch_size: int = 256
    """Prompts per generate call."""
    seed: int = 0
    """Sampling seed."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("sampling.max_new_tokens and batch_size must be >= 1")


def chat_prompts(tok: PreTrainedTokenizerBase, conversations: list[list[dict]]) -> list[str]:
    """Render conversations (ending in a user turn) with the generation prompt appended."""
    return [
        tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        for c in conversations
    ]


def stop_ids(model, tok) -> list[int]:
    """Every token that ends the assistant's turn: the tokenizer's end of sequence and each id
    of the model's generation config (Llama-3.1 and Qwen2.5 instruct models list several)."""
    ids = [tok.eos_token_id]
    cfg = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += cfg if isinstance(cfg, (list, tuple)) else [cfg]
    return list(dict.fromkeys(i for i in ids if i is not None))


def sample(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str], params: SamplingParams
) -> list[str]:
    """One sampled answer per rendered prompt (special tokens and the end-of-turn removed)."""
    return sample_counted(model, tok, prompts, params)[0]


@torch.no_grad()
def sample_counted(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    params: SamplingParams,
    seed: int | None = None,
) -> tuple[list[str], list[int]]:
    """Answers and the number of tokens generated for each (up to and including end of turn).
    ``seed`` overrides ``params.seed``."""
    torch.manual_seed(params.seed if seed is None else seed)
    model.eval()
    if tok.pad_token is None:  # e.g. Llama tokenizers: pad with end-of-sequence
        tok.pad_token = tok.eos_token
    side, tok.padding_side = tok.padding_side, "left"
    device = next(model.parameters()).device
    stops = stop_ids(model, tok)
    out: list[str] = []
    counts: list[int] = []
    for i in range(0, len(prompts), params.batch_size):
        chunk = prompts[i : i + params.batch_size]
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        greedy = params.temperature == 0
        gen = model.generate(
            **enc,
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None if greedy else 0,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
        )
        for row in gen[:, enc["input_ids"].shape[1] :].tolist():
            # Cut at the end of turn; any other special token the model emits stays in the text
            # (a judge must see it), only padding is dropped.
            end = next((j for j, t in enumerate(row) if t in stops), None)
            if end is not None:
                row = row[: end + 1]
            counts.append(len(row))
            row = [t for t in row if t != tok.pad_token_id and t not in stops]
            out.append(tok.decode(row, skip_special_tokens=False).strip())
    tok.padding_side = side
    return out, counts
