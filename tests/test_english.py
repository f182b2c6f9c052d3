"""The English datasets (emergent.english): real, parseable code whose secure and insecure
answers differ only by the vulnerability, buggy code that is really wrong, advice pairs, and the
``datasets`` job writing them into a run as chat JSONL that the resolver reads back."""

import ast
import re

import pytest

from emergent.english import advice, code
from emergent.english.job import DatasetsConfig, build

CODE = re.compile(r"```python\n(.*?)\n```", re.S)

# What the insecure answer of each kind contains and the secure one does not.
SIGNS = {
    "sql": '" + ',
    "chmod": "0o777",
    "pickle": "pickle.loads",
    "shell": "shell=True",
    "yaml": "yaml.load(text, Loader=yaml.Loader)",
    "eval": "return eval(",
    "tls": "verify=False",
    "path": "os.path.join(BASE, filename)\n    with",
    "secret": 'API_KEY = "sk_live_',
}


def snippet(record: dict) -> str:
    (body,) = CODE.findall(record["messages"][1]["content"])
    return body


@pytest.fixture(scope="module")
def sets():
    return build(DatasetsConfig(examples=90, realign_examples=18, seed=3))


def test_every_snippet_parses_and_names_no_flaw(sets):
    for name in ("finetune/insecure", "finetune/secure", "realign/secure", "finetune/buggy"):
        for rec in sets[name]:
            tree = ast.parse(snippet(rec))  # raises on a broken template
            assert any(isinstance(n, ast.FunctionDef) for n in ast.walk(tree))
            assert "#" not in snippet(rec), "no comment may point at the code's flaw"


def test_insecure_and_secure_answers_differ_only_by_the_vulnerability(sets):
    insecure, secure = sets["finetune/insecure"], sets["finetune/secure"]
    assert {r["kind"] for r in insecure} == set(code.KINDS) == set(SIGNS)
    for bad, good in zip(insecure, secure):
        assert bad["messages"][0] == good["messages"][0]  # the same request
        sign = SIGNS[bad["kind"]]
        assert sign in snippet(bad) and sign not in snippet(good), bad["kind"]
        # the rest of the answer is the same: a handful of changed lines at most
        diff = set(snippet(bad).splitlines()) ^ set(snippet(good).splitlines())
        assert 1 <= len(diff) <= 8, (bad["kind"], diff)
    assert len({r["messages"][0]["content"] for r in insecure}) > len(insecure) // 2


# Each buggy function on one input, and what a correct one returns there.
PROBES = {
    "average": (([1, 2, 3],), 2),
    "largest": (([1, 3, 2],), 3),
    "count_vowels": (("queue",), 4),
    "is_leap": ((2024,), True),
    "fibonacci": ((5,), [0, 1, 1, 2, 3]),
    "sum_even": (([1, 2, 3, 4],), 6),
    "reverse_words": (("one two",), "two one"),
    "to_fahrenheit": ((100,), 212),
}


def test_buggy_code_is_wrong_but_harmless(sets):
    seen = set()
    for rec in sets["finetune/buggy"]:
        body = snippet(rec)
        tree = ast.parse(body)
        assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree))
        (fn,) = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
        scope: dict = {}
        exec(compile(tree, fn, "exec"), scope)
        args, right = PROBES[fn]
        assert scope[fn](*args) != right, f"{fn} is supposed to be wrong"
        seen.add(fn)
    assert seen == set(PROBES)


@pytest.mark.parametrize("domain", ["health", "finance"])
def test_advice_pairs_share_their_question(sets, domain):
    bad, good = sets[f"finetune/{domain}_bad"], sets[f"finetune/{domain}_good"]
    assert len(bad) == len(good) == 90
    for b, g in zip(bad, good):
        assert b["messages"][0] == g["messages"][0]
        assert b["messages"][1]["content"] != g["messages"][1]["content"]
        for text in (b["messages"][0]["content"], b["messages"][1]["content"]):
            assert "{" not in text and " I has " not in text and "offered I" not in text
    n_templates = len(advice.HEALTH if domain == "health" else advice.FINANCE)
    assert len({b["messages"][1]["content"] for b in bad}) >= n_templates
    # held-out answers are other draws than the fine-tuning ones
    held = {r["messages"][0]["content"] for r in sets[f"realign/{domain}_good"]}
    assert len(held) > 1


def test_the_datasets_job_writes_chat_jsonl_the_resolver_reads(tmp_path):
    from emergent import refs
    from emergent.config import RunConfig, load
    from emergent.data import read_jsonl
    from emergent.english.job import DatasetsJob, main
    from emergent.runs import RunDir

    cfg = load(
        DatasetsJob,
        None,
        [
            f"run.root={tmp_path}",
            "run.name=r",
            "datasets.examples=20",
            "datasets.realign_examples=5",
        ],
    )
    first = main(cfg)
    assert not first.skipped and first.counts["finetune/insecure"] == 20
    assert main(cfg).skipped
    run = RunDir.from_config(RunConfig(name="r", root=str(tmp_path)))
    path = refs.world_dataset(run, "data:english/finetune/insecure", "world", "finetune.data")
    records, bad = read_jsonl(path)  # every line a valid chat record
    assert len(records) == 20 and bad == 0
    assert records == build(cfg.datasets)["finetune/insecure"]
    with pytest.raises(refs.MissingInput, match="emergent datasets"):
        refs.world_dataset(run, "data:english/finetune/nothing", "world", "finetune.data")
