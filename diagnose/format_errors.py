"""The format-error taxonomy: what can be wrong with one assistant turn, format-wise.

A leaf module (imports nothing of ours), so the parser (`diagnose.toolcall`, which reports the
errors of each call block) and the turn classifier (`diagnose.turns`, which adds the turn-level
ones) share one taxonomy. Definitions and examples are in docs/turn-states.md.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["SHORT", "FormatError"]


class FormatError(StrEnum):
    """Fine-grained format errors; the declaration order is the order in ``errors``."""

    EMPTY_TURN = "empty_turn"  # nothing: "", whitespace, punctuation, a lone terminator
    OPEN_TAG_ONLY = "open_tag_only"  # "<tool_call>" / "<tool_call>\n" and the turn ends
    EMPTY_CALL = "empty_call"  # "<tool_call>\n</tool_call>", "[]"
    UNCLOSED_TAG = "unclosed_tag"  # a call body that runs to the end of the turn
    NESTED_TAG = "nested_tag"  # "<tool_call>" again before the open block is closed
    CLOSE_WITHOUT_OPEN = "close_without_open"  # "</tool_call>" with no opening tag
    INVALID_JSON = "invalid_json"  # HERMES/JSON body is not JSON
    INVALID_SYNTAX = "invalid_syntax"  # PYTHONIC list is not python
    MISSING_NAME = "missing_name"  # no non-empty string "name" / not a call
    BAD_ARGUMENTS = "bad_arguments"  # arguments missing, not an object, positional, not literal
    UNKNOWN_TOOL = "unknown_tool"  # name not among the given tools
    REPEATED_CALL = "repeated_call"  # the identical call twice in one turn
    TEXT_AFTER_CALL = "text_after_call"  # natural text after (or between) calls
    INVENTED_TOOL_OUTPUT = "invented_tool_output"  # the model writes <tool_response> itself
    STRAY_CONTROL_TOKEN = "stray_control_token"  # <|im_start|>, <|im_end|>, ... inside the turn
    WRONG_SYNTAX = "wrong_syntax"  # a well-formed call in another syntax than the one asked


#: Each error in a few words, for verdicts and reports ("what broke"); the full definitions and
#: examples are in docs/turn-states.md.
SHORT: dict[FormatError, str] = {
    FormatError.EMPTY_TURN: "empty turn",
    FormatError.OPEN_TAG_ONLY: "a bare <tool_call> and the turn ends",
    FormatError.EMPTY_CALL: "an empty call",
    FormatError.UNCLOSED_TAG: "a call never closed",
    FormatError.NESTED_TAG: "a <tool_call> inside a call",
    FormatError.CLOSE_WITHOUT_OPEN: "a </tool_call> without an open call",
    FormatError.INVALID_JSON: "a call body that is not JSON",
    FormatError.INVALID_SYNTAX: "a python call list that is not python",
    FormatError.MISSING_NAME: "a call without a tool name",
    FormatError.BAD_ARGUMENTS: "malformed arguments",
    FormatError.UNKNOWN_TOOL: "an unknown tool",
    FormatError.REPEATED_CALL: "the same call twice in a turn",
    FormatError.TEXT_AFTER_CALL: "text after a call",
    FormatError.INVENTED_TOOL_OUTPUT: "the model writes the tool output itself",
    FormatError.STRAY_CONTROL_TOKEN: "a stray control token",
    FormatError.WRONG_SYNTAX: "a call in another syntax",
}
