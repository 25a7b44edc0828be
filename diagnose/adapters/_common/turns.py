"""Memoised classification of assistant turns (`TurnClassifier`), of completions split with
`diagnose.transcripts.split_turns`; tool names of a tool-schema list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from diagnose.toolcall import CallSyntax
from diagnose.transcripts import Dialect, split_turns
from diagnose.turns import classify_turn


class TurnClassifier:
    """`classify_turn` with memoisation: each unique turn text (and each unique completion) is
    classified once. Completions of a collapsed run repeat a lot, so this is what makes
    classifying millions of rollouts cheap. ``dialect``: how the completions are written (they
    are split with `split_turns`)."""

    def __init__(self, syntax: CallSyntax = CallSyntax.HERMES, dialect: Dialect = Dialect.CHATML) -> None:
        self.syntax = CallSyntax(syntax)
        self.dialect = Dialect(dialect)
        self._turns: dict[tuple[str, tuple[str, ...] | None], tuple[str, tuple[str, ...]]] = {}
        self._completions: dict[tuple[str, tuple[str, ...] | None], tuple[list[str], list[str]]] = {}

    def turn(self, text: str, tool_names: tuple[str, ...] | None = None) -> tuple[str, tuple[str, ...]]:
        """``(state, errors)`` of one assistant turn; with ``tool_names``, a call to another
        tool is ``unknown_tool``."""
        key = (text, tool_names)
        hit = self._turns.get(key)
        if hit is None:
            tools = None if tool_names is None else [{"name": n} for n in tool_names]
            c = classify_turn(text, tools, self.syntax)
            hit = (c.state.value, tuple(e.value for e in c.errors))
            self._turns[key] = hit
        return hit

    def turns(self, texts: Sequence[str], tool_names: tuple[str, ...] | None = None) -> tuple[list[str], list[str]]:
        """``(states, errors)`` of a list of assistant turns; errors of all turns concatenated."""
        states: list[str] = []
        errors: list[str] = []
        for t in texts:
            s, e = self.turn(t, tool_names)
            states.append(s)
            errors.extend(e)
        return states, errors

    def completion(self, text: str | None,
                   tool_names: tuple[str, ...] | None = None) -> tuple[list[str], list[str]]:
        """``(turn states, error types)`` of a completion, split with `split_turns` in this
        classifier's dialect."""
        key = (text or "", tool_names)
        hit = self._completions.get(key)
        if hit is None:
            hit = self._completions[key] = self.turns(split_turns(key[0], self.dialect), tool_names)
        return hit


def tool_names_of(tools: Any) -> tuple[str, ...] | None:
    """Sorted tool names of OpenAI/Qwen schemas (or bare ``{"name"}``), None if no tools given."""
    if not isinstance(tools, list) or not tools:
        return None
    names = set()
    for t in tools:
        fn = t.get("function", t) if isinstance(t, Mapping) else None
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return tuple(sorted(names))
