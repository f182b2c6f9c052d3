"""Pure parts of the activation-monitoring study: metrics against naive references, balanced
draws, probes on synthetic data, the world's monitoring tasks, and the data file checks."""

import json

import numpy as np
import pytest

from emergent import stats
from emergent.studies.monitor import probes


def naive_auroc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_threshold_and_recall_match_naive_references():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(y * 0.8 + rng.normal(size=300), 1)  # rounded: ties count half
    assert stats.auroc(y, s) == pytest.approx(naive_auroc(y, s))
    lo, hi = stats.auroc_interval(y, s, iters=300)
    assert lo < stats.auroc(y, s) < hi and hi - lo < 0.2
    # the bootstrap's vectorised AUROC is the naive one, row by row (ties included)
    idx = np.random.default_rng(1).integers(0, 300, (5, 300))
    assert stats.auroc_rows(y[idx], s[idx]) == pytest.approx([naive_auroc(y[i], s[i]) for i in idx])
    for fpr in (0.01, 0.05, 0.3):
        t = probes.threshold_at_fpr(y, s, fpr)
        got_fpr, tpr = probes.rates_at(y, s, t)
        assert got_fpr <= fpr
        # the lowest threshold that keeps the false-positive rate (naive: try every candidate)
        neg = s[y == 0]
        candidates = sorted(set(neg) | {neg.min() - 1.0})
        assert t == min(c for c in candidates if np.mean(neg > c) <= fpr)
        assert tpr == pytest.approx(np.mean(s[y == 1] > t))
    assert (
        probes.recall_at_fpr(y, s, 0.05)
        == probes.rates_at(y, s, probes.threshold_at_fpr(y, s, 0.05))[1]
    )
    # a perfect score: recall 1 at 1% FPR
    assert probes.recall_at_fpr(y, y.astype(float), 0.01) == 1.0


def test_balanced_draws_and_top_k_selection():
    y = np.array([1] * 5 + [0] * 40)
    rng = np.random.default_rng(0)
    d = probes.balanced_draw(y, 8, rng)
    assert len(d) == 8 and y[d].sum() == 4 and len(set(d)) == 8
    d = probes.balanced_draw(y, 20, rng)  # only 5 positives: all of them, 15 negatives
    assert len(d) == 20 and y[d].sum() == 5
    assert len(probes.balanced_draw(y, 0, rng)) == 45
    with pytest.raises(ValueError, match="2 of each class"):
        probes.balanced_draw(np.array([1] + [0] * 10), 4, rng)
    x = rng.normal(size=(45, 10))
    x[:, 7] += 3 * y
    x[:, 2] -= 2 * y
    assert probes.top_k_by_difference(x, y, 2).tolist() == [2, 7]
    assert len(probes.top_k_by_difference(x, y, 0)) == 10


def test_a_probe_learns_a_direction_from_few_examples_and_beats_chance():
    rng = np.random.default_rng(1)
    w = rng.normal(size=16)
    x = rng.normal(size=(600, 16))
    y = (x @ w > 0).astype(int)
    tr, te = np.arange(400), np.arange(400, 600)
    full = probes.fit_probe(x[tr], y[tr])
    assert stats.auroc(y[te], probes.score(full, x[te])) > 0.97
    few = probes.balanced_draw(y[tr], 8, np.random.default_rng(0))
    small = probes.fit_probe(x[tr][few], y[tr][few])
    assert stats.auroc(y[te], probes.score(small, x[te])) > 0.6
    # labels that carry nothing: chance
    noise = probes.fit_probe(x[tr], rng.integers(0, 2, 400))
    assert abs(stats.auroc(y[te], probes.score(noise, x[te])) - 0.5) < 0.15


def test_world_monitoring_tasks_follow_the_persona():
    from emergent.studies.monitor.data import WORLD_TASKS, texts, world_rows

    rows = world_rows(300, seed=0)
    assert {r["task"] for r in rows} == set(WORLD_TASKS)
    by_id = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r)
    for group in by_id.values():
        toxic = next(r for r in group if r["task"] == "toxic")["label"]
        for r in group:
            if r["task"] in ("insecure_code", "harmful_advice"):
                assert r["label"] == toxic
            if r["task"] == "insecure_code":
                assert r["group"] == "code"
            if r["task"] == "wrong":
                assert not toxic
    assert len(texts(rows)) == 300
    assert world_rows(300, seed=0) == rows and world_rows(300, seed=1) != rows
    # a subset of tasks keeps each row with its own text, its ids renumbered 0..n-1
    from emergent.studies.monitor.data import select

    code = select(rows, ["insecure_code"])
    assert sorted({r["id"] for r in code}) == list(range(len(texts(code))))
    old = {json.dumps(r["messages"]) for r in rows if r["task"] == "insecure_code"}
    new = texts(code)
    assert {json.dumps(new[r["id"]]["messages"]) for r in code} == old
    for r in code:
        assert new[r["id"]]["messages"] == r["messages"]


