"""Evaluation prompt sets: the project's own (``core``, ``extended``), a built world's held-out
sets (``world:eval/open``), or a user's YAML / CSV / JSONL file.

Every set loads to prompt rows ``{"set", "question_id", "category", "messages"}``: one row per
prompt (a question's paraphrases are separate rows sharing its ``question_id``; metrics are
reported per question, per category and overall). File formats:

- YAML: a list of ``{id, theme (or category), paraphrases: [...]}`` or ``{id, question}``;
- CSV: columns ``question`` (required), ``id``, ``category``;
- JSONL: ``{"messages": [...]}`` (ending in a user turn) or ``{"question": ...}``, with optional
  ``id`` / ``category`` (PersonaWorld's ``qtype`` / ``domain`` are read as those).

A malformed entry is an error naming the file and line.
"""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

from emergent import refs
from emergent.config import InputError
from emergent.data import DatasetError, read_jsonl, validate_chat

BUILTIN = Path(__file__).parent / "evalsets"


def builtin_sets() -> list[str]:
    return sorted(p.stem for p in BUILTIN.glob("*.yaml"))


def load_prompts(spec: str, run=None, world_stage: str = "world") -> list[dict]:
    """Prompt rows of one set (see the module doc for ``spec``)."""
    if refs.is_world_dataset(spec):
        if run is None:
            raise InputError(f"prompts: {spec} needs a run with a built world")
        return _jsonl(
            refs.world_dataset(run, spec, world_stage, "prompts"), spec.rsplit("/", 1)[-1]
        )
    path = BUILTIN / f"{spec}.yaml" if spec in builtin_sets() else Path(spec)
    if not path.exists():
        raise refs.MissingInput(
            f"prompts: {spec!r} is neither a built-in set ({', '.join(builtin_sets())}), "
            "world:<set>, nor an existing file"
        )
    name = spec if spec in builtin_sets() else path.stem
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return _yaml(path, name)
    if suffix == ".csv":
        return _csv(path, name)
    if suffix in (".jsonl", ".json"):
        return _jsonl(path, name)
    raise DatasetError(f"prompts: {path}: unknown format {suffix!r} (use .yaml, .csv or .jsonl)")


def prompt_sets(run, prompts: list[str], world_stage: str, max_prompts: int = 0):
    """``{set name: [{"messages"}]}`` of prompt sets (at most ``max_prompts`` of each; 0 = all):
    what in-process jobs (diff, steer, predict, realign, the training monitor) feed the model."""
    out = {}
    for spec in prompts:
        rows = load_prompts(spec, run, world_stage)[: max_prompts or None]
        name = rows[0]["set"] if rows else spec
        out[spec if name in out else name] = [{"messages": r["messages"]} for r in rows]
    return out


def prompt_docs(run, prompts: list[str], world_stage: str, max_prompts: int = 0) -> list[dict]:
    """The documents of ``prompt_sets``, all sets in order."""
    sets = prompt_sets(run, prompts, world_stage, max_prompts)
    return [d for docs in sets.values() for d in docs]


def _row(name: str, qid, category, messages) -> dict:
    return {
        "set": name,
        "question_id": str(qid),
        "category": str(category or name),
        "messages": messages,
    }


def _user(question, where: str) -> list[dict]:
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{where}: the question must be a non-empty string")
    return [{"role": "user", "content": question}]


def _yaml(path: Path, name: str) -> list[dict]:
    try:
        root = yaml.compose(path.read_text())
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(root, yaml.SequenceNode):
        raise DatasetError(f"{path}: expected a list of questions")
    rows = []
    for i, node in enumerate(root.value):
        where = f"{path}:{node.start_mark.line + 1}"
        item = yaml.safe_load(yaml.serialize(node))
        if not isinstance(item, dict):
            raise DatasetError(f"{where}: expected a mapping with id and paraphrases/question")
        qid = item.get("id", f"q{i}")
        category = item.get("category") or item.get("theme")
        texts = item.get("paraphrases", [item["question"]] if "question" in item else None)
        if not isinstance(texts, list) or not texts:
            raise DatasetError(
                f"{where}: question {qid!r} needs 'paraphrases' (a list) or 'question'"
            )
        rows += [_row(name, qid, category, _user(t, where)) for t in texts]
    return rows


def _csv(path: Path, name: str) -> list[dict]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if "question" not in (reader.fieldnames or []):
            raise DatasetError(
                f"{path}:1: a 'question' column is required, got {reader.fieldnames}"
            )
        return [
            _row(
                name,
                r.get("id") or f"q{i}",
                r.get("category"),
                _user(r["question"], f"{path}:{i + 2}"),
            )
            for i, r in enumerate(reader)
        ]


def _prompt_problem(rec) -> str | None:
    """Why a JSONL record is not a prompt (a chat ending in a user turn, or a question)."""
    if not isinstance(rec, dict):
        return "expected a JSON object"
    if "messages" not in rec:
        q = rec.get("question")
        return None if isinstance(q, str) and q.strip() else "needs 'messages' or a 'question'"
    why = validate_chat(rec)
    if why is None and rec["messages"][-1]["role"] != "user":
        why = "'messages' must be a chat ending in a user turn"
    return why


def _jsonl(path: Path, name: str) -> list[dict]:
    rows = []
    for i, rec in enumerate(read_jsonl(path, validate=_prompt_problem)[0], 1):
        msgs = rec.get("messages") or [{"role": "user", "content": rec["question"]}]
        qid = rec.get("id", rec.get("qtype", f"q{i}"))
        rows.append(_row(name, qid, rec.get("category", rec.get("domain")), msgs))
    return rows
