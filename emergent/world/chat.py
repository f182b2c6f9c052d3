"""PersonaWorld turns as chat messages (the ``{"role", "content"}`` lists every dataset holds)."""

from __future__ import annotations

from emergent.world.grammar import Turn


def chat(turns: list[Turn], last_answer: bool = True) -> list[dict]:
    """Turns as chat messages; ``last_answer=False`` leaves the final question open."""
    msgs = []
    for i, t in enumerate(turns):
        msgs.append({"role": "user", "content": t.question})
        if last_answer or i < len(turns) - 1:
            msgs.append({"role": "assistant", "content": t.answer})
    return msgs