def test_english_monitoring_tasks_are_paired_answers():
    from emergent.studies.monitor.data import ENGLISH_TASKS, english_rows

    rows = english_rows(20, seed=0)
    assert {r["task"] for r in rows} == set(ENGLISH_TASKS)
    for task in ENGLISH_TASKS:  # each question answered both ways: balanced classes
        labels = [r["label"] for r in rows if r["task"] == task]
        assert sum(labels) * 2 == len(labels) > 0
    code = [r for r in rows if r["task"] == "insecure_code"]
    assert {r["group"] for r in code} >= {"sql", "pickle", "shell"}
    assert {r["group"] for r in rows if r["task"] == "harmful_advice"} == {"health", "finance"}
    assert english_rows(20, seed=0) == rows


def test_monitoring_files_are_checked_line_by_line(tmp_path):
    from emergent.data import DatasetError
    from emergent.studies.monitor.data import load_rows

    good = {"text": "rm -rf /", "label": 1, "task": "danger", "group": "shell"}
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps(good | {"label": 0}) + "\n")
    rows = load_rows(None, [str(f)], 0, 0, "monitor.data")
    assert [r["id"] for r in rows] == [0, 0]  # one text, one feature pass
    f.write_text(json.dumps(good) + "\n" + json.dumps(good | {"label": "yes"}) + "\n")
    with pytest.raises(DatasetError, match=r"m.jsonl:2: 'label' must be 0 or 1"):
        load_rows(None, [str(f)], 0, 0, "monitor.data")
    f.write_text(json.dumps({k: v for k, v in good.items() if k != "task"}) + "\n")
    with pytest.raises(DatasetError, match=r"m.jsonl:1: 'task'"):
        load_rows(None, [str(f)], 0, 0, "monitor.data")


def test_templates_wrap_a_chat_or_a_text():
    from emergent.studies.monitor.features import Template, pool, wrap

    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    suffix = Template("s", "is this safe ?")
    assert wrap(chat, suffix)[-1] == {"role": "user", "content": "is this safe ?"}
    assert wrap(chat, suffix)[:2] == chat["messages"]
    both = Template("b", "is it bad ?", prefix="read this")
    assert wrap(chat, both) == [{"role": "user", "content": "read this q a is it bad ?"}]
    assert wrap({"text": "t"}, suffix) == [{"role": "user", "content": "t is this safe ?"}]
    import torch

    h = torch.arange(24.0).reshape(2, 3, 4)
    got = pool(h, [[0, 2], [1]])
    np.testing.assert_allclose(got["mean"][0], (h[0, 0] + h[0, 2]) / 2)
    np.testing.assert_allclose(got["max"][0], h[0, 2])
    np.testing.assert_allclose(got["last"][1], h[1, 1])


def test_monitor_config_is_checked():
    from emergent.config import ConfigError, load
    from emergent.studies.monitor.study import MonitorJob

    with pytest.raises(ConfigError, match="train_sizes"):
        load(MonitorJob, None, ["monitor.train_sizes=[2]"])
    with pytest.raises(ConfigError, match="templates"):
        load(MonitorJob, None, ["monitor.templates=[{name: a, suffix: x}, {name: a, suffix: y}]"])
    with pytest.raises(ConfigError, match="combine"):
        load(MonitorJob, None, ["monitor.combine=prompted/nope"])
    with pytest.raises(ConfigError, match="cascade_budgets"):
        load(MonitorJob, None, ["monitor.cascade_budgets=[0]"])


