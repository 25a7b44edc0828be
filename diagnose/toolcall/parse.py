"""`parse_calls`: every call attempt in one assistant turn, in any of the three syntaxes.

Total (any ``str`` in, a `ParsedTurn` out, never an exception) and linear in the input: no
backtracking regexes, brackets matched in one pass, PYTHONIC elements parsed one by one with
`ast` and read with `ast.literal_eval` on single nodes (nothing is ever evaluated)."""

from __future__ import annotations

import ast
import math
import re
from typing import Any

from diagnose.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from diagnose.toolcall.calls import (
    BAD_ARGUMENTS,
    DECODER,
    EMPTY_CALL,
    INVALID_JSON,
    INVALID_SYNTAX,
    MISSING_NAME,
    NESTED_TAG,
    NOTE_SINGLE_CALL,
    NOTE_TUPLE_AS_LIST,
    OPEN_TAG_ONLY,
    UNCLOSED_TAG,
    CallBlock,
    CallSyntax,
    ParsedTurn,
    ToolCall,
    assemble,
    call_from_obj,
    skip_ws,
    strict_loads,
)


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


# --------------------------------------------------------------------------- parsing: HERMES

_TAG = re.compile(re.escape(TOOL_CALL_OPEN) + "|" + re.escape(TOOL_CALL_CLOSE))


def _hermes_body(raw: str) -> tuple[ToolCall | None, str | None, tuple[str, ...]]:
    body = raw.strip()
    if not body:
        return None, EMPTY_CALL, ()
    try:
        obj = strict_loads(body)
    except (ValueError, RecursionError, MemoryError):
        return None, INVALID_JSON, ()
    return call_from_obj(obj)


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
    return assemble(text, blocks, consumed, stray)


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
            return assemble(text, [single], [(outer_s, outer_e)])
    m = start_re.match(text, s, e) or embedded_re.search(text, s, e)
    if m is None:
        return assemble(text, [], [])  # plain text
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
    return assemble(text, blocks, [(span_s, span_e)])


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
            obj, stop = DECODER.raw_decode(src, begin)
            if skip_ws(src, stop) != end:
                raise ValueError("extra data")
            call, error, notes = call_from_obj(obj)
            return [CallBlock(src[begin:stop], begin, stop, call, error, closed, notes)]
        return _json_list_blocks(src, begin, end, closed)
    except (ValueError, RecursionError, MemoryError, IndexError):
        return _broken(text, begin, end, closed, INVALID_JSON)


def _json_list_blocks(src: str, begin: int, end: int, closed: bool) -> list[CallBlock]:
    """Parse ``[v, v, ...]`` element by element to keep each element's span."""
    out: list[CallBlock] = []
    i = skip_ws(src, begin + 1)
    if i < end and src[i] == "]":
        if skip_ws(src, i + 1) != end:
            raise ValueError("extra data")
        return [CallBlock(src[begin:end], begin, end, None, EMPTY_CALL, closed)]
    while True:
        obj, stop = DECODER.raw_decode(src, i)
        call, error, notes = call_from_obj(obj)
        out.append(CallBlock(src[i:stop], i, stop, call, error, closed, notes))
        i = skip_ws(src, stop)
        if i < end and src[i] == ",":
            i = skip_ws(src, i + 1)
            continue
        if i < end and src[i] == "]" and skip_ws(src, i + 1) == end:
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
