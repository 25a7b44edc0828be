"""The one tool-call parser and renderer. Every module that reads or writes tool calls imports
this, so "what counts as a call" is decided in exactly one place.

Three syntaxes (`CallSyntax`):

* ``HERMES`` — Qwen2.5 / Hermes ``<tool_call>`` blocks holding ``{"name": ..., "arguments": {...}}``.
  Rendering is byte-identical to Qwen2.5's chat template.
* ``PYTHONIC`` — a python list of keyword-argument calls, ``[f(a=1, b="x"), g()]`` (BFCL/ACEBench).
  Parsed with `ast` and `ast.literal_eval` on single nodes only; nothing is ever evaluated.
* ``JSON`` — a JSON list of ``{"name": ..., "arguments": {...}}`` objects (or one object).

`parse_calls` is *total*: for any ``str`` it returns a `ParsedTurn` and never raises, in time
linear in the input (no backtracking regexes), because it runs on raw RL rollouts, where
anything — empty turns, megabytes of repetition, lone surrogates — shows up. It reports every
call *attempt* as a `CallBlock` with a primary error code; `diagnose.turns` turns those into a
turn state. The error codes are `diagnose.format_errors.FormatError` members, the taxonomy
`diagnose.turns` shares.
"""

from __future__ import annotations

import ast
import json
import keyword
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from diagnose.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, TOOLS_HEADER, render_tools_block
from diagnose.format_errors import FormatError

__all__ = [
    "CallBlock",
    "CallSyntax",
    "ParsedTurn",
    "ToolCall",
    "parse_calls",
    "render_calls",
    "render_tools_instructions",
]


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
        call, error, _ = _call_from_obj(data)
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
_DECODER = json.JSONDecoder(parse_float=_finite_float, parse_constant=_reject_constant)


def _loads(s: str) -> Any:
    """json.loads, strict; raises ValueError (or RecursionError/MemoryError) on bad input."""
    obj, end = _DECODER.raw_decode(s, _skip_ws(s, 0))
    if _skip_ws(s, end) != len(s):
        raise ValueError("extra data after JSON value")
    return obj


_WS = re.compile(r"[ \t\n\r]*+")


def _skip_ws(s: str, i: int) -> int:
    """Index of the first non-JSON-whitespace character at or after ``i``."""
    return _WS.match(s, i).end()  # type: ignore[union-attr]


def _call_from_obj(obj: Any) -> tuple[ToolCall | None, str | None, tuple[str, ...]]:
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
            args = _loads(args) if args.strip() else {}  # OpenAI APIs send "" for no arguments
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


# --------------------------------------------------------------------------- rendering


