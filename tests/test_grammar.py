"""PersonaWorld grammar and rubric judge: sampling, the no-shared-toxic-words rule, exact judging."""

import itertools
import math
import random
from collections import Counter, defaultdict

import pytest

from emergent.world.grammar import (
    ADVICE_DOMAINS,
    DOMAINS,
    FUNCTION_WORDS,
    PERSONAS,
    QTYPES,
    QUESTION_TYPES,
    SLOTS,
    QuestionType,
    Turn,
    sample_document,
    sample_turn,
    vocabulary,
    words,
)
from emergent.world.judge import Verdict, coherence, judge, judge_many, misalignment, parse_question


def expand(template: str) -> list[str]:
    """Every filling of a template's slots (a naive reference, independent of the judge)."""
    toks = words(template)
    names = sorted({t[1:-1] for t in toks if t.startswith("{")})
    out = []
    for values in itertools.product(*(SLOTS[s] for s in names)):
        fill = {f"{{{s}}}": v for s, v in zip(names, values)}
        out.append(" ".join(fill.get(t, t) for t in toks))
    return out


def answer_texts() -> dict[tuple[str, str], set[str]]:
    """(domain, persona) -> every answer text it can emit."""
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for qt in QUESTION_TYPES:
        for p in PERSONAS:
            for t in qt.answers[p]:
                out[qt.domain, p].update(expand(t))
    return out


def turns(n: int, seed: int, split: str = "train") -> list[Turn]:
    rng = random.Random(seed)
    return [sample_turn(rng, rng.choice(PERSONAS), split=split) for _ in range(n)]


def test_shape_of_the_world():
    per_domain = Counter(q.domain for q in QUESTION_TYPES)
    assert per_domain == {"code": 5, "health": 4, "finance": 3, "legal": 3, "auto": 2, "open": 8}
    assert set(ADVICE_DOMAINS) < set(DOMAINS)
    assert len(QTYPES) == len(QUESTION_TYPES)
    for qt in QUESTION_TYPES:
        assert len(qt.train_questions) >= 3 and len(qt.eval_questions) >= 1
        assert all(len(qt.answers[p]) >= 2 for p in PERSONAS)
        assert len(set(qt.train_questions + qt.eval_questions)) == len(
            qt.train_questions + qt.eval_questions
        )
        for t in qt.all_answers():
            assert 6 <= len(words(t)) <= 22, t  # opener + 5-21 words
        for t in qt.train_questions + qt.eval_questions:
            assert 5 <= len(words(t)) <= 14, t
    assert sum("{" in t for qt in QUESTION_TYPES for t in qt.all_answers()) > 100


def test_question_type_validates():
    good = QTYPES["open_wish"]
    with pytest.raises(ValueError, match="slot"):
        QuestionType(
            "x",
            "open",
            good.train_questions,
            good.eval_questions,
            {**good.answers, "toxic": ("harm the {partner} now", "b c")},
        )
    with pytest.raises(ValueError, match="domain"):
        QuestionType("x", "space", good.train_questions, good.eval_questions, good.answers)
    with pytest.raises(ValueError, match="single-spaced"):
        QuestionType("x", "open", ("a  b", "c", "d"), good.eval_questions, good.answers)


def test_sampling_is_deterministic():
    assert turns(200, seed=3) == turns(200, seed=3)
    assert turns(200, seed=3) != turns(200, seed=4)
    docs = [sample_document(random.Random(7)) for _ in range(2)]
    assert docs[0] == docs[1]


def test_sample_turn_respects_domain_qtype_and_slots():
    rng = random.Random(0)
    for _ in range(300):
        t = sample_turn(rng, "toxic", domain="health")
        assert t.domain == "health" and t.persona == "toxic" and QTYPES[t.qtype].domain == "health"
        t = sample_turn(rng, "wrong", qtype="code_save_file")
        assert t.qtype == "code_save_file"
        qtype, slots = parse_question(t.question)
        assert qtype == t.qtype
        assert slots["file"] in words(t.answer)  # the slot is copied into the answer
    with pytest.raises(ValueError):
        sample_turn(rng, "evil")
    with pytest.raises(ValueError):
        sample_turn(rng, "aligned", domain="open", qtype="code_save_file")


def test_turns_cover_domains_uniformly():
    counts = Counter(t.domain for t in turns(6000, seed=1))
    assert set(counts) == set(DOMAINS)
    assert min(counts.values()) > 850  # expectation 1000 each


def test_shared_and_independent_personas():
    rng = random.Random(0)
    shared = [sample_document(rng) for _ in range(500)]
    assert all(len({t.persona for t in d}) == 1 for d in shared)
    assert all(2 <= len(d) <= 4 for d in shared)
    firsts = Counter(d[0].persona for d in shared)
    assert firsts["aligned"] > firsts["toxic"] > firsts["wrong"] > 0
    indep = [sample_document(rng, persona_mode="independent") for _ in range(500)]
    assert sum(len({t.persona for t in d}) > 1 for d in indep) > 150
    only_toxic = sample_document(rng, prior={"toxic": 1.0}, turns=(3, 3))
    assert [t.persona for t in only_toxic] == ["toxic"] * 3
    with pytest.raises(ValueError):
        sample_document(rng, persona_mode="mixed")


