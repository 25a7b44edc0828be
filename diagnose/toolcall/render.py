"""Tool calls rendered as a model should emit them (`render_calls`), and the system-prompt
section that lists the tools and says how to call them (`render_tools_instructions`)."""

from __future__ import annotations

import json
import keyword
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from diagnose.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, TOOLS_HEADER, render_tools_block
from diagnose.toolcall.calls import CallSyntax, ToolCall


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