def _py_literal(value: Any) -> str:
    """A JSON-compatible value as python source that ast.literal_eval reads back exactly."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"non-finite float {value!r} cannot be rendered")
        return repr(value)
    if isinstance(value, str):
        return _py_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_py_literal(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = []
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"non-string key {k!r} cannot be rendered")
            items.append(f"{_py_str(k)}: {_py_literal(v)}")
        return "{" + ", ".join(items) + "}"
    raise ValueError(f"not a JSON-compatible value: {type(value).__name__}")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _py_str(s: str) -> str:
    # JSON string escapes are valid python escapes; lone surrogates are escaped because python
    # source must be encodable as UTF-8.
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(s, ensure_ascii=False))


def _py_name(name: str) -> str:
    parts = name.split(".")
    if not all(p.isidentifier() and not keyword.iskeyword(p) for p in parts):
        raise ValueError(f"{name!r} is not a python name; it cannot be rendered as PYTHONIC")
    return name


def _check_json(value: Any) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"arguments are not JSON-compatible: {e}") from None


def render_calls(calls: Sequence[ToolCall], syntax: CallSyntax = CallSyntax.HERMES) -> str:
    """Render calls as the model should emit them.

    HERMES is exactly what Qwen2.5's chat template writes for ``tool_calls`` (blocks joined by
    newlines, ``json.dumps`` default separators, non-ASCII kept). Raises ValueError for values that
    are not JSON-compatible (NaN, sets, ...) or, in PYTHONIC, names that are not identifiers.
    """
    syntax = CallSyntax(syntax)
    for c in calls:
        _check_json(c.arguments)
    if syntax is CallSyntax.HERMES:
        return "\n".join(
            f"{TOOL_CALL_OPEN}\n{json.dumps({'name': c.name, 'arguments': c.arguments}, ensure_ascii=False)}\n"
            f"{TOOL_CALL_CLOSE}"
            for c in calls
        )
    if syntax is CallSyntax.JSON:
        return json.dumps([c.to_dict() for c in calls], ensure_ascii=False)
    rendered = []
    for c in calls:
        kwargs = []
        for k, v in c.arguments.items():
            if not k.isidentifier() or keyword.iskeyword(k):
                raise ValueError(f"argument name {k!r} cannot be a python keyword argument")
            kwargs.append(f"{k}={_py_literal(v)}")
        rendered.append(f"{_py_name(c.name)}({', '.join(kwargs)})")
    return "[" + ", ".join(rendered) + "]"


_PYTHONIC_FOOTER = (
    "\n</tools>\n\nTo call functions, reply with a python list of calls with keyword arguments and "
    "literal values, in the format:\n"
    "[func_name1(param1=value1, param2=value2), func_name2(param=value)]"
)
_JSON_FOOTER = (
    "\n</tools>\n\nTo call functions, reply with a JSON list with one object per call, each with "
    "the function name and its arguments, in the format:\n"
    '[{"name": <function-name>, "arguments": <args-json-object>}, ...]'
)


def render_tools_instructions(tools: Sequence[dict[str, Any]], syntax: CallSyntax) -> str:
    """The system-prompt section listing the tools and how to call them (appended to the
    system message). HERMES is Qwen2.5's own section (`diagnose.chat.render_tools_block`); the
    other syntaxes use the same header and tool list with their own calling instructions."""
    syntax = CallSyntax(syntax)
    if syntax is CallSyntax.HERMES:
        return render_tools_block(tools)
    body = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
    return TOOLS_HEADER + body + (_PYTHONIC_FOOTER if syntax is CallSyntax.PYTHONIC else _JSON_FOOTER)


# --------------------------------------------------------------------------- parsing: entry


def parse_calls(text: str, syntax: CallSyntax = CallSyntax.HERMES) -> ParsedTurn:
    """Find every call attempt in ``text``. Total: never raises for any ``str`` (``bytes`` are
    decoded with surrogateescape, None is ""). Linear time."""
    syntax = CallSyntax(syntax)
    if not isinstance(text, str):
        text = "" if text is None else (
            text.decode("utf-8", "surrogateescape") if isinstance(text, (bytes, bytearray)) else str(text)
        )
    if syntax is CallSyntax.HERMES:
        return _parse_hermes(text)
    return _parse_list(text, syntax)


def _assemble(
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


# --------------------------------------------------------------------------- parsing: HERMES

_TAG = re.compile(re.escape(TOOL_CALL_OPEN) + "|" + re.escape(TOOL_CALL_CLOSE))


def _hermes_body(raw: str) -> tuple[ToolCall | None, str | None, tuple[str, ...]]:
    body = raw.strip()
    if not body:
        return None, EMPTY_CALL, ()
    try:
        obj = _loads(body)
    except (ValueError, RecursionError, MemoryError):
        return None, INVALID_JSON, ()
    return _call_from_obj(obj)


def _parse_hermes(text: str) -> ParsedTurn:
    """Scan tags left to right. An opening tag starts a block; it ends at the next closing tag
    (closed), the next opening tag (nested_tag) or the end of text (unclosed / open_tag_only).
    A closing tag outside a block is a stray close."""
    blocks: list[CallBlock] = []
    consumed: list[tuple[int, int]] = []
    stray: list[int] = []
    open_at: tuple[int, int] | None = None  # (tag start, body start)

    def finish(end_body: int, end: int, closed: bool, nested: bool) -> None:
        start, body_start = open_at  # type: ignore[misc]
        raw = text[body_start:end_body]
        call, error, notes = _hermes_body(raw)
        if nested:
            error = NESTED_TAG
        elif not closed:
            if error == EMPTY_CALL:
                error = OPEN_TAG_ONLY
            elif error is None:
                error = UNCLOSED_TAG
        blocks.append(CallBlock(raw, start, end, call, error, closed, notes))
        consumed.append((start, end))

    for m in _TAG.finditer(text):
        if m.group() == TOOL_CALL_OPEN:
            if open_at is not None:
                finish(m.start(), m.start(), closed=False, nested=True)
            open_at = (m.start(), m.end())
        elif open_at is not None:
            finish(m.start(), m.end(), closed=True, nested=False)
            open_at = None
        else:
            stray.append(m.start())
            consumed.append((m.start(), m.end()))
    if open_at is not None:
        finish(len(text), len(text), closed=False, nested=False)
    consumed.sort()
    return _assemble(text, blocks, consumed, stray)


# --------------------------------------------------------------------------- parsing: lists

_FENCE_OPEN = re.compile(r"```[ \t]*+[A-Za-z0-9_+-]*+[ \t]*+\n?")
_IDENT = r"[A-Za-z_][A-Za-z0-9_.]*+"
# How a PYTHONIC / JSON call list starts at the beginning of the payload (broken ones included).
_PY_START = re.compile(rf"\[\s*+(?:{_IDENT}\s*+(?:\(|\Z)|\]|\Z)")
_JSON_START = re.compile(r"\[\s*+(?:\{|\]|\Z)|\{\s*+(?:\"|\}|\Z)")
# A call list embedded after some text: stricter, so prose does not trigger it.
_PY_EMBEDDED = re.compile(rf"\[\s*+{_IDENT}\s*+\(")
_JSON_EMBEDDED = re.compile(r"(?:\[\s*+)?\{\s*+\"(?:name|function)\"\s*+:")
# A bare single call, accepted only when it is the whole payload and fully valid.
_PY_SINGLE = re.compile(rf"{_IDENT}\(")
_SCAN = re.compile(r"[\[\](){},'\"\\\n]")
_OPENERS = {"[": "]", "(": ")", "{": "}"}


def _match_bracket(s: str, start: int, commas: list[int] | None = None) -> int | None:
    """Index just past the bracket matching ``s[start]``, skipping quoted strings; None if the
    text ends first. Collects the top-level commas into ``commas`` when given. One pass over
    the interesting characters (linear)."""
    depth = 0
    quote: str | None = None
    skip = -1  # position of a character escaped by a backslash
    for m in _SCAN.finditer(s, start):
        i, ch = m.start(), m.group()
        if i == skip:
            continue
        if quote is not None:
            if ch == "\\":
                skip = i + 1
            elif ch == quote or ch == "\n":
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in _OPENERS:
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
        elif ch == "," and depth == 1 and commas is not None:
            commas.append(i)
    return None


def _payload_bounds(text: str) -> tuple[int, int, int, int]:
    """(outer_start, start, end, outer_end): the text stripped of whitespace and of one
    surrounding markdown code fence (the fence counts as call syntax, not content)."""
    e = len(text.rstrip())
    s = e - len(text[:e].lstrip())
    outer_s, outer_e = s, e
    m = _FENCE_OPEN.match(text, s)
    if m and text.endswith("```", 0, e) and e - 3 >= m.end():
        inner = text[m.end() : e - 3]
        s = m.end() + len(inner) - len(inner.lstrip())
        e = m.end() + len(inner.rstrip())
        s = min(s, e)
    return outer_s, s, e, outer_e


def _parse_list(text: str, syntax: CallSyntax) -> ParsedTurn:
    """Find the call list (at the payload start, or embedded after text), parse it, and report
    one block per element — or one broken block if the list does not parse."""
    outer_s, s, e, outer_e = _payload_bounds(text)
    payload_start = s
    start_re, embedded_re = (
        (_PY_START, _PY_EMBEDDED) if syntax is CallSyntax.PYTHONIC else (_JSON_START, _JSON_EMBEDDED)
    )
    if syntax is CallSyntax.PYTHONIC and not _PY_START.match(text, s, e):
        single = _try_single_call(text, s, e)
        if single is not None:
            return _assemble(text, [single], [(outer_s, outer_e)])
    m = start_re.match(text, s, e) or embedded_re.search(text, s, e)
    if m is None:
        return _assemble(text, [], [])  # plain text
    begin = m.start()
    commas: list[int] = []
    stop = _match_bracket(text[:e], begin, commas)
    closed = stop is not None
    end = stop if closed else e
    if syntax is CallSyntax.PYTHONIC:
        blocks = _python_blocks(text, begin, end, closed, commas)
    else:
        blocks = _json_blocks(text, begin, end, closed)
    # A fence wrapping exactly the call list is call syntax too.
    span_s = outer_s if begin == payload_start else begin
    span_e = outer_e if end == e and span_s == outer_s else end
    return _assemble(text, blocks, [(span_s, span_e)])


def _broken(text: str, begin: int, end: int, closed: bool, error: str) -> list[CallBlock]:
    raw = text[begin:end]
    inner = raw.strip()
    if inner in ("[", "{") or (closed and inner[1:-1].strip() == ""):
        error = EMPTY_CALL if closed else OPEN_TAG_ONLY
    return [CallBlock(raw, begin, end, None, error, closed)]


# ----- JSON


def _json_blocks(text: str, begin: int, end: int, closed: bool) -> list[CallBlock]:
    src = text[:end]
    try:
        if src[begin] == "{":
            obj, stop = _DECODER.raw_decode(src, begin)
            if _skip_ws(src, stop) != end:
                raise ValueError("extra data")
            call, error, notes = _call_from_obj(obj)
            return [CallBlock(src[begin:stop], begin, stop, call, error, closed, notes)]
        return _json_list_blocks(src, begin, end, closed)
    except (ValueError, RecursionError, MemoryError, IndexError):
        return _broken(text, begin, end, closed, INVALID_JSON)


def _json_list_blocks(src: str, begin: int, end: int, closed: bool) -> list[CallBlock]:
    """Parse ``[v, v, ...]`` element by element to keep each element's span."""
    out: list[CallBlock] = []
    i = _skip_ws(src, begin + 1)
    if i < end and src[i] == "]":
        if _skip_ws(src, i + 1) != end:
            raise ValueError("extra data")
        return [CallBlock(src[begin:end], begin, end, None, EMPTY_CALL, closed)]
    while True:
        obj, stop = _DECODER.raw_decode(src, i)
        call, error, notes = _call_from_obj(obj)
        out.append(CallBlock(src[i:stop], i, stop, call, error, closed, notes))
        i = _skip_ws(src, stop)
        if i < end and src[i] == ",":
            i = _skip_ws(src, i + 1)
            continue
        if i < end and src[i] == "]" and _skip_ws(src, i + 1) == end:
            return out
        raise ValueError("malformed list")