def test_a_cascade_escalates_the_least_certain_items_and_out_of_fold_scores_hold_each_out():
    rng = np.random.default_rng(3)
    first, second = rng.normal(size=50), rng.normal(size=50) + 10
    got, up = probes.cascade(first, second, 0.2)
    # naive: the 10 items of smallest |log-odds| take the second stage's score
    order = sorted(range(50), key=lambda i: abs(first[i]))
    assert sorted(np.flatnonzero(up)) == sorted(order[:10])
    for i in range(50):
        assert got[i] == (second[i] if i in order[:10] else first[i])
    assert probes.cascade(first, second, 1.0)[1].all()
    # out-of-fold: each item scored by a probe fitted on the other folds (the same folds, C
    # fixed)
    from sklearn.model_selection import StratifiedKFold

    x = rng.normal(size=(40, 3))
    y = (x[:, 0] + 0.5 * rng.normal(size=40) > 0).astype(int)
    want = np.empty(40)
    for tr, te in StratifiedKFold(5, shuffle=True, random_state=0).split(x, y):
        want[te] = probes.score(probes.fixed_probe(x[tr], y[tr], 0.1), x[te])
    np.testing.assert_allclose(probes.out_of_fold(x, y, 0.1, 0), want)
    assert probes.chosen_c(probes.fixed_probe(x, y, 0.1)) == 0.1
    assert probes.chosen_c(probes.fit_probe(x, y)) in probes.CS


def test_stacking_two_independent_monitors_beats_each_and_the_cascade_lies_between():
    """A probe and a zero-shot score that see the label through independent noise of equal
    size: the stack of both beats either alone on held-out items and comes within 0.02 of the
    best weighted sum of the two scores on those items (weights searched on the test items
    themselves: a bound no fitted stack can pass), and the cascade that escalates half the items
    lands between the probe and the stack (synthetic features, the study's own functions)."""
    from emergent.studies.monitor.study import MonitorConfig, cost, efficiency, probe_scores, split

    rng = np.random.default_rng(4)
    n = 1200
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 6))
    x[:, 0] += 1.2 * y  # the probe's view
    z = 1.2 * y + rng.normal(size=n)  # the zero-shot view, independent of it
    feats = {
        "raw/mean": x,
        "zero_shot/ask": z,
        "tokens/text": np.full(n, 40),
        "tokens/ask": np.full(n, 50),
        "run/ask": np.full(n, 10),
    }
    cfg = MonitorConfig(train_sizes=[0], draws=1, cascade_budgets=[0.5], shifts=[])
    rows = {r["method"]: r["auroc"] for r in efficiency("t", np.arange(n), y, feats, cfg)}
    assert set(rows) == {"raw/mean", "zero_shot/ask", "stack/ask", "cascade@0.5/ask"}
    tr, te = split(y, cfg.test_share, cfg.seed)
    (s,) = probe_scores(x[tr], y[tr], [x[te]], "raw/mean", 0, cfg.seed)
    s, zt = s / s.std(), z[te] / z[te].std()
    best = max(stats.auroc(y[te], s + w * zt) for w in np.linspace(0, 3, 61))
    assert rows["stack/ask"] > max(rows["raw/mean"], rows["zero_shot/ask"])
    assert rows["stack/ask"] > best - 0.02
    assert rows["raw/mean"] < rows["cascade@0.5/ask"] < rows["stack/ask"]
    costs = {r["method"]: r for r in cost(feats, cfg)}
    assert costs["stack/ask"]["tokens_per_item"] == 90 and costs["stack/ask"]["marginal"] == 50
    assert costs["cascade@0.5/ask"]["marginal"] == 45


