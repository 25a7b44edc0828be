"""The part of a rollout a reader needs to see: the turn that broke, with the context before it.

Why: a rollout's first N characters are its healthy first turns; the turn that broke comes later
and was cut off (``"acct-4066"}\\n</to …``). An excerpt here starts a little before the first
turn whose state is not healthy (the end of the turn before it, a tool output) and runs through
that turn, within a character budget; a cut never falls inside a control string
(``<tool_call>``, ``<|im_end|>``), so none is shown half.
"""

from __future__ import annotations

from collections.abc import Sequence

from diagnose.chat import CONTROL_STRINGS
from diagnose.transcripts import Dialect, split_turns

__all__ = ["BROKEN_STATES", "Excerpt", "broken_turn_excerpt", "safe_cut"]

#: Turn states that count as broken (docs/turn-states.md).
BROKEN_STATES = frozenset({"polluted", "collapsed"})
ELLIPSIS = "…"


def safe_cut(text: str, pos: int, forward: bool) -> int:
    """``pos`` moved out of any control string it falls inside (to its end when ``forward``,
    else to its start)."""
    pos = max(0, min(len(text), pos))
    for s in CONTROL_STRINGS:
        start = text.rfind(s, max(0, pos - len(s) + 1), min(len(text), pos + len(s) - 1))
        if start != -1 and start < pos < start + len(s):
            return start + len(s) if forward else start
    return pos


class Excerpt(str):
    """An excerpt (a ``str``) that knows which assistant turn broke (``broken_turn``: its index,
    or None) and where that turn starts in the excerpt (``broken_at``)."""

    broken_turn: int | None
    broken_at: int | None

    def __new__(cls, text: str, broken_turn: int | None = None, broken_at: int | None = None) -> Excerpt:
        out = super().__new__(cls, text)
        out.broken_turn, out.broken_at = broken_turn, broken_at
        return out


def _turn_offsets(turns: list[str], completion: str) -> list[int]:
    """Where each of the assistant ``turns`` of ``completion`` starts (located in the text); turns
    that cannot be located (a splitter that rewrote them) are left out."""
    out, cursor = [], 0
    for turn in turns:
        if not turn:
            continue
        i = completion.find(turn, cursor)
        if i < 0:
            continue
        out.append(i)
        cursor = i + len(turn)
    return out


def broken_turn_excerpt(completion: str | None, turn_states: Sequence[str] | None, limit: int = 400,
                        context: int = 120, dialect: Dialect | str = Dialect.CHATML) -> Excerpt | None:
    """The excerpt of ``completion`` (at most ``limit`` characters plus ellipses) around its first
    broken turn: up to ``context`` characters before it, then the turn; its turns split as
    ``dialect`` writes them (the source's, as its turn states were classified). A rollout with
    no broken turn (or whose turns cannot be located) gives its first ``limit`` characters."""
    if completion is None:
        return None
    states = list(turn_states or [])
    k = next((i for i, st in enumerate(states) if st in BROKEN_STATES), None)
    turns = split_turns(completion, dialect) if k is not None else []
    offsets = _turn_offsets(turns, completion)
    if k is None or k >= len(offsets) or len(states) != len(turns):
        end = safe_cut(completion, limit, forward=False)
        return Excerpt(completion[:end] + (ELLIPSIS if end < len(completion) else ""))
    at = offsets[k]
    start = safe_cut(completion, at - context, forward=False) if at > context else 0
    end = safe_cut(completion, start + limit, forward=False) if start + limit < len(completion) else len(completion)
    if end <= at:  # the context alone would fill the budget: the broken turn first
        start, end = at, safe_cut(completion, at + limit, forward=False)
    head = ELLIPSIS if start > 0 else ""
    text = head + completion[start:end] + (ELLIPSIS if end < len(completion) else "")
    return Excerpt(text, k, len(head) + at - start)
