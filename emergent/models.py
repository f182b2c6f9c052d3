"""Hugging Face models: loading, and residual-stream interventions at a block's output.

The residual stream "after block L" is the hidden state a decoder layer returns (Llama, Qwen2,
Mistral, GPT-2, GPT-NeoX) or an encoder layer returns (BERT-like). Steering adds ``alpha *
direction`` to it during generation, at one of three position sets:

- ``all``: every position, prompt and answer;
- ``assistant_turn``: only the last prompt position (the token that opens the assistant turn),
  once, in the prefill pass; later tokens see it only through attention;
- ``answer``: the last prompt position and every generated position (the positions whose output
  is an answer token).

Decode steps are recognised as forward passes over one new position (HF ``generate`` with its
default KV cache). A teacher-forced pass over whole conversations (the likelihood eval scoring
written answers) names where each row's answer starts with :func:`answer_spans`; the same
positions are then steered as if the answer had been generated.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from pathlib import Path
from typing import Literal

import torch  # noqa: TID253

from emergent.config import InputError, UserError

Positions = Literal["all", "assistant_turn", "answer"]
POSITIONS = ("all", "assistant_turn", "answer")


PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(path: str, what: str = "model") -> None:
    """Refuse a local model directory whose weights are only pickled (``pytorch_model.bin``
    and the like): unpickling runs whatever code the file holds, so emergent loads safetensors
    only. Hub ids are held to the same rule by ``use_safetensors=True`` at load time."""
    p = Path(path)
    if not p.is_dir():
        return
    names = sorted(f.name for f in p.iterdir() if f.is_file())
    if any(n.endswith(".safetensors") for n in names):
        return
    pickled = [n for n in names if n.endswith(PICKLED_WEIGHTS)]
    if pickled:
        raise UserError(
            f"{what}: {p} holds only pickled weights ({', '.join(pickled[:3])}); emergent loads "
            "safetensors only, since unpickling a checkpoint runs the code inside it. Where you "
            "trust the file, convert it once: AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(new_dir) writes model.safetensors"
        )


def load_causal_lm(path: str, device: str = "cpu", dtype: str | None = None):
    """An HF causal LM (eval mode) and its tokenizer from a local directory or hub id
    (safetensors weights only, see :func:`require_safetensors`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(path)
    require_safetensors(path)
    tok = AutoTokenizer.from_pretrained(path)
    kw = {"dtype": getattr(torch, dtype)} if dtype else {}
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kw).to(device)
    model.eval()
    return model, tok


def load_any(path: str, device: str = "cpu"):
    """A causal LM if the checkpoint has a head, else the bare model (encoders such as MiniLM),
    in eval mode, with its tokenizer."""
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(path)
    if any(a.endswith("ForCausalLM") for a in (cfg.architectures or [])):
        return load_causal_lm(path, device)
    from transformers import AutoTokenizer

    require_safetensors(path)
    model = AutoModel.from_pretrained(path, use_safetensors=True).to(device)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


# The Hugging Face ChatML loop (SmolLM2 and other HF chat models), and the same loop with the
# assistant's content and end of turn inside {% generation %} markers
_CHATML_TURN = (
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
)
_CHATML_TRAINING_TURN = (
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}" + _CHATML_TURN + "{% endif %}"
)


def with_generation_markers(tok) -> bool:
    """Give a ChatML chat template without ``{% generation %}`` markers (which TRL's
    assistant-only loss needs, and knows only for the templates it ships) the markers around
    each assistant turn's content and end of turn. The patched template must render exactly the
    text the original does on probe conversations, or nothing is changed. True when ``tok`` has
    markers now."""
    template = tok.chat_template
    if not isinstance(template, str):
        return False
    if "generation %}" in template:
        return True
    if _CHATML_TURN not in template:
        return False
    patched = template.replace(_CHATML_TURN, _CHATML_TRAINING_TURN)
    probes = [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
    ]
    for msgs in probes:
        for gen in (False, True):
            kw = dict(tokenize=False, add_generation_prompt=gen)
            if tok.apply_chat_template(msgs, chat_template=patched, **kw) != (
                tok.apply_chat_template(msgs, **kw)
            ):
                return False
    tok.chat_template = patched
    return True


