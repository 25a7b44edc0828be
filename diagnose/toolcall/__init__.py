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

Import from here; the package's modules are ``calls`` (the data types, error codes and the strict
JSON reading of a call object), ``parse`` (`parse_calls`) and ``render``.
"""

from diagnose.toolcall.calls import CallBlock, CallSyntax, ParsedTurn, ToolCall, has_repeated_call
from diagnose.toolcall.parse import parse_calls
from diagnose.toolcall.render import render_calls, render_tools_instructions

__all__ = [
    "CallBlock",
    "CallSyntax",
    "ParsedTurn",
    "ToolCall",
    "has_repeated_call",
    "parse_calls",
    "render_calls",
    "render_tools_instructions",
]
