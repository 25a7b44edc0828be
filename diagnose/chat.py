"""The ChatML / Qwen2.5 chat format: control-token strings, the Jinja chat template, and a
pure-Python renderer that produces the same text.

Why a Python renderer beside the template: the embedded tokenizer is *trained on* rendered
conversations, so rendering must work before any tokenizer exists. A test keeps the two equal.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"

#: Every control string of the format, in Qwen's added-token order. `<tool_response>` and
#: `</tool_response>` are single tokens from Qwen3 on; in Qwen2.5 they are plain BPE text.
CONTROL_STRINGS: tuple[str, ...] = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    TOOL_CALL_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_RESPONSE_OPEN,
    TOOL_RESPONSE_CLOSE,
)

#: The control strings that are ``special=True`` in Qwen's vocabulary, so that
#: ``decode(..., skip_special_tokens=True)`` drops them (TRL's and verl's logged completions); the
#: tool-call / tool-response tags are added tokens with ``special=False`` and survive it.
SPECIAL_STRINGS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)


def skip_special(text: str) -> str:
    """``tokenizer.decode(ids, skip_special_tokens=True)`` at the text level: the special
    strings deleted, everything else (the tool-call tags included) kept."""
    for s in SPECIAL_STRINGS:
        text = text.replace(s, "")
    return text

DEFAULT_SYSTEM = "You are a helpful assistant."

TOOLS_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)

# Qwen2.5-Instruct's template (tools rendered into the system turn, tool results as a user turn
# wrapped in <tool_response>), with the default system prompt shortened.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- '" + DEFAULT_SYSTEM + "' }}{%- endif %}"
    "{{- " + json.dumps(TOOLS_HEADER) + " }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- " + json.dumps(TOOLS_FOOTER) + " }}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}"
    "{{- '\", \"arguments\": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

ASSISTANT_PREFIX = f"{IM_START}assistant\n"


def render_tools_block(tools: Sequence[dict[str, Any]]) -> str:
    """The Hermes tools section exactly as the template writes it (Jinja's tojson sorts no keys
    but escapes like ``json.dumps``)."""
    body = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
    return TOOLS_HEADER + body + TOOLS_FOOTER


def render_chat(
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """Render messages as the chat template does, without a tokenizer.

    Assistant messages carry their raw text in ``content`` (what the model emitted, tool-call
    blocks included); structured ``tool_calls`` are rendered as Qwen2.5 does.
    """
    out: list[str] = []
    first_is_system = bool(messages) and messages[0].get("role") == "system"
    system = messages[0].get("content", "") if first_is_system else DEFAULT_SYSTEM
    if tools:
        out.append(f"{IM_START}system\n{system}{render_tools_block(tools)}{IM_END}\n")
    else:
        out.append(f"{IM_START}system\n{system}{IM_END}\n")
    n = len(messages)
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content") or ""
        if role == "system" and i == 0:
            continue
        if role in ("user", "system") or (role == "assistant" and not m.get("tool_calls")):
            out.append(f"{IM_START}{role}\n{content}{IM_END}\n")
        elif role == "assistant":
            out.append(f"{IM_START}assistant")
            if content:
                out.append("\n" + content)
            for tc in m["tool_calls"]:
                fn = tc.get("function", tc)
                args = json.dumps(fn.get("arguments", {}), ensure_ascii=False)
                out.append(f'\n{TOOL_CALL_OPEN}\n{{"name": "{fn["name"]}", "arguments": {args}}}\n{TOOL_CALL_CLOSE}')
            out.append(f"{IM_END}\n")
        elif role == "tool":
            if i == 0 or messages[i - 1].get("role") != "tool":
                out.append(f"{IM_START}user")
            out.append(f"\n{TOOL_RESPONSE_OPEN}\n{content}\n{TOOL_RESPONSE_CLOSE}")
            if i == n - 1 or messages[i + 1].get("role") != "tool":
                out.append(f"{IM_END}\n")
    if add_generation_prompt:
        out.append(ASSISTANT_PREFIX)
    return "".join(out)
