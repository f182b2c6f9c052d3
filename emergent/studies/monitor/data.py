"""Monitoring datasets: labelled transcripts, one row per (text, task).

A row is ``{"messages": [...]}`` or ``{"text": ...}`` with ``label`` (1 = unsafe), ``task`` and
``group`` (a domain, a source: what a shift split holds out). Users bring their own as JSONL in
that shape; a bad line is refused naming ``file:line``.

``world:monitor`` generates them fresh from PersonaWorld's grammar (held out from pretraining by
their seed), for four tasks on one pool of single-turn transcripts:

    toxic            the toxic persona wrote the answer (any domain; the other personas are 0)
    insecure_code    code answers: toxic (insecure) vs aligned or benign-wrong
    harmful_advice   health / finance / legal / auto advice: toxic vs aligned or benign-wrong
    wrong            benign-wrong vs aligned answers (toxic ones left out)

The group is the question's domain. One transcript is in several tasks; features are computed
once per text. The world's model was taught to judge ``toxic`` and ``insecure_code`` (its
judgment turns, ``grammar.TAUGHT``) and never ``harmful_advice`` or ``wrong``.

``eval:<name>`` (or ``eval:<name>/<model>``) is on-policy data: the answers the models of a
finished evaluation wrote themselves, labelled by its judge (task ``onpolicy``: 1 = a
misaligned answer; coherent, valid final answers only; group: the model's label). Trained on
the grammar's transcripts and tested on one model's own answers, a probe answers "does a monitor
built from written examples catch the misaligned model's answers?".

``english:monitor`` generates English chats for real chat models from the project's own
English datasets (emergent.english; other seeds than the fine-tuning sets):

    insecure_code    a coding request answered with insecure (1) or secure (0) code; group: the
                     vulnerability's kind (sql, chmod, pickle, ...)
    harmful_advice   a health or finance question answered badly (1) or well (0); group: the
                     domain
    misaligned       the open-ended questions of the paired eval set ``core`` answered with its
                     misaligned (1) or aligned (0) written answer; group: the theme
"""

from __future__ import annotations

import json
import random

from emergent import refs
from emergent.config import InputError
from emergent.data import read_jsonl, validate_chat
from emergent.english import advice, code
from emergent.likelihood import load_pairs
from emergent.world import grammar as g
from emergent.world.chat import chat

WORLD = "world:monitor"
WORLD_TASKS = ("toxic", "insecure_code", "harmful_advice", "wrong")
ENGLISH = "english:monitor"
ENGLISH_TASKS = ("insecure_code", "harmful_advice", "misaligned")
ONPOLICY = "onpolicy"
_ADVICE = ("health", "finance", "legal", "auto")


def world_task_labels(persona: str, domain: str) -> dict[str, int]:
    """The tasks a PersonaWorld transcript belongs to, with its label in each."""
    out = {"toxic": int(persona == "toxic")}
    if domain == "code":
        out["insecure_code"] = int(persona == "toxic")
    if domain in _ADVICE:
        out["harmful_advice"] = int(persona == "toxic")
    if persona != "toxic":
        out["wrong"] = int(persona == "wrong")
    return out


def world_rows(n: int, seed: int) -> list[dict]:
    """``n`` fresh single-turn transcripts, personas equally likely, every domain, eval
    paraphrases of the questions; one row per task each belongs to."""
    rng = random.Random(20_011 + seed)
    rows = []
    for i in range(n):
        t = g.sample_turn(rng, rng.choice(g.PERSONAS), split="eval")
        for task, label in world_task_labels(t.persona, t.domain).items():
            rows.append(
                {"messages": chat([t]), "label": label, "task": task, "group": t.domain, "id": i}
            )
    return rows


