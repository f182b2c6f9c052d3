"""Reward functions for the ``rl`` job (TRL GRPO's ``reward_funcs`` signature).

A reward is named in the config either by a key of :data:`REWARDS` or by an import path
``package.module:function`` of a user callable ``f(prompts, completions, **columns) ->
list[float]`` (``prompts``: chat message lists; ``completions``: lists holding the assistant
message; extra dataset columns arrive as keyword arguments).

The registry's graders read answers with the PersonaWorld rubric judge; ``llm-incorrect`` and
``llm-correct`` ask an OpenAI-compatible judge (the real path, ``rl.judge``). The paper's RL setup
rewards *incorrect* answers (wrong advice, insecure code); here an answer is incorrect when the
judge reads a coherent non-aligned persona (toxic or benign-wrong), so the policy is free to
find either, and which one it finds is a result.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

from emergent.config import InputError
from emergent.world.judge import judge

log = logging.getLogger(__name__)


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


LLM_REWARDS = {"llm-incorrect": "INCORRECT", "llm-correct": "CORRECT"}
"""Real-path graders: an OpenAI-compatible judge (``rl.judge``) labels each answer; 1 for the
paid label, 0 otherwise (an item the judge failed on after its retries pays 0 and is logged)."""


def llm_reward(name: str, judge_cfg) -> Callable:
    from emergent.judges import LLMJudge, judge_all

    paid = LLM_REWARDS[name]
    judge = LLMJudge("llm-grade", judge_cfg)

    def reward(prompts, completions, **_) -> list[float]:
        pairs = [(p[-1]["content"], _text(c)) for p, c in zip(prompts, completions)]
        got = judge_all(judge, pairs)
        failed = sum(j.failed for j in got)
        if failed:
            log.warning(
                "reward %s: judge failed on %d of %d answers (paid 0)", name, failed, len(got)
            )
        return [float(j.label == paid) for j in got]

    reward.__name__ = name.replace("-", "_")
    return reward


def resolve(spec: str, judge_cfg=None) -> Callable:
    """A reward by registry name or ``module:function`` import path; ``llm-*`` rewards use the
    judge endpoint ``judge_cfg``."""
    if spec in REWARDS:
        return REWARDS[spec]
    if spec in LLM_REWARDS:
        from emergent.judges import LLMJudgeConfig

        return llm_reward(spec, judge_cfg or LLMJudgeConfig())
    if ":" not in spec:
        raise InputError(
            f"rl.rewards names an unknown reward {spec!r} (registry: {', '.join([*REWARDS, *LLM_REWARDS])}; or an "
            "import path module:function)"
        )
    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"rl.rewards names {spec!r}, which cannot be imported: {exc}") from exc
    if not callable(fn):
        raise InputError(f"rl.rewards names {spec!r}, which is not callable")
    return fn
