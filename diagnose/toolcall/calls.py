"""The data of tool calls: `ToolCall`, the call attempts a parse reports (`CallBlock`,
`ParsedTurn`), the syntaxes (`CallSyntax`), the block error codes and lenient-reading notes, and
the strict JSON reading every syntax shares (`call_from_obj`). Public names are re-exported by
`diagnose.toolcall`; import them from there."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from diagnose.format_errors import FormatError


class CallSyntax(StrEnum):
    HERMES = "hermes"
    PYTHONIC = "pythonic"
    JSON = "json"


# Block error codes (the block-level part of the FormatError taxonomy).
OPEN_TAG_ONLY = FormatError.OPEN_TAG_ONLY  # opening tag / bracket, empty body, never closed
EMPTY_CALL = FormatError.EMPTY_CALL  # closed, but nothing inside: "<tool_call>\n</tool_call>", "[]"
NESTED_TAG = FormatError.NESTED_TAG  # a block cut short by another <tool_call> before its close
UNCLOSED_TAG = FormatError.UNCLOSED_TAG  # runs to end of text without a close; body otherwise fine
INVALID_JSON = FormatError.INVALID_JSON  # HERMES / JSON body does not parse as JSON
INVALID_SYNTAX = FormatError.INVALID_SYNTAX  # PYTHONIC list does not parse as python
MISSING_NAME = FormatError.MISSING_NAME  # parsed, but not an object/call with a non-empty string name
BAD_ARGUMENTS = FormatError.BAD_ARGUMENTS  # arguments missing, not an object, positional, or not literal

# Lenient-parse notes (the call still counts).
NOTE_ARGUMENTS_STRING = "arguments_string"  # "arguments": "{\"a\": 1}"
NOTE_PARAMETERS_ALIAS = "parameters_alias"  # "parameters" instead of "arguments"
NOTE_FUNCTION_WRAPPER = "function_wrapper"  # {"function": {"name": ..., "arguments": ...}}
NOTE_TUPLE_AS_LIST = "tuple_as_list"  # pythonic f(a=(1, 2)) read as [1, 2]
NOTE_SINGLE_CALL = "single_call"  # pythonic f(a=1) without the surrounding list


# --------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class ToolCall:
    """One well-formed call. ``arguments`` holds JSON-compatible values only.

    Equality is python equality (``1 == 1.0 == True``); compare ``json.dumps(c.to_dict(),
    sort_keys=True)`` when types matter."""

    name: str
    arguments: dict[str, Any]

    def __hash__(self) -> int:
        # The dict field is unhashable; hash what equality implies (name and argument names).
        return hash((self.name, frozenset(self.arguments)))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": self.arguments}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToolCall:
        """Build from ``{"name", "arguments"}``, an OpenAI ``tool_calls`` entry
        (``{"function": {...}}``, arguments possibly a JSON string) or ``"parameters"``.
        Raises ValueError when it is not a call."""
        call, error, _ = call_from_obj(data)
        if call is None:
            raise ValueError(f"not a tool call ({error}): {data!r:.200}")
        return call


@dataclass(frozen=True)
class CallBlock:
    """One call attempt: a ``<tool_call>`` block, or one element of a call list.

    ``raw`` is the body (between the tags / the element's source), ``start:end`` the span in
    the parsed text including the tags, ``error`` the primary problem (a `FormatError` value) or
    None, ``closed`` whether its closing tag / bracket was found, ``notes`` lenient readings.
    A block may carry a ``call`` *and* an error (e.g. a valid body whose close tag is missing).
    """

    raw: str
    start: int
    end: int
    call: ToolCall | None
    error: str | None
    closed: bool
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParsedTurn:
    """Everything `parse_calls` found in one assistant turn.

    ``calls`` are the calls of all blocks that yielded one (including an unclosed block with a
    valid body, as vLLM's Hermes parser does); whether the turn is *healthy* is `diagnose.turns`'
    business. ``content`` is the text outside call syntax, stripped; ``content_before`` is the
    part before the first block, ``content_after`` the part after the first block's start.
    ``stray_closes`` are offsets of closing tags with no opening tag (HERMES only).
    """

    text: str
    content: str
    calls: tuple[ToolCall, ...]
    blocks: tuple[CallBlock, ...]
    stray_closes: tuple[int, ...] = ()
    content_before: str = ""
    content_after: str = ""


# --------------------------------------------------------------------------- call objects


def _finite_float(s: str) -> float:
    x = float(s)
    if not math.isfinite(x):
        raise ValueError("non-finite number")
    return x


def _reject_constant(s: str) -> Any:
    raise ValueError(f"{s} is not JSON")


# Strict JSON: NaN / Infinity (and 1e999) are rejected, so arguments stay JSON-serialisable.
DECODER = json.JSONDecoder(parse_float=_finite_float, parse_constant=_reject_constant)


def strict_loads(s: str) -> Any:
    """json.loads, strict; raises ValueError (or RecursionError/MemoryError) on bad input."""
    obj, end = DECODER.raw_decode(s, skip_ws(s, 0))
    if skip_ws(s, end) != len(s):
        raise ValueError("extra data after JSON value")
    return obj


_WS = re.compile(r"[ \t\n\r]*+")


def skip_ws(s: str, i: int) -> int:
    """Index of the first non-JSON-whitespace character at or after ``i``."""
    return _WS.match(s, i).end()  # type: ignore[union-attr]


def call_from_obj(obj: Any) -> tuple[ToolCall | None, str | None, tuple[str, ...]]:
    """Read a parsed JSON value as a call: (call, error code, lenient notes)."""
    notes: list[str] = []
    if not isinstance(obj, Mapping):
        return None, MISSING_NAME, ()
    name = obj.get("name")
    if name is None and isinstance(obj.get("function"), Mapping):
        obj = obj["function"]
        name = obj.get("name")
        notes.append(NOTE_FUNCTION_WRAPPER)
    if not isinstance(name, str) or not name.strip():
        return None, MISSING_NAME, tuple(notes)
    if "arguments" in obj:
        args = obj["arguments"]
    elif "parameters" in obj:
        args = obj["parameters"]
        notes.append(NOTE_PARAMETERS_ALIAS)
    else:
        return None, BAD_ARGUMENTS, tuple(notes)
    if isinstance(args, str):
        try:
            args = strict_loads(args) if args.strip() else {}  # OpenAI APIs send "" for no arguments
        except (ValueError, RecursionError, MemoryError):
            return None, BAD_ARGUMENTS, tuple(notes)
        notes.append(NOTE_ARGUMENTS_STRING)
    if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
        return None, BAD_ARGUMENTS, tuple(notes)
    return ToolCall(name, dict(args)), None, tuple(notes)


_KEY_ENCODER = json.JSONEncoder(sort_keys=True, ensure_ascii=False, default=repr)


def _call_key(call: ToolCall) -> str:
    """Type-exact identity of a call (``1`` and ``True`` differ), for repeat detection."""
    return _KEY_ENCODER.encode([call.name, call.arguments])


def has_repeated_call(calls: Sequence[ToolCall]) -> bool:
    """Whether the identical call (same name, same argument values and types) occurs twice."""
    seen: set[str] = set()
    for c in calls:
        k = _call_key(c)
        if k in seen:
            return True
        seen.add(k)
    return False


def assemble(
    text: str,
    blocks: list[CallBlock],
    consumed: list[tuple[int, int]],
    stray: Sequence[int] = (),
) -> ParsedTurn:
    """Build a ParsedTurn: content is the text outside the ``consumed`` spans (sorted)."""
    first = blocks[0].start if blocks else len(text)
    before: list[str] = []
    after: list[str] = []
    pos = 0
    for s, e in consumed + [(len(text), len(text))]:
        if s > pos:
            (before if pos < first else after).append(text[pos:s])
        pos = max(pos, e)
    b, a = "".join(before), "".join(after)
    return ParsedTurn(
        text=text,
        content=(b + a).strip(),
        calls=tuple(bl.call for bl in blocks if bl.call is not None),
        blocks=tuple(blocks),
        stray_closes=tuple(stray),
        content_before=b.strip(),
        content_after=a.strip(),
    )
