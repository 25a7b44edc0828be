"""Tolerant JSONL reading: every bad line becomes a `LineError` naming file and line; the
good lines are kept. One reader for conversations, task files, metrics and adapters.

Why bytes, line by line: user files can hold binary garbage, invalid UTF-8, or a multi-GB
line from a runaway generation; none of that may cost us the rest of the file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diagnose.regular_file import open_regular

#: Lines longer than this are reported, not parsed (a runaway generation, or not JSONL at all).
MAX_LINE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class LineError:
    """A line that could not be used. ``line`` is 1-based; 0 means the whole file."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.message}"


def _reject_constant(name: str) -> float:
    # json accepts NaN/Infinity by default; keep them as floats (they are data, e.g. a NaN loss)
    return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[name]


try:
    import orjson
except ImportError:  # pragma: no cover - a core dependency; the json path is the reference anyway
    orjson = None

# What orjson reads differently from json: integers beyond 64 bits (orjson makes them floats)
# and nesting deeper than Python's recursion limit (json raises, orjson reads it). A parsed
# object is checked for both (`_exact`, cheap on lines of a few values); lines with long lists
# (token ids) are checked on their bytes instead (no 19-digit run, few brackets). Such lines, and
# any line orjson refuses (NaN, a BOM, lone surrogates, bad UTF-8, ...), go through json.
_DIGITS = bytes(48 if 48 <= i <= 57 else 32 for i in range(256))  # digits -> "0", the rest -> " "
_LONG_DIGITS = b"0" * 19
_MAX_DEPTH = 200
_BIG = 9.2e18  # below 2**63: a float this large may be an integer orjson could not hold


def _exact(obj: Any, raw: bytes) -> bool:
    """Whether ``json.loads(raw)`` gives ``obj`` (what orjson gave)."""
    stack = [(obj, 0)]
    while stack:
        o, depth = stack.pop()
        if depth > _MAX_DEPTH:
            return False
        if type(o) is list and len(o) > 64:  # long lists: one pass over the bytes is cheaper
            return raw.count(b"[") + raw.count(b"{") <= _MAX_DEPTH and _LONG_DIGITS not in raw.translate(_DIGITS)
        for v in (o.values() if type(o) is dict else o):
            t = type(v)
            if t is float:
                if not -_BIG < v < _BIG:
                    return False
            elif t is dict or t is list:
                stack.append((v, depth + 1))
    return True


def _fast_loads(raw: bytes) -> Any:
    """The object ``json.loads`` gives for ``raw``, through orjson (~5x faster), or None when
    only json can say (the caller then uses json, which also words the error)."""
    if orjson is None:
        return None
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return obj if (type(obj) is dict or type(obj) is list) and _exact(obj, raw) else None


def iter_jsonl(path: str | Path, *, max_line_bytes: int = MAX_LINE_BYTES,
               limit_name: str = "MAX_LINE_BYTES") -> Iterator[tuple[int, dict[str, Any] | LineError]]:
    """Yield ``(line_no, object)`` for each JSON-object line and ``(line_no, LineError)`` for each
    bad one (a line over ``max_line_bytes`` is named with ``limit_name``, the limit's name). Blank
    lines are skipped. A missing or unreadable file, or one that is no regular file
    (a named pipe is never opened for reading: `diagnose.regular_file`), yields one LineError (line 0).
    """
    p = Path(path)
    name = str(p)
    try:
        fh = open_regular(p, "rb")
    except OSError as exc:
        yield 0, LineError(name, 0, f"cannot open: {exc.strerror or exc}")
        return
    with fh:
        line_no = 0
        while True:
            line_no += 1
            try:
                raw = fh.readline(max_line_bytes + 1)
            except OSError as exc:
                yield line_no, LineError(name, line_no, f"read failed: {exc}")
                return
            if not raw:
                return
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                # skip the rest of the oversized line
                while raw and not raw.endswith(b"\n"):
                    raw = fh.readline(max_line_bytes)
                yield line_no, LineError(name, line_no, f"line longer than {max_line_bytes} bytes ({limit_name}), skipped")
                continue
            if not raw.strip():
                continue
            obj = _fast_loads(raw)
            if isinstance(obj, dict):
                yield line_no, obj
                continue
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a BOM (Windows editors) is no error
            except UnicodeDecodeError as exc:
                yield line_no, LineError(name, line_no, f"not valid UTF-8 (byte {exc.start}): binary or corrupt data")
                continue
            try:
                obj = json.loads(text, parse_constant=_reject_constant)
            except json.JSONDecodeError as exc:
                msg = f"invalid JSON: {exc.msg} at column {exc.colno}"
                if not raw.endswith(b"\n"):  # a bad last line without newline: cut mid-write
                    msg = f"truncated JSON at end of file ({exc.msg})"
                yield line_no, LineError(name, line_no, msg)
                continue
            except RecursionError:
                yield line_no, LineError(name, line_no, "JSON nested too deeply")
                continue
            if not isinstance(obj, dict):
                yield line_no, LineError(name, line_no, f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield line_no, obj


def read_jsonl(path: str | Path) -> tuple[list[tuple[int, dict[str, Any]]], list[LineError]]:
    """All good ``(line_no, object)`` pairs and all errors of a JSONL file."""
    good: list[tuple[int, dict[str, Any]]] = []
    errors: list[LineError] = []
    for line_no, item in iter_jsonl(path):
        if isinstance(item, LineError):
            errors.append(item)
        else:
            good.append((line_no, item))
    return good, errors