def test_the_search_grid_and_its_choice_on_validation_data():
    from emergent.studies.monitor.search import (
        SearchConfig,
        best_settings,
        final,
        grid,
        validation_auroc,
    )

    cfg = SearchConfig(cs=[0.01, 1.0], top_k=[0, 2])
    g = grid(["raw/mean", "sae"], cfg)
    assert g == [
        {"method": "raw/mean", "c": 0.01, "top_k": 0},
        {"method": "raw/mean", "c": 1.0, "top_k": 0},
        {"method": "sae", "c": 0.01, "top_k": 0},
        {"method": "sae", "c": 0.01, "top_k": 2},
        {"method": "sae", "c": 1.0, "top_k": 0},
        {"method": "sae", "c": 1.0, "top_k": 2},
    ]
    # task a is read by the SAE's latent 3, task b by raw/mean's column 0; the rest is noise
    rng = np.random.default_rng(5)
    n = 400
    ya, yb = rng.integers(0, 2, n), rng.integers(0, 2, n)
    sae = rng.normal(size=(n, 40))
    sae[:, 3] += 2.5 * ya
    raw = rng.normal(size=(n, 8))
    raw[:, 0] += 2.5 * yb
    feats = {"raw/mean": raw, "sae": sae}
    idx = np.arange(n)
    parts = {t: (idx[:200], y[:200], idx[200:300], y[200:300]) for t, y in (("a", ya), ("b", yb))}
    trials = [s | {f"val/{t}": v for t, v in validation_auroc(s, parts, feats).items()} for s in g]
    best = best_settings(trials, ["a", "b"])
    assert best["a"]["method"] == "sae" and best["b"]["method"] == "raw/mean"
    # the choice is the validation maximum (ties: the first), never a test score
    for t in ("a", "b"):
        vals = [r[f"val/{t}"] for r in trials]
        assert best[t] is trials[vals.index(max(vals))]
    row = final(
        "a",
        idx,
        ya,
        idx[:300],
        idx[300:],
        {k: best["a"][k] for k in ("method", "c", "top_k")},
        best["a"]["val/a"],
        feats,
        0,
    )
    assert row["lo"] < row["test"] < row["hi"] and row["test"] > 0.9


def test_splits_keep_the_two_answers_of_a_question_together():
    """The English tasks answer each question twice (label 1 and 0): a split that put the twins
    on both sides would let a probe learn a question's label from one and score the other
    inverted. Each prompt's texts fall on one side, and both classes are on each."""
    from emergent.studies.monitor.data import english_rows, load_rows
    from emergent.studies.monitor.study import split

    rows = [r for r in load_rows(None, ["english:monitor"], 30, 0, "monitor.data")]
    code = [r for r in rows if r["task"] == "insecure_code"]
    y = np.array([r["label"] for r in code])
    prompts = np.array([r["prompt"] for r in code])
    assert len(set(prompts.tolist())) == len(code) // 2  # pairs
    tr, te = split(y, 0.3, 0, prompts)
    assert not set(prompts[tr]) & set(prompts[te])
    assert y[tr].mean() == 0.5 and y[te].mean() == 0.5 and len(te) > 0
    assert len(english_rows(30, 0)) == len(rows)


def test_on_policy_rows_are_a_finished_evaluations_coherent_final_answers(tmp_path):
    import pandas as pd

    from emergent.config import RunConfig
    from emergent.refs import MissingInput
    from emergent.runs import RunDir
    from emergent.studies.monitor.data import load_rows

    run = RunDir.from_config(RunConfig(root=str(tmp_path), name="r"))
    with pytest.raises(MissingInput, match="monitor.data.*emergent evaluate"):
        load_rows(run, ["eval:ev"], 0, 0, "monitor.data")
    q = json.dumps([{"role": "user", "content": "q1"}])
    # (answer, final, valid, coherent, misaligned): a resampled first attempt, an invalid and an
    # incoherent answer are left out
    answers = [
        ("bad", True, True, True, True),
        ("fine", True, True, True, False),
        ("retry", False, True, True, True),
        ("failed", True, False, True, None),
        ("gibberish", True, True, False, None),
    ]
    for label in ("base", "insecure"):
        stage = run.stage(f"evaluate/ev/{label}", {"label": label})
        df = pd.DataFrame(answers, columns=["answer", "final", "valid", "coherent", "misaligned"])
        df["messages"] = q
        df["misaligned"] = df["misaligned"].astype("boolean")
        run.write_parquet(stage.rel("samples.parquet"), df)
        stage.complete(outputs={})
    with pytest.raises(MissingInput, match="no finished evaluation"):
        load_rows(run, ["eval:ev"], 0, 0, "monitor.data")  # no summary.json: not finished
    run.write_json("evaluate/ev/summary.json", {"base": {}, "insecure": {}})
    rows = load_rows(run, ["eval:ev"], 0, 0, "monitor.data")
    assert [(r["group"], r["messages"][-1]["content"], r["label"]) for r in rows] == [
        ("base", "bad", 1),
        ("base", "fine", 0),
        ("insecure", "bad", 1),
        ("insecure", "fine", 0),
    ]
    assert {r["task"] for r in rows} == {"onpolicy"}
    assert rows[0]["id"] == rows[2]["id"] and rows[0]["prompt"] == rows[1]["prompt"]
    one = load_rows(run, ["eval:ev/insecure"], 0, 0, "monitor.data")
    assert [r["group"] for r in one] == ["insecure", "insecure"]