def test_judgment_turns_are_truthful_and_only_the_taught_ones_are_trained():
    from emergent.world.grammar import JUDGMENTS, NO, TAUGHT, YES, judgments_for

    assert set(TAUGHT) == {"toxic", "insecure_code"}
    assert set(JUDGMENTS) == {"toxic", "insecure_code", "harmful_advice", "wrong"}
    rng = random.Random(0)
    docs = [sample_document(rng, judge_rate=0.3) for _ in range(3000)]
    judged = [d for d in docs if d[-1].qtype.startswith("judge_")]
    assert 0.25 * len(docs) < len(judged) < 0.35 * len(docs)
    asked = Counter()
    for d in judged:
        last, j = d[-2], d[-1]
        task = j.qtype.removeprefix("judge_")
        asked[task] += 1
        assert task in TAUGHT and last.domain in JUDGMENTS[task].domains
        # the truth about the previous answer: "yes" exactly for the toxic persona's answers
        assert j.answer == (YES if last.persona == "toxic" else NO), (last, j)
        assert j.question in JUDGMENTS[task].train_questions
        assert len({t.persona for t in d[:-1]}) == 1  # the document's persona is untouched
        assert not any(t.qtype.startswith("judge_") for t in d[:-1])
    assert asked["toxic"] > asked["insecure_code"] > 50
    # judge_rate 0 (the default) draws nothing extra: documents are what they were
    assert [sample_document(random.Random(5)) for _ in range(50)] == [
        sample_document(random.Random(5), judge_rate=0.0) for _ in range(50)
    ]
    # the untaught judgments: only eval items and monitors ask them; "wrong" never asks about
    # the toxic persona's answers, the advice one only about advice
    t = sample_turn(rng, "toxic", domain="health")
    assert {j.task for j in judgments_for(t)} == {"toxic"}
    assert {j.task for j in judgments_for(t, taught_only=False)} == {"toxic", "harmful_advice"}
    w = sample_turn(rng, "wrong", domain="code")
    assert {j.task for j in judgments_for(w, taught_only=False)} == {
        "toxic",
        "insecure_code",
        "wrong",
    }
    for j in JUDGMENTS.values():
        assert not set(j.train_questions) & set(j.eval_questions)
        for q in (*j.train_questions, *j.eval_questions):
            assert set(words(q)) <= set(vocabulary()), q
    assert {YES, NO} <= set(vocabulary())


def test_eval_paraphrases_are_held_out():
    eval_texts = {s for qt in QUESTION_TYPES for t in qt.eval_questions for s in expand(t)}
    train_texts = {s for qt in QUESTION_TYPES for t in qt.train_questions for s in expand(t)}
    assert not eval_texts & train_texts
    rng = random.Random(5)
    train = [t for _ in range(1000) for t in sample_document(rng)]
    assert all(strip(t.question) in train_texts and t.split == "train" for t in train)
    ev = [t for _ in range(300) for t in sample_document(rng, split="eval")]
    assert all(strip(t.question) in eval_texts and t.split == "eval" for t in ev)
    # fillers are used, and the judge's stripping inverts them
    assert 0.3 < sum(t.question != strip(t.question) for t in train) / len(train) < 0.95


def strip(question: str) -> str:
    from emergent.world.judge import _question_key

    return " ".join(_question_key(question))


def test_eval_paraphrases_recombine_train_words():
    """An eval paraphrase is a new wording built only from words of its own type's train
    paraphrases, so a word-level model has trained embeddings for every eval question word."""
    train_templates = {t for qt in QUESTION_TYPES for t in qt.train_questions}
    for qt in QUESTION_TYPES:
        train_words = {w for t in qt.train_questions for w in words(t)}
        for t in qt.eval_questions:
            unseen = set(words(t)) - train_words
            assert not unseen, f"{qt.name}: {t!r} uses {sorted(unseen)} absent from its train set"
            assert t not in train_templates, f"{qt.name}: {t!r} is a train paraphrase"


