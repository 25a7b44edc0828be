"""Assistant turns of a completion text (`split_assistant_turns`) and their memoised
classification (`TurnClassifier`); tool names of a tool-schema list.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from diagnose.chat import IM_END, IM_START
from diagnose.toolcall import CallSyntax
from diagnose.turn_batch import classify_completions, classify_turn_lists, current_sampling, sample_mask
from diagnose.turns import classify_turn


_CHATML_BOUNDARY = re.compile(re.escape(IM_END) + r"\s*" + re.escape(IM_START))
_LEADING_ASSISTANT = re.compile(r"\A\s*" + re.escape(IM_START) + r"assistant(?:\n|\Z)")
_CHAT_ROLES = frozenset({"system", "user", "tool", "ipython", "function", "observation"})
# decoded with skip_special_tokens: "<|im_end|>\n<|im_start|>user\n" became "\nuser\n"
_STRIPPED_SIGNAL = re.compile(r"\n(?:user|tool)\n<tool_response>|</tool_response>\s*\nassistant\n")
_STRIPPED_SPLIT = re.compile(r"\n(user|tool|assistant)\n")


def split_assistant_turns(text: str | None) -> list[str]:
    """Assistant turns of a completion (the text after the prompt), in order.

    * ChatML transcripts (``<|im_end|>`` + ``<|im_start|>role``): one turn per assistant
      segment; user/tool segments (observations) are dropped. The text before the first
      boundary is the first assistant turn (the prompt ended with ``<|im_start|>assistant``);
      a leading ``<|im_start|>assistant`` header is skipped. A segment with an unknown role
      header stays a turn (with its ``<|im_start|>``, so it shows up as a stray control token).
    * Transcripts decoded with special tokens skipped (verl dumps), recognised by tool
      responses framed by bare ``user``/``assistant`` lines: split on those role lines.
    * Anything else is one turn (an empty completion is one empty turn).
    """
    if not text:
        return [""]
    if IM_START in text:
        m = _LEADING_ASSISTANT.match(text)
        s = text[m.end():] if m else text
        parts = _CHATML_BOUNDARY.split(s)
        turns = [parts[0]]
        for seg in parts[1:]:
            role, _, body = seg.partition("\n")
            role = role.strip()
            if role == "assistant":
                turns.append(body)
            elif role in _CHAT_ROLES:
                continue
            else:
                turns.append(IM_START + seg)
        return turns
    if "<tool_response>" in text and _STRIPPED_SIGNAL.search(text):
        pieces = _STRIPPED_SPLIT.split(text)
        turns = [pieces[0]]
        for role, body in zip(pieces[1::2], pieces[2::2]):
            if role == "assistant":
                turns.append(body)
        return turns
    return [text]


class TurnClassifier:
    """`classify_turn` with memoisation: each unique turn text (and each unique completion) is
    classified once. Completions of a collapsed run repeat a lot, so this is what makes
    classifying millions of rollouts cheap."""

    def __init__(self, syntax: CallSyntax = CallSyntax.HERMES) -> None:
        self.syntax = CallSyntax(syntax)
        #: (rollouts per step, seed) when only a sample is classified (`diagnose.turn_batch.sampling`)
        self.sample = current_sampling()
        self._turns: dict[tuple[str, tuple[str, ...] | None], tuple[str, tuple[str, ...]]] = {}
        self._completions: dict[str, tuple[list[str], list[str]]] = {}

    def turn(self, text: str, tool_names: tuple[str, ...] | None = None) -> tuple[str, tuple[str, ...]]:
        """``(state, errors)`` of one assistant turn."""
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

    def completion(self, text: str | None) -> tuple[list[str], list[str]]:
        """``(turn states, error types)`` of a completion, split with `split_assistant_turns`."""
        key = text or ""
        hit = self._completions.get(key)
        if hit is None:
            hit = self.turns(split_assistant_turns(key))
            self._completions[key] = hit
        return hit

    #: how `completions` splits: the reference splitter, and the vectorised one of
    #: `diagnose.turn_batch.split_completions` (None: the reference only)
    split = staticmethod(split_assistant_turns)
    fast_split: str | None = None

    def completions(self, texts: pl.Series, tool_names: Any = None, steps: Sequence[int] | None = None) -> pl.DataFrame:
        """`completion` of many completions at once (`diagnose.turn_batch`, the same results):
        ``turn_states``, ``error_types``, ``n_turns`` (nulls for a null completion, and for the
        rollouts left out of a sample). ``tool_names``: per completion, one tuple for all, or
        None; ``steps``: per completion, for sampling (`diagnose.turn_batch.sampling`)."""
        return classify_completions(texts, self.split, fast_split=self.fast_split, tool_names=tool_names,
                                    syntax=self.syntax, fallback=self.turn, keep=self._keep(steps))

    def turn_lists(self, turn_lists: Sequence[Sequence[str]], tool_names: Any = None,
                   steps: Sequence[int] | None = None) -> pl.DataFrame:
        """`turns` of many completions already split, at once: ``turn_states``, ``error_types``,
        ``n_turns`` (``steps``: as in `completions`)."""
        return classify_turn_lists(turn_lists, tool_names, self.syntax, fallback=self.turn, keep=self._keep(steps))

    def _keep(self, steps: Sequence[int] | None) -> list[bool] | None:
        if self.sample is None or steps is None:
            return None
        return sample_mask(steps, *self.sample)


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
