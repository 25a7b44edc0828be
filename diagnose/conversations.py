"""Conversation JSONL: one conversation per line,
``{"id": ..., "messages": [{"role": ..., "content": ...}, ...], "tools": [...]}``.

The common currency between `diagnose formats`, the adapters and the trainer's exports.
Messages are validated per line; a bad line is a `LineError`, never an exception.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diagnose.jsonl import LineError, iter_jsonl
from diagnose.toolcall import CallSyntax, ToolCall, render_calls

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Conversation:
    id: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    line: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level keys, e.g. "step", "reward"

    def assistant_texts(self) -> list[str]:
        """Raw text of every assistant turn, as the model emitted it.

        Structured OpenAI-style ``tool_calls`` are rendered back into Hermes blocks, so a turn
        stored either way is classified the same.
        """
        return [assistant_text(m) for m in self.messages if m.get("role") == "assistant"]


def assistant_text(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    calls = message.get("tool_calls") or []
    if not calls:
        return content
    rendered = render_calls(
        [ToolCall.from_dict(tc.get("function", tc)) for tc in calls], CallSyntax.HERMES
    )
    return f"{content}\n{rendered}" if content else rendered


def _validate(obj: dict[str, Any]) -> str | None:
    """Why this object is not a conversation, or None."""
    msgs = obj.get("messages")
    if not isinstance(msgs, list):
        return "missing 'messages' list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"messages[{i}] is not an object"
        if m.get("role") not in ROLES:
            return f"messages[{i}] has role {m.get('role')!r}, expected one of {', '.join(ROLES)}"
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            return f"messages[{i}].content is {type(content).__name__}, expected a string"
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list) or not all(
                isinstance(tc, dict) and isinstance(tc.get("function", tc), dict)
                and isinstance(tc.get("function", tc).get("name"), str)
                for tc in calls
            ):
                return f"messages[{i}].tool_calls is malformed"
            for j, tc in enumerate(calls):  # the same check assistant_text makes: never a raise later
                try:
                    ToolCall.from_dict(tc.get("function", tc))
                except ValueError as e:
                    return f"messages[{i}].tool_calls[{j}] is malformed ({e})"
    tools = obj.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return "'tools' must be a list of objects"
    return None


def iter_conversations(path: str | Path) -> Iterator[Conversation | LineError]:
    """Conversations of a JSONL file, with a `LineError` in place of each bad line."""
    for line_no, obj in iter_jsonl(path):
        if isinstance(obj, LineError):
            yield obj
            continue
        problem = _validate(obj)
        if problem:
            yield LineError(str(path), line_no, problem)
            continue
        cid = obj.get("id", f"line{line_no}")
        extra = {k: v for k, v in obj.items() if k not in ("id", "messages", "tools")}
        yield Conversation(str(cid), obj["messages"], obj.get("tools"), line_no, extra)


def read_conversations(path: str | Path) -> tuple[list[Conversation], list[LineError]]:
    convs: list[Conversation] = []
    errors: list[LineError] = []
    for item in iter_conversations(path):
        (errors if isinstance(item, LineError) else convs).append(item)
    return convs, errors