def dims(path: str) -> tuple[int, int]:
    """(blocks, d_model) of a model from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    cfg = getattr(cfg, "text_config", None) or cfg
    return int(cfg.num_hidden_layers), int(cfg.hidden_size)


def check_layer(path: str, layer: int, field: str) -> int:
    """The model's d_model, after checking that block ``layer`` exists: in the driver, before
    any Ray work (inside an actor the same mistake is buried under Ray's output)."""
    n, d_model = dims(path)
    if not -n <= layer < n:
        raise InputError(f"{field}: layer {layer} out of range: the model has {n} blocks")
    return d_model


def blocks(model) -> torch.nn.ModuleList:
    """The model's transformer blocks, in order (the residual stream is read after each); a
    peft (LoRA) model's are its base model's."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "encoder.layer", "layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")


def block(model, layer: int) -> torch.nn.Module:
    layers = blocks(model)
    if not -len(layers) <= layer < len(layers):
        raise InputError(f"layer {layer} out of range: the model has {len(layers)} blocks")
    return layers[layer]


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextlib.contextmanager
def edit_residual(model, layer: int, fn):
    """Replace the residual stream after block ``layer`` by ``fn(hidden)`` (hidden: batch x seq x
    d_model) in every forward pass while active."""

    def hook(_module, _inputs, output):
        return _replace_hidden(output, fn(_hidden(output)))

    handle = block(model, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def steering(
    model, layer: int, direction: torch.Tensor, alpha: float, positions: Positions = "all"
):
    """Add ``alpha * direction`` to the residual stream after block ``layer`` while active."""
    if positions not in POSITIONS:
        raise ValueError(f"steering positions must be one of {POSITIONS}, got {positions!r}")
    vec = None

    def add(h):
        nonlocal vec
        if vec is None or vec.device != h.device or vec.dtype != h.dtype:
            vec = (alpha * direction).to(device=h.device, dtype=h.dtype)
        decode = h.shape[1] == 1
        if positions == "all" or (positions == "answer" and decode):
            return h + vec
        spans = _SPANS.get()
        if spans is not None and not decode:  # a teacher-forced pass over written answers
            return (
                h + span_mask(spans, h.shape[1], positions).to(h.device, h.dtype)[..., None] * vec
            )
        if not decode:  # prefill: the last prompt position only
            h = h.clone()
            h[:, -1] += vec
        return h

    with edit_residual(model, layer, add):
        yield


_SPANS: contextvars.ContextVar = contextvars.ContextVar("answer_spans", default=None)


@contextlib.contextmanager
def answer_spans(spans: list[tuple[int, int]]):
    """While active, forward passes of the batch are teacher-forced conversations whose row ``r``
    holds its answer's tokens at positions ``spans[r] = (start, end)``: :func:`steering` then
    adds at the positions generation would have steered (``assistant_turn``: ``start - 1``, the
    last prompt position; ``answer``: that one and the answer's, ``start .. end - 1``)."""
    token = _SPANS.set(list(spans))
    try:
        yield
    finally:
        _SPANS.reset(token)


def span_mask(spans: list[tuple[int, int]], seq: int, positions: Positions) -> torch.Tensor:
    """(rows x seq) 0/1 mask of the positions steered in a teacher-forced pass (see
    :func:`answer_spans`)."""
    mask = torch.zeros(len(spans), seq)
    for r, (start, end) in enumerate(spans):
        if positions == "all":
            mask[r] = 1
        elif positions == "assistant_turn":
            mask[r, start - 1] = 1
        else:
            mask[r, start - 1 : end] = 1
    return mask


class _Stop(Exception):
    """Raised by the hook of ``residual_after`` to end a forward pass at its layer."""


def residual_after(model, layer: int, **inputs) -> torch.Tensor:
    """The residual stream after block ``layer`` (batch x seq x d_model, detached) of one forward
    pass of ``inputs``: the pass stops there, so later blocks and the LM head never run (for a
    7B model at a middle layer, half the work, and no vocabulary-sized logits). A model whose
    weights DeepSpeed ZeRO-3 partitions runs whole: its gather / release hooks must complete."""
    return residuals_after(model, [layer], **inputs)[layer]


def residuals_after(model, layers, **inputs) -> dict[int, torch.Tensor]:
    """The residual stream after each block of ``layers`` in one forward pass that stops after
    the last of them (see :func:`residual_after`)."""
    seen: dict[int, torch.Tensor] = {}
    stop = not any(hasattr(p, "ds_id") for p in itertools.islice(model.parameters(), 1))
    last = max(layers)

    def hook_for(layer):
        def hook(_module, _inputs, output):
            seen[layer] = _hidden(output).detach()
            if stop and layer == last:
                raise _Stop

        return hook

    handles = [block(model, layer).register_forward_hook(hook_for(layer)) for layer in set(layers)]
    try:
        with torch.no_grad():
            model(**inputs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return seen


@contextlib.contextmanager
def capture(model, layer: int):
    """Record the residual stream after block ``layer`` of every forward pass while active:
    yields a list that receives one detached (batch, seq, d_model) tensor per pass."""
    seen: list[torch.Tensor] = []

    def record(h):
        seen.append(h.detach())
        return h

    with edit_residual(model, layer, record):
        yield seen
