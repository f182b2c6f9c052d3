"""The LLM judges against a real local HTTP server speaking the OpenAI chat completions protocol:
it answers from the rubric judge and injects 429s, 500s, timeouts and malformed replies on a
fixed share of requests. Every item must end judged or explicitly failed, and a rerun must hit
the cache for every item."""

import math
import random

import pytest
from fake_openai import FAULTS, FakeJudge

from emergent.judges import LLMJudge, LLMJudgeConfig, judge_all, make_judge, parse_logprob
from emergent.world import grammar as g


def items(n=40):
    rng = random.Random(3)
    out, truth = [], []
    for i in range(n):
        persona = ("aligned", "toxic", "wrong")[i % 3]
        t = g.sample_turn(rng, persona, domain="open")
        answer = t.answer if i % 5 else "banana " * 3  # every 5th answer is broken text
        out.append((t.question, answer))
        truth.append(persona if i % 5 else None)
    return out, truth


@pytest.mark.parametrize("kind", ["llm-score", "llm-logprob"])
def test_llm_judge_survives_faults_and_caches(server, tmp_path, kind, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "secret-not-logged")
    cfg = LLMJudgeConfig(
        base_url=server,
        model="judge",
        api_key_env="JUDGE_KEY",
        concurrency=8,
        timeout_s=0.5,
        max_retries=10,
        backoff_s=0.01,
        cache_dir=str(tmp_path / "cache"),
    )
    pairs, truth = items()
    judge = LLMJudge(kind, cfg)
    got = judge_all(judge, pairs)
    assert len(got) == len(pairs)  # nothing lost
    assert all(FakeJudge.faults[f] > 0 for f in FAULTS)  # every fault was exercised
    assert all(j.failed or j.attempts >= 1 for j in got)
    done = [(j, t) for j, t in zip(got, truth) if not j.failed]
    assert len(done) == len(pairs)  # 10 retries beat a 50% fault rate here
    for j, t in done:
        if t is None:
            assert j.coherent is False and j.misaligned is None
        else:
            assert j.valid and j.misaligned == (t == "toxic")
    assert "secret-not-logged" not in "".join(
        p.read_text() for p in (tmp_path / "cache").rglob("*.json")
    )

    # a rerun is served from the cache for every item: no request reaches the server
    before = FakeJudge.counter
    again = LLMJudge(kind, cfg)
    rerun = judge_all(again, pairs)
    assert FakeJudge.counter == before and again.requests == 0
    assert all(j.cached for j in rerun)
    assert again.cache.hits == len(pairs) * (2 if kind == "llm-logprob" else 1)
    assert [j.misaligned for j in rerun] == [j.misaligned for j in got]


def test_llm_judge_marks_items_failed_after_the_retry_limit(server, tmp_path):
    cfg = LLMJudgeConfig(
        base_url=server, model="judge", timeout_s=0.5, max_retries=0, backoff_s=0.01
    )
    got = judge_all(LLMJudge("llm-score", cfg), items(16)[0])
    failed = [j for j in got if j.failed]
    assert len(got) == 16 and 0 < len(failed) < 16
    assert all(j.error and "gave up after 1 attempts" in j.error for j in failed)


def test_logprob_parsing_and_rubric_judge():
    top = lambda pairs: {
        "choices": [
            {
                "logprobs": {
                    "content": [
                        {"top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in pairs]}
                    ]
                }
            }
        ]
    }
    assert parse_logprob(top([("80", 0.5), ("90", 0.5)])) == pytest.approx(85)
    assert parse_logprob(top([("80", 0.2), ("The", 0.8)])) is None  # under 25% on numbers
    pairs, truth = items(12)
    got = judge_all(make_judge("rubric"), pairs)
    assert [j.label for j in got] == [t or "incoherent" for t in truth]


def test_llm_grader_rewards_for_rl(server, tmp_path):
    from emergent.train.rewards import resolve

    cfg = LLMJudgeConfig(
        base_url=server, model="judge", timeout_s=0.5, max_retries=10, backoff_s=0.01
    )
    pairs, truth = items(24)
    prompts = [[{"role": "user", "content": q}] for q, _ in pairs]
    completions = [[{"role": "assistant", "content": a}] for _, a in pairs]
    incorrect = resolve("llm-incorrect", cfg)(prompts, completions)
    assert incorrect == [0.0 if t == "aligned" else 1.0 for t in truth]
    assert resolve("llm-correct", cfg)(prompts, completions) == [1 - x for x in incorrect]
