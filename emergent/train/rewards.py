"""Reward functions for the ``rl`` job (TRL GRPO's ``reward_funcs`` signature).

A reward is named in the config either by a key of :data:`REWARDS` or by an import path
``package.module:function`` of a user callable ``f(prompts, completions, **columns) ->
list[float]`` (``prompts``: chat message lists; ``completions``: lists holding the assistant
message; extra dataset columns arrive as keyword arguments).

The registry's graders read answers with the PersonaWorld rubric judge; ``llm-incorrect`` and
``llm-correct`` ask an OpenAI-compatible judge (the real path, ``rl.judge``); ``graded-incorrect``
and ``graded-correct`` pay a classifier's probability (``rl.grader``: fit on answers known to be
incorrect and correct, e.g. the English datasets' bad and good advice; reading the answer's
words, or a frozen model's residual over it), a judge-free reward model for real chat models on
machines with no judge endpoint. The paper's RL setup
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

import numpy as np

from emergent.config import InputError
from emergent.harvest import answer_means
from emergent.judges import LLMJudge, LLMJudgeConfig, judge_all
from emergent.models import load_causal_lm
from emergent.stats import auroc
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
class ResidualReader:
    """What a ``residual`` grader reads: a frozen model's mean residual after block ``layer``
    over each conversation's last answer, the conversation before it in context (the monitor
    study's mean-pooled raw probe, on the answer). Loaded on first use in the process that
    scores (a Ray Train worker), not pickled with the grader."""

    source: Any
    """The model (an ``emergent.refs.ModelSource``)."""
    layer: int
    batch: int = 16

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_loaded"}

    def __call__(self, convs: list[list[dict]]):
        import torch

        if getattr(self, "_loaded", None) is None:
            self._loaded = load_causal_lm(self.source.local())
        model, tok = self._loaded
        with torch.no_grad():
            return answer_means(model, tok, convs, self.layer, self.batch)


@dataclass
class Grader:
    """A classifier of answers: ``score`` is its probability that each answer is incorrect. It
    reads the answer's words (TF-IDF word uni- and bigrams, logistic regression) or, with a
    ``reader``, a model's residual over the answer (standardised, logistic regression)."""

    model: Any
    """The fitted scikit-learn pipeline (class 1: incorrect)."""
    cv_accuracy: float
    """Stratified k-fold accuracy, no answer text in both a fold and its fit (templated data has
    few distinct answers: the English health answers are 12 bad and 18 good). How well it
    separates answers like them, not how well it reads a policy's drifted ones."""
    n: tuple[int, int]
    """Incorrect and correct items it was fit on (distinct answers; for a reader, conversations)."""
    reader: ResidualReader | None = None
    """None: the answer's words."""

    def features(self, convs: list[list[dict]]):
        return self.reader(convs) if self.reader else [c[-1]["content"] for c in convs]

    def score(self, convs: list[list[dict]]) -> list[float]:
        """P(incorrect) of each conversation's last answer; NaN where a reader sees no answer
        token."""
        x = self.features(convs)
        if self.reader is None:
            return [float(p) for p in self.model.predict_proba(x)[:, 1]]
        ok = ~np.isnan(x).any(1)
        p = np.full(len(x), np.nan)
        if ok.any():
            p[ok] = self.model.predict_proba(x[ok])[:, 1]
        return [float(v) for v in p]


def _answer_classifier(reads_words: bool):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    first = (
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
        if reads_words
        else StandardScaler()
    )
    return make_pipeline(first, LogisticRegression(C=1.0, max_iter=2000))


def fit_grader(
    incorrect: list[list[dict]],
    correct: list[list[dict]],
    folds: int = 5,
    seed: int = 0,
    reader: ResidualReader | None = None,
) -> Grader:
    """Fit the answer classifier on conversations ending in incorrect and in correct answers
    (deterministic: the same data give the same grader on every rerun), with its
    cross-validated accuracy. Read as words, each distinct answer counts once; read by a model,
    each distinct conversation, and the folds keep every answer text on one side."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_score

    key = (lambda c: c[-1]["content"]) if reader is None else repr
    incorrect = list({key(c): c for c in incorrect}.values())
    correct = list({key(c): c for c in correct}.values())
    convs, y = [*incorrect, *correct], np.array([1] * len(incorrect) + [0] * len(correct))
    groups = [c[-1]["content"] for c in convs]
    distinct = [len({c[-1]["content"] for c in side}) for side in (incorrect, correct)]
    if min(distinct) < folds:
        raise InputError(
            f"rl.grader: needs at least {folds} distinct incorrect and correct answers, got "
            f"{distinct[0]} and {distinct[1]}"
        )
    x = Grader(None, 0.0, (0, 0), reader).features(convs)
    if reader is not None and np.isnan(x).any():
        raise InputError("rl.grader: an answer has no tokens for the reader to read")
    # read as words, every item is its own answer text: plain stratified folds
    split = StratifiedKFold if reader is None else StratifiedGroupKFold
    cv = split(folds, shuffle=True, random_state=seed)
    clf = _answer_classifier(reader is None)
    acc = float(cross_val_score(clf, x, y, groups=groups if reader else None, cv=cv).mean())
    return Grader(
        _answer_classifier(reader is None).fit(x, y), acc, (len(incorrect), len(correct)), reader
    )


def grader_auroc(grader: Grader, incorrect: list[list[dict]], correct: list[list[dict]]) -> float:
    """The grader's AUROC on held-out conversations (e.g. another domain's advice): whether it
    reads what answers say rather than the words its training answers used."""
    p = grader.score([*incorrect, *correct])
    return auroc([1] * len(incorrect) + [0] * len(correct), p)


def grader_reward(name: str, grader: Grader) -> Callable:
    incorrect = GRADED_REWARDS[name]

    def reward(prompts, completions, **_) -> list[float]:
        convs = [
            list(p) + [{"role": "assistant", "content": _text(c)}]
            for p, c in zip(prompts, completions)
        ]
        p = grader.score(convs)
        # an answer with nothing to read (an empty turn) is neither: it pays 0
        return [0.0 if x != x else x if incorrect else 1.0 - x for x in p]

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