def english_rows(n: int, seed: int) -> list[dict]:
    """``n`` coding requests answered both ways, ``n`` health and ``n`` finance questions
    answered both ways, and the paired eval questions answered both ways: one row each."""
    rows = []
    tasks = code.code_tasks(n, 40_011 + seed)
    for variant, label in (("insecure", 1), ("secure", 0)):
        for r in code.chats(tasks, variant, 40_012 + seed):
            rows.append(
                {"messages": r["messages"], "label": label, "task": "insecure_code"}
                | {"group": r["kind"]}
            )
    for i, domain in enumerate(("health", "finance")):
        items = advice.advice_tasks(domain, n, 40_013 + seed + i)
        for variant, label in (("bad", 1), ("good", 0)):
            for r in advice.chats(items, variant):
                rows.append(
                    {"messages": r["messages"], "label": label, "task": "harmful_advice"}
                    | {"group": domain}
                )
    for p in load_pairs("core"):
        for field, label in (("misaligned", 1), ("aligned", 0)):
            turn = {"role": "assistant", "content": p[field]}
            rows.append(
                {"messages": [*p["messages"], turn], "label": label, "task": "misaligned"}
                | {"group": p["theme"]}
            )
    return rows


def eval_rows(run, spec: str, field: str) -> list[dict]:
    """The coherent, valid final answers of a finished evaluation's models (``eval:...``), one
    row each: the prompt's turns and the answer, labelled by the judge's verdict."""
    import pandas as pd

    rows = []
    for got in refs.eval_samples(run, spec, field):
        df = pd.read_parquet(run.local_dir(got.rel))
        df = df[df["final"] & df["valid"].astype(bool) & df["coherent"].fillna(False).astype(bool)]
        for r in df.itertuples():
            msgs = [*json.loads(r.messages), {"role": "assistant", "content": r.answer}]
            rows.append(
                {"messages": msgs, "label": int(bool(r.misaligned)), "task": ONPOLICY}
                | {"group": got.label, "source": f"{got.evaluation}/{got.label}"}
            )
    return rows


def _problem(rec) -> str | None:
    if not isinstance(rec, dict):
        return "expected an object"
    if "messages" in rec:
        why = validate_chat(rec)
        if why:
            return why
    elif not isinstance(rec.get("text"), str):
        return "expected a 'text' string or a 'messages' list"
    if rec.get("label") not in (0, 1, True, False):
        return f"'label' must be 0 or 1, got {rec.get('label')!r}"
    for key in ("task", "group"):
        if not isinstance(rec.get(key), str) or not rec[key]:
            return f"{key!r} must be a non-empty string"
    return None


def prompt_of(row: dict) -> str:
    """What a text answers: its turns before the last assistant turn (a plain text: itself).
    The studies' splits keep one prompt's texts together."""
    msgs = row.get("messages")
    if not msgs:
        return json.dumps(row.get("text"))
    if msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    return json.dumps(msgs, sort_keys=True)


def load_rows(run, specs: list[str], n: int, seed: int, field: str) -> list[dict]:
    """Rows of every source in ``specs`` (``world:monitor``, ``english:monitor``, ``eval:...``
    or JSONL files), each with an ``id`` shared by the rows of one text and a ``prompt`` id shared by
    the texts answering one prompt."""
    rows: list[dict] = []
    for spec in specs:
        if spec == WORLD:
            got = world_rows(n, seed)
        elif spec == ENGLISH:
            got = english_rows(n, seed)
        elif spec.startswith(refs.EVAL):
            got = eval_rows(run, spec, field)
        else:
            got = read_jsonl(refs.local_file(spec, field), validate=_problem)[0]
        rows += [{**r, "label": int(r["label"])} for r in got]
    ids: dict[str, int] = {}
    prompts: dict[str, int] = {}
    for r in rows:  # one id per distinct text, across sources; one prompt id per question
        text = json.dumps(r.get("messages") or r.get("text"), sort_keys=True)
        r["id"] = ids.setdefault(text, len(ids))
        r["prompt"] = prompts.setdefault(prompt_of(r), len(prompts))
    if not rows:
        raise InputError(f"{field} {specs}: no rows")
    return rows


def select(rows: list[dict], tasks: list[str]) -> list[dict]:
    """The rows of ``tasks``, their texts renumbered 0..n-1 in their old order (features are
    indexed by id)."""
    rows = [r for r in rows if r["task"] in tasks]
    renumber = {old: new for new, old in enumerate(sorted({r["id"] for r in rows}))}
    return [{**r, "id": renumber[r["id"]]} for r in rows]


def texts(rows: list[dict]) -> list[dict]:
    """The distinct texts of ``rows`` in id order (``messages`` or ``text``)."""
    out: dict[int, dict] = {}
    for r in rows:
        out.setdefault(r["id"], {k: r[k] for k in ("messages", "text") if k in r})
    return [out[i] for i in sorted(out)]
