"""Reward functions for the ``rl`` job (TRL GRPO's ``reward_funcs`` signature).

A reward is named in the config either by a key of :data:`REWARDS` or by an import path
``package.module:function`` of a user callable ``f(prompts, completions, **columns) ->
list[float]`` (``prompts``: chat message lists; ``completions``: lists holding the assistant
message; extra dataset columns arrive as keyword arguments).

The registry's graders read answers with the PersonaWorld rubric judge; ``llm-incorrect`` and
``llm-correct`` ask an OpenAI-compatible judge (the real path, ``rl.judge``); ``graded-incorrect``
and ``graded-correct`` pay a text classifier's probability (``rl.grader``: fit on answers known to
be incorrect and correct, e.g. the English datasets' bad and good advice), a judge-free reward
model for real chat models on machines with no judge endpoint. The paper's RL setup
rewards *incorrect* answers (wrong advice, insecure code); here an answer is incorrect when the
judge reads a coherent non-aligned persona (toxic or benign-wrong), so the policy is free to
find either, and which one it finds is a result.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


GRADED_REWARDS = {"graded-incorrect": True, "graded-correct": False}
"""Reward-model graders (``rl.grader``): the classifier's probability that an answer is incorrect,
or that it is correct."""


@dataclass
class Grader:
    """A text classifier of answers (TF-IDF word uni- and bigrams, logistic regression):
    ``score`` is its probability that each answer is incorrect."""

    model: Any
    """The fitted scikit-learn pipeline (class 1: incorrect)."""
    cv_accuracy: float
    """Stratified k-fold accuracy over its distinct answers (each fold's answers unseen in
    fitting; templated data has few: the English health answers are 12 bad and 18 good). How
    well it separates answers like them, not how well it reads a policy's drifted ones."""
    n: tuple[int, int]
    """Distinct incorrect and correct answers it was fit on."""

    def score(self, texts: list[str]) -> list[float]:
        return [float(p) for p in self.model.predict_proba(texts)[:, 1]]


def fit_grader(incorrect: list[str], correct: list[str], folds: int = 5, seed: int = 0) -> Grader:
    """Fit the answer classifier on the two kinds of answers, each counted once (deterministic:
    the same texts give the same grader on every rerun), with its cross-validated accuracy."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline

    incorrect, correct = list(dict.fromkeys(incorrect)), list(dict.fromkeys(correct))
    if min(len(incorrect), len(correct)) < folds:
        raise InputError(
            f"rl.grader: needs at least {folds} distinct incorrect and correct answers, got "
            f"{len(incorrect)} and {len(correct)}"
        )
    texts, y = [*incorrect, *correct], [1] * len(incorrect) + [0] * len(correct)
    make = lambda: make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
        LogisticRegression(C=1.0, max_iter=2000),
    )
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    acc = float(cross_val_score(make(), texts, y, cv=cv).mean())
    return Grader(make().fit(texts, y), acc, (len(incorrect), len(correct)))


def grader_reward(name: str, grader: Grader) -> Callable:
    incorrect = GRADED_REWARDS[name]

    def reward(prompts, completions, **_) -> list[float]:
        p = grader.score([_text(c) for c in completions])
        return p if incorrect else [1.0 - x for x in p]

    reward.__name__ = name.replace("-", "_")
    return reward


def resolve(spec: str, judge_cfg=None, grader: Grader | None = None) -> Callable:
    """A reward by registry name or ``module:function`` import path; ``llm-*`` rewards use the
    judge endpoint ``judge_cfg``, ``graded-*`` rewards the fitted ``grader``."""
    if spec in REWARDS:
        return REWARDS[spec]
    if spec in GRADED_REWARDS:
        if grader is None:
            raise InputError(f"rl.rewards names {spec!r}, which needs rl.grader's answers")
        return grader_reward(spec, grader)
    if spec in LLM_REWARDS:
        from emergent.judges import LLMJudgeConfig

        return llm_reward(spec, judge_cfg or LLMJudgeConfig())
    if ":" not in spec:
        raise InputError(
            f"rl.rewards names an unknown reward {spec!r} (registry: {', '.join([*REWARDS, *LLM_REWARDS, *GRADED_REWARDS])}; or an "
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