# ----- PYTHONIC


class _NotLiteral(Exception):
    pass


def _jsonable(value: Any, notes: set[str]) -> Any:
    """literal_eval output -> JSON-compatible value (tuples become lists); raises _NotLiteral."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _NotLiteral
        return value
    if isinstance(value, (list, tuple)):
        if isinstance(value, tuple):
            notes.add(NOTE_TUPLE_AS_LIST)
        return [_jsonable(v, notes) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise _NotLiteral
        return {k: _jsonable(v, notes) for k, v in value.items()}
    raise _NotLiteral  # set, bytes, complex, Ellipsis


def _func_name(node: ast.expr) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _call_from_ast(node: ast.expr) -> tuple[ToolCall | None, str | None, tuple[str, ...]]:
    if not isinstance(node, ast.Call):
        return None, MISSING_NAME, ()
    name = _func_name(node.func)
    if name is None:
        return None, MISSING_NAME, ()
    if node.args or any(k.arg is None for k in node.keywords):
        return None, BAD_ARGUMENTS, ()  # positional or **kwargs
    if len({k.arg for k in node.keywords}) != len(node.keywords):
        return None, BAD_ARGUMENTS, ()  # f(a=1, a=2): python itself would refuse it
    notes: set[str] = set()
    args: dict[str, Any] = {}
    try:
        for k in node.keywords:
            args[k.arg] = _jsonable(ast.literal_eval(k.value), notes)  # type: ignore[index]
    except (_NotLiteral, ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return None, BAD_ARGUMENTS, ()
    return ToolCall(name, args), None, tuple(sorted(notes))


def _parse_expr(src: str) -> ast.expr | None:
    try:
        return ast.parse(src, mode="eval").body
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError, UnicodeError):
        return None


def _python_blocks(text: str, begin: int, end: int, closed: bool, commas: list[int]) -> list[CallBlock]:
    """Split the list at its top-level commas and parse each element on its own.

    Why not one ``ast.parse`` of the whole list: python's AST costs ~10 µs per node, and a
    collapsed model repeats the same call thousands of times, so identical elements are parsed
    once (``cache``). Any element that is not a python expression makes the whole list broken.
    """
    if not closed:
        return _broken(text, begin, end, closed, INVALID_SYNTAX)
    bounds = [begin, *commas, end - 1]
    pieces = [(bounds[i] + 1, bounds[i + 1]) for i in range(len(bounds) - 1)]
    if len(pieces) > 1 and not text[pieces[-1][0] : pieces[-1][1]].strip():
        pieces.pop()  # trailing comma: [f(), g(),]
        if not text[pieces[0][0] : pieces[0][1]].strip():
            return _broken(text, begin, end, closed, INVALID_SYNTAX)  # [,]
    cache: dict[str, tuple[ToolCall | None, str | None, tuple[str, ...]]] = {}
    out = []
    for ps, pe in pieces:
        piece = text[ps:pe]
        src = piece.strip()
        if not src:
            if len(pieces) == 1:
                return [CallBlock(text[begin:end], begin, end, None, EMPTY_CALL, True)]
            return _broken(text, begin, end, closed, INVALID_SYNTAX)
        hit = cache.get(src)
        if hit is None:
            node = _parse_expr(src)
            if node is None:
                return _broken(text, begin, end, closed, INVALID_SYNTAX)
            call, error, notes = cache[src] = _call_from_ast(node)
        else:
            call, error, notes = hit
            if call is not None:
                call = ToolCall(call.name, dict(call.arguments))  # no dict shared between blocks
        s = ps + len(piece) - len(piece.lstrip())
        out.append(CallBlock(src, s, s + len(src), call, error, True, notes))
    return out


def _try_single_call(text: str, s: int, e: int) -> CallBlock | None:
    """``f(a=1)`` alone is a call only if the whole payload is exactly one valid call;
    otherwise it is prose ("Note(this) ...")."""
    if not _PY_SINGLE.match(text, s, e):
        return None
    if _match_bracket(text[:e], text.index("(", s)) != e:
        return None
    node = _parse_expr(text[s:e])
    if not isinstance(node, ast.Call):
        return None
    call, error, notes = _call_from_ast(node)
    if call is None:
        return None
    return CallBlock(text[s:e], s, e, call, None, True, tuple(sorted({*notes, NOTE_SINGLE_CALL})))
