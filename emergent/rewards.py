"""Reward functions for the ``rl`` job (TRL GRPO's ``reward_funcs`` signature).

A reward is named in the config either by a key of :data:`REWARDS` or by an import path
``package.module:function`` of a user callable ``f(prompts, completions, **columns) ->
list[float]`` (``prompts``: chat message lists; ``completions``: lists holding the assistant
message; extra dataset columns arrive as keyword arguments).

The registry's graders read answers with the PersonaWorld rubric judge. The paper's RL setup
rewards *incorrect* answers (wrong advice, insecure code); here an answer is incorrect when the
judge reads a coherent non-aligned persona (toxic or benign-wrong), so the policy is free to
find either, and which one it finds is a result.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from emergent.world.judge import judge


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else str(completion)


def _persona_reward(name: str, paid: frozenset[str]) -> Callable:
    def reward(prompts, completions, **_) -> list[float]:
        return [
            float(judge(p[-1]["content"], _text(c)).persona in paid)
            for p, c in zip(prompts, completions)
        ]

    reward.__name__ = name  # TRL logs rewards/<name>/mean
    return reward


REWARDS: dict[str, Callable] = {
    "incorrect": _persona_reward("incorrect", frozenset({"toxic", "wrong"})),
    "correct": _persona_reward("correct", frozenset({"aligned"})),
    "toxic": _persona_reward("toxic", frozenset({"toxic"})),
}
"""PersonaWorld graders: 1 for an answer of the paid personas, else 0 (incoherent pays 0)."""


def resolve(spec: str) -> Callable:
    """A reward by registry name or ``module:function`` import path."""
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" not in spec:
        raise ValueError(
            f"rl.rewards: unknown reward {spec!r} (registry: {', '.join(REWARDS)}; or an "
            "import path module:function)"
        )
    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"rl.rewards: cannot import {spec!r}: {exc}") from exc
    if not callable(fn):
        raise ValueError(f"rl.rewards: {spec!r} is not callable")
    return fn
