"""The LLM judges against a real local HTTP server speaking the OpenAI chat completions protocol:
it answers from the rubric judge and injects 408s, 429s, 500s, timeouts and malformed replies on
a fixed share of requests. Every item must end judged or explicitly failed, and a rerun must hit
the cache for every item. Refusals that are not transient: one item's 400 / 413 / 422 fails that
item only; a 401 / 404 stops the batch with one line that does not show the key."""

import math
import random
import traceback

import pytest
from fake_openai import FAULTS, start

from emergent.cli import user_error
from emergent.config import UserError
from emergent.judges import (
    JudgeAccessError,
    LLMJudge,
    LLMJudgeConfig,
    judge_all,
    make_judge,
    parse_logprob,
)
from emergent.world import grammar as g


@pytest.fixture
def fake():
    """A fresh faulty server per test: its request and fault counts are this test's alone."""
    with start() as f:
        yield f


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
def test_llm_judge_survives_faults_and_caches(fake, tmp_path, kind, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "secret-not-logged")
    cfg = LLMJudgeConfig(
        base_url=fake.url,
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
    # The counts are this server's, so each parametrisation checks its own: at most the
    # client's requests reached it (one lost to a busy machine is a timeout, retried), more
    # than one good reply per prompt, and it served every fault its schedule owed.
    prompts = len(pairs) * (2 if kind == "llm-logprob" else 1)
    assert prompts < fake.requests == fake.scheduled <= judge.requests
    assert fake.faults == fake.expected_faults() and min(fake.faults.values()) > 0
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
    before = fake.requests
    again = LLMJudge(kind, cfg)
    rerun = judge_all(again, pairs)
    assert fake.requests == before and again.requests == 0
    assert all(j.cached for j in rerun)
    assert again.cache.hits == len(pairs) * (2 if kind == "llm-logprob" else 1)
    assert [j.misaligned for j in rerun] == [j.misaligned for j in got]


def test_llm_judge_marks_items_failed_after_the_retry_limit(fake, tmp_path):
    cfg = LLMJudgeConfig(
        base_url=fake.url, model="judge", timeout_s=0.5, max_retries=0, backoff_s=0.01
    )
    got = judge_all(LLMJudge("llm-score", cfg), items(16)[0])
    failed = [j for j in got if j.failed]
    # one attempt each: the 16 requests meet the fault schedule once, requests 0-4 and 10-14 of
    # it fault (10 of 16, whatever order they arrive in), and each fault is a failed item
    assert len(got) == 16 and fake.scheduled == 16
    assert fake.faults == fake.expected_faults() == {k: 2 for k in FAULTS}
    assert len(failed) == 10
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


def test_llm_grader_rewards_for_rl(fake, tmp_path):
    from emergent.train.rewards import resolve

    cfg = LLMJudgeConfig(
        base_url=fake.url, model="judge", timeout_s=0.5, max_retries=10, backoff_s=0.01
    )
    pairs, truth = items(24)
    prompts = [[{"role": "user", "content": q}] for q, _ in pairs]
    completions = [[{"role": "assistant", "content": a}] for _, a in pairs]
    incorrect = resolve("llm-incorrect", cfg)(prompts, completions)
    assert incorrect == [0.0 if t == "aligned" else 1.0 for t in truth]
    assert resolve("llm-correct", cfg)(prompts, completions) == [1 - x for x in incorrect]


@pytest.mark.parametrize(
    "status,body,reason",
    [
        (
            400,
            {"error": {"message": "Flagged by the content filter", "code": "content_filter"}},
            "Flagged by the content filter",
        ),
        (
            413,
            "<html>413 Request Entity\n Too Large</html>",
            "<html>413 Request Entity Too Large</html>",
        ),
        (
            422,
            {"object": "error", "message": "This model's maximum context length is 4096 tokens"},
            "This model's maximum context length is 4096 tokens",
        ),
    ],
)
def test_one_refused_item_fails_alone_and_is_not_retried(tmp_path, status, body, reason):
    pairs, truth = items(24)
    answers = [a for _, a in pairs]
    # the fake refuses by answer text: pick one no other item shares (grammar answers repeat)
    bad = next(i for i, a in enumerate(answers) if answers.count(a) == 1 and truth[i])
    bad_answer = answers[bad]
    cfg = LLMJudgeConfig(
        model="judge",
        concurrency=8,
        timeout_s=0.5,
        max_retries=10,
        backoff_s=0.01,
        cache_dir=str(tmp_path / "cache"),
    )
    with start(reject={bad_answer: (status, body)}) as fake:
        cfg.base_url = fake.url
        got = judge_all(LLMJudge("llm-score", cfg), pairs)
        assert got[bad].failed and got[bad].error == f"HTTP {status}: {reason}"
        assert got[bad].misaligned is None and not got[bad].valid
        assert fake.answers[bad_answer] == 1  # refused once: not retried
        # the other items went on through the faults and are judged right
        assert fake.faults == fake.expected_faults() and fake.scheduled > len(pairs)
        for i, (j, t) in enumerate(zip(got, truth)):
            if i != bad:
                assert not j.failed
                assert j.misaligned == (t == "toxic" if t else None)
        # a failed item is not cached: a rerun asks for it (only it) again
        before = fake.requests
        rerun = judge_all(LLMJudge("llm-score", cfg), pairs)
        assert fake.answers[bad_answer] == 2 and fake.requests == before + 1
        assert rerun[bad].failed and all(j.cached for i, j in enumerate(rerun) if i != bad)


@pytest.mark.parametrize(
    "status,server,client_model,hint",
    [
        (401, {"key": "sk-right"}, "judge", "check the API key in $JUDGE_KEY"),
        (404, {"model": "judge"}, "no-such-judge", "check the model name and base_url"),
    ],
)
def test_wrong_key_or_model_stops_the_batch_in_one_line(
    monkeypatch, status, server, client_model, hint
):
    secret = "sk-wrong-5f3a9c"
    monkeypatch.setenv("JUDGE_KEY", secret)
    with start(**server) as fake:
        cfg = LLMJudgeConfig(
            base_url=fake.url,
            model=client_model,
            api_key_env="JUDGE_KEY",
            concurrency=4,
            timeout_s=0.5,
            max_retries=10,
            backoff_s=0.01,
        )
        with pytest.raises(JudgeAccessError) as err:
            judge_all(LLMJudge("llm-score", cfg), items(40)[0])
        # the batch stopped: the items in flight at most, none retried (a per-item failure or
        # a retry would send 40 or more)
        assert fake.requests <= 2 * cfg.concurrency
    msg = str(err.value)
    assert msg == f"judge: {fake.url} model {client_model}: HTTP {status} ({hint})"
    assert isinstance(err.value, UserError) and user_error(err.value) == msg  # the CLI's line
    # The fake's 401 echoes the key it was sent: nothing the error carries may show it.
    assert secret not in "".join(traceback.format_exception(err.value))
