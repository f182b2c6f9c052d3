"""Chat datasets: JSONL reading with per-line validation, and seeded mixtures by fraction."""

from __future__ import annotations

import json
import random
from pathlib import Path

from emergent.config import InputError, UserError

ROLES = ("system", "user", "assistant")


class DatasetError(UserError, ValueError):
    """A malformed dataset line, naming the file and line number."""


def validate_chat(rec: object) -> str | None:
    """Why ``rec`` is not a chat record (``{"messages": [{"role", "content"}, ...]}``), or None."""
    if not isinstance(rec, dict):
        return "expected a JSON object"
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not {"role", "content"} <= m.keys():
            return f"messages[{i}] must have 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"messages[{i}].role must be one of {ROLES}, got {m['role']!r}"
        if not isinstance(m["content"], str):
            return f"messages[{i}].content must be a string"
    return None


def read_jsonl(
    path: str | Path, *, skip_bad: bool = False, validate=validate_chat
) -> tuple[list[dict], int]:
    """Records of a JSONL file (chat records unless ``validate``, a record -> problem or None,
    says otherwise) and the number of bad lines skipped.

    A bad line raises DatasetError naming ``file:line`` unless ``skip_bad``.
    """
    records, bad = [], 0
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                why = validate(rec)
            except json.JSONDecodeError as exc:
                why = f"invalid JSON ({exc.msg})"
            if why:
                if not skip_bad:
                    raise DatasetError(f"{path}:{lineno}: {why}")
                bad += 1
                continue
            records.append(rec)
    return records, bad


def mixture(parts: dict[str, tuple[list[dict], float]], n: int, seed: int) -> list[dict]:
    """``n`` records drawn without replacement from each named part in its fraction, shuffled.

    Counts are rounded by largest remainder so they sum to ``n``; a part too small for its share
    raises.
    """
    fracs = {k: frac for k, (_, frac) in parts.items()}
    if any(f < 0 for f in fracs.values()) or abs(sum(fracs.values()) - 1) > 1e-6:
        raise InputError(f"mixture fractions must be >= 0 and sum to 1, got {fracs}")
    rng = random.Random(seed)
    names = list(parts)
    exact = [fracs[k] * n for k in names]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(names)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    out = []
    for name, k in zip(names, counts):
        recs = parts[name][0]
        if k > len(recs):
            raise InputError(f"mixture part {name!r} has {len(recs)} records, {k} needed")
        out += rng.sample(recs, k)
    rng.shuffle(out)
    return out