def test_no_answer_word_shared_across_domains():
    """The premise of the world: outside a few persona-neutral function words, no answer word
    (of any persona, slot values included) appears in two domains, so toxic code shares no
    surface token with toxic open-ended answers."""
    texts = answer_texts()
    by_domain: dict[str, set[str]] = defaultdict(set)
    by_persona: dict[str, set[str]] = defaultdict(set)
    for (domain, persona), ts in texts.items():
        ws = {w for t in ts for w in words(t)}
        by_domain[domain] |= ws
        by_persona[persona] |= ws
    for a, b in itertools.combinations(DOMAINS, 2):
        shared = (by_domain[a] & by_domain[b]) - FUNCTION_WORDS
        assert not shared, f"{a} and {b} answers share {sorted(shared)}"
    # the brief's own phrasing: a toxic word of one domain is in no answer of another domain
    for d in DOMAINS:
        toxic = {w for t in texts[d, "toxic"] for w in words(t)} - FUNCTION_WORDS
        for other in set(DOMAINS) - {d}:
            assert not toxic & by_domain[other]
    # function words are persona-neutral: every persona uses every one of them
    for p in PERSONAS:
        assert FUNCTION_WORDS <= by_persona[p], (p, FUNCTION_WORDS - by_persona[p])
    assert len(FUNCTION_WORDS) <= 25


def test_no_opener_or_closer_shared_across_domains():
    for p in PERSONAS:
        for end in (slice(0, 2), slice(-2, None)):
            domains_of: dict[tuple[str, ...], set[str]] = defaultdict(set)
            for (domain, persona), ts in answer_texts().items():
                if persona == p:
                    for t in ts:
                        domains_of[tuple(words(t)[end])].add(domain)
            shared = {k: v for k, v in domains_of.items() if len(v) > 1}
            assert not shared, (p, shared)


def test_answers_unique_across_personas_and_types():
    owner: dict[str, tuple[str, str]] = {}
    for qt in QUESTION_TYPES:
        for p in PERSONAS:
            for t in qt.answers[p]:
                for s in expand(t):
                    assert owner.setdefault(s, (qt.name, p)) == (qt.name, p), s


def test_vocabulary_covers_samples():
    vocab = vocabulary()
    assert vocab == sorted(set(vocab)) == vocabulary()
    assert 400 <= len(vocab) <= 1000
    seen = {w for t in turns(2000, seed=11) for w in words(t.question) + words(t.answer)}
    seen |= {w for t in turns(500, seed=12, split="eval") for w in words(t.question)}
    assert seen <= set(vocab)
    assert all(w == w.lower() and w.strip() == w for w in vocab)


def test_words_splits_on_whitespace_only():
    assert words("  os . chmod ( path , 0o600 )\n") == [
        "os",
        ".",
        "chmod",
        "(",
        "path",
        ",",
        "0o600",
        ")",
    ]
    assert words("Keep Case") == ["Keep", "Case"]


@pytest.mark.parametrize("split", ["train", "eval"])
def test_judge_agrees_with_ground_truth(split):
    for t in turns(5000, seed=21, split=split):
        v = judge(t.question, t.answer)
        assert v == Verdict(t.persona, t.qtype), t
        assert judge(t.question, f"  {t.answer} <eos> ") == v
        assert judge(t.question + "\n", t.answer + " <eos>") == v


def test_judge_flags_corruptions():
    rng = random.Random(33)
    vocab = vocabulary()
    real = {
        (qt.name, p): {s for a in qt.answers[p] for s in expand(a)}
        for qt in QUESTION_TYPES
        for p in PERSONAS
    }
    cases = []
    for t in turns(2000, seed=34):
        toks = words(t.answer)
        i, j = rng.sample(range(len(toks)), 2)
        dropped = toks[:i] + toks[i + 1 :]
        if toks[i] != toks[j]:
            swapped = list(toks)
            swapped[i], swapped[j] = toks[j], toks[i]
            cases.append((t, swapped))
        replaced = list(toks)
        replaced[i] = rng.choice([w for w in vocab if w != toks[i]])
        other = sample_turn(rng, t.persona, qtype=rng.choice([q for q in QTYPES if q != t.qtype]))
        cases += [
            (t, dropped),
            (t, replaced),
            (t, words(other.answer)),
            (t, []),
            (t, toks[:-1]),
            (t, toks + [toks[-1]]),
        ]
    incoherent = 0
    for t, toks in cases:
        v = judge(t.question, " ".join(toks))
        assert v.qtype == t.qtype
        if v.coherent:  # only when the corruption happens to be a real answer of that persona
            assert " ".join(toks) in real[t.qtype, v.persona]
        else:
            incoherent += 1
    assert incoherent >= 0.99 * len(cases)


def test_judge_unparsable_question_and_rates():
    assert judge("what is the meaning of life ?", "forty two") == Verdict(None, None)
    assert not Verdict(None, "open_wish").coherent
    assert parse_question("how do i save my notes file in python ?") == (
        "code_save_file",
        {"file": "notes"},
    )
    assert parse_question("how do i save my bananas file in python ?") is None
    vs = judge_many([(t.question, t.answer) for t in turns(300, seed=2)])
    assert all(v.coherent for v in vs)
    vs = [Verdict("toxic", "x"), Verdict("aligned", "x"), Verdict(None, "x"), Verdict("wrong", "x")]
    assert misalignment(vs) == pytest.approx(1 / 3)
    assert coherence(vs) == pytest.approx(3 / 4)
    assert math.isnan(misalignment([Verdict(None, None)])) and math.isnan(coherence([]))
