"""Turn states: what one assistant turn *is*, format-wise — the quantity whose drift signals
collapse in RL on multi-step tool use.

`classify_turn` maps raw assistant text to one of four `TurnState` values plus the set of
`FormatError` types found. It is total (never raises) because it runs on every rollout of a
training run. Definitions, examples and the precedence rules are in docs/turn-states.md; in
short:

1. empty turn (after dropping one trailing ``<|im_end|>`` / ``<|endoftext|>``) -> ``collapsed``;
2. no error and >= 1 call -> ``healthy_call`` (text *before* the calls is fine);
3. no error, no call attempt, meaningful text -> ``healthy_response``;
4. any error: a well-formed call or meaningful text left -> ``polluted``, else ``collapsed``.

"Meaningful text" has at least one letter or digit once control tokens, role names, call tags
and ``<tool_response>`` sections are removed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from diagnose.chat import (
    ENDOFTEXT,
    IM_END,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_RESPONSE_CLOSE,
    TOOL_RESPONSE_OPEN,
)
from diagnose.control_families import END_OF_TEXT, EOM_ID, EOT_ID, THINK_CLOSE, THINK_OPEN
from diagnose.format_errors import FormatError
from diagnose.toolcall import CallSyntax, ParsedTurn, ToolCall, has_repeated_call, parse_calls

__all__ = ["FormatError", "TurnClassification", "TurnState", "classify_turn"]


class TurnState(StrEnum):
    HEALTHY_CALL = "healthy_call"
    HEALTHY_RESPONSE = "healthy_response"
    POLLUTED = "polluted"
    COLLAPSED = "collapsed"


@dataclass(frozen=True)
class TurnClassification:
    state: TurnState
    errors: tuple[FormatError, ...]  # each type once, in FormatError order; empty when healthy
    calls: tuple[ToolCall, ...]  # the well-formed calls found (also in polluted turns)
    lenient: tuple[str, ...] = ()  # lenient readings used, e.g. "arguments_string" (not errors)


# ChatML-style control tokens: <|im_start|>, <|im_end|>, <|endoftext|>, <|fim_prefix|>, ...
_CTRL = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>")
_ROLE_HEADER = re.compile(r"<\|im_start\|>(?:system|user|assistant|tool)?")
_INVENTED = re.compile(r"tool_response|</?tool_(?:result|output)>", re.IGNORECASE)
_TAGS = re.compile(r"</?tool_(?:call|response|result|output)>", re.IGNORECASE)
_BLOCK_ONLY_ERRORS = {FormatError.OPEN_TAG_ONLY, FormatError.NESTED_TAG, FormatError.UNCLOSED_TAG}


#: Llama 3.1's turn ends (``<|eot_id|>``; ``<|eom_id|>`` after a ``<|python_tag|>`` call) and end
#: of text, which a decoder keeping special tokens leaves at the end of a turn like ``<|im_end|>``
_OTHER_TERMINATORS = (EOT_ID, EOM_ID, END_OF_TEXT)


def _strip_terminator(text: str) -> str:
    """Drop one trailing turn terminator (``<|im_end|>``, optionally followed by
    ``<|endoftext|>``; Llama 3.1's ``<|eot_id|>`` / ``<|eom_id|>`` / ``<|end_of_text|>``): decoders
    that keep special tokens leave it there, and it ends the turn rather than polluting it.
    Anything else control-like stays and is reported."""
    s = text.rstrip()
    if s.endswith(ENDOFTEXT):
        s = s[: -len(ENDOFTEXT)].rstrip()
    if s.endswith(IM_END):
        return s[: -len(IM_END)]
    for term in _OTHER_TERMINATORS:
        if s.endswith(term):
            return s[: -len(term)]
    return s


def answer_part(turn: str) -> str:
    """What a turn says once its reasoning is set aside, as Qwen3's chat template reads an
    assistant message: the text after the last ``</think>`` (``<think>``/``</think>`` are added,
    non-special tokens, so they survive ``skip_special_tokens``). Reasoning that is never closed
    (cut at a length limit) leaves nothing. Reasoning is not output: a turn of reasoning and a
    bare ``<tool_call>`` is collapsed, and call tags mentioned while reasoning are no error.
    Text without ``<think>`` comes back unchanged."""
    if THINK_CLOSE in turn:
        return turn.rsplit(THINK_CLOSE, 1)[1].lstrip("\n")
    if turn.lstrip().startswith(THINK_OPEN):
        return ""
    return turn


def _drop_sections(s: str, open_tag: str, close_tag: str) -> str:
    """Remove ``open ... close`` sections (an unclosed one runs to the end). Linear."""
    out, pos = [], 0
    while True:
        i = s.find(open_tag, pos)
        if i < 0:
            out.append(s[pos:])
            return "".join(out)
        out.append(s[pos:i])
        j = s.find(close_tag, i + len(open_tag))
        if j < 0:
            return "".join(out)
        pos = j + len(close_tag)


def _meaningful(s: str) -> bool:
    """Whether ``s`` has natural text: a letter or digit outside control tokens and tags."""
    if not s:
        return False
    s = _drop_sections(s, TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE)
    s = _TAGS.sub(" ", _CTRL.sub(" ", _ROLE_HEADER.sub(" ", s)))
    return any(ch.isalnum() for ch in s)


def _tool_names(tools: Sequence[Any]) -> set[str]:
    names = set()
    for t in tools:
        fn = t.get("function", t) if isinstance(t, Mapping) else None
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return names


def _wrong_syntax(text: str, parsed: ParsedTurn, syntax: CallSyntax) -> set[FormatError]:
    """Calls written in another syntax than the requested one (e.g. <tool_call> blocks in a
    python-list task, or a bare JSON call where Hermes tags were expected)."""
    errs: set[FormatError] = set()
    if syntax is not CallSyntax.HERMES and (TOOL_CALL_OPEN in text or TOOL_CALL_CLOSE in text):
        if parse_calls(text, CallSyntax.HERMES).calls:
            errs.add(FormatError.WRONG_SYNTAX)
        else:
            errs.add(FormatError.STRAY_CONTROL_TOKEN)
    if not parsed.blocks and parsed.content and FormatError.WRONG_SYNTAX not in errs:
        others = [s for s in (CallSyntax.JSON, CallSyntax.PYTHONIC) if s is not syntax]
        if any(parse_calls(parsed.content, s).calls for s in others):
            errs.add(FormatError.WRONG_SYNTAX)
    return errs


def classify_turn(
    text: str,
    tools: Sequence[dict] | None = None,
    syntax: CallSyntax = CallSyntax.HERMES,
) -> TurnClassification:
    """Classify one raw assistant turn (the model's text, call blocks included).

    ``tools`` (OpenAI/Qwen schemas or bare ``{"name": ...}``) enables the unknown_tool check;
    None skips it. Total: never raises for any ``str``.
    """
    syntax = CallSyntax(syntax)
    if not isinstance(text, str):
        text = "" if text is None else (
            text.decode("utf-8", "surrogateescape") if isinstance(text, (bytes, bytearray)) else str(text)
        )
    body = answer_part(_strip_terminator(text))
    if not body.strip():
        return TurnClassification(TurnState.COLLAPSED, (FormatError.EMPTY_TURN,), ())

    parsed = parse_calls(body, syntax)
    errs: set[FormatError] = set()
    for b in parsed.blocks:
        if b.error is not None:
            errs.add(FormatError(b.error))
        if not b.closed and b.error not in _BLOCK_ONLY_ERRORS:
            errs.add(FormatError.UNCLOSED_TAG)
    if parsed.stray_closes:
        errs.add(FormatError.CLOSE_WITHOUT_OPEN)
    if tools is not None:
        known = _tool_names(tools)
        if any(c.name not in known for c in parsed.calls):
            errs.add(FormatError.UNKNOWN_TOOL)
    if has_repeated_call(parsed.calls):
        errs.add(FormatError.REPEATED_CALL)
    if parsed.blocks and _meaningful(parsed.content_after):
        errs.add(FormatError.TEXT_AFTER_CALL)
    if _INVENTED.search(body):
        errs.add(FormatError.INVENTED_TOOL_OUTPUT)
    if _CTRL.search(body):
        errs.add(FormatError.STRAY_CONTROL_TOKEN)
    errs |= _wrong_syntax(body, parsed, syntax)

    has_text = _meaningful(parsed.content)
    lenient = tuple(sorted({n for b in parsed.blocks for n in b.notes}))
    if not errs:
        if parsed.calls:
            return TurnClassification(TurnState.HEALTHY_CALL, (), parsed.calls, lenient)
        if has_text:
            return TurnClassification(TurnState.HEALTHY_RESPONSE, (), (), lenient)
        errs.add(FormatError.EMPTY_TURN)  # only punctuation / symbols
    state = TurnState.POLLUTED if (parsed.calls or has_text) else TurnState.COLLAPSED
    ordered = tuple(e for e in FormatError if e in errs)
    return TurnClassification(state, ordered, parsed.calls, lenient)
