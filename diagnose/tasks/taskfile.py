"""User task files: JSONL, one task per line, run in the replay environment (`ReplayEnv`).

    {"id": "t1",
     "messages": [{"role": "user", "content": "..."}],          # system optional
     "tools": [{"type": "function", "function": {"name": ..., "parameters": ...}}],
     "ground_truth": [[{"name": "f", "arguments": {...}}], ...],  # calls per assistant turn
     "tool_outputs": [[{...}], ...],                              # optional, one per gold call
     "final_answer": "42",                                        # optional
     "syntax": "hermes"}                                          # optional: hermes|pythonic|json

Bad lines become `LineError`s and are skipped; only a missing file raises.

Each task is bounded, so that one hostile line (a schema-valid task of 5,000 gold turns) cannot
stall a probe or a training run: its line (``MAX_TASK_BYTES``), its gold call turns
(``MAX_TASK_TURNS``) and calls (``MAX_TASK_CALLS``) here; its tokens by the consumer, which has
the tokenizer and the context length (`fit_context`). The error names the limit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from diagnose.jsonl import LineError, iter_jsonl
from diagnose.toolcall import CallSyntax, ToolCall

from .base import FILE_SPLIT, INSTRUCTION, Task, schema_of, system_prompt, with_tools_section
from .generate import hint_for

ROLES = ("system", "user", "assistant", "tool")
#: The most bytes one task line may hold (tools, messages, gold calls and outputs together).
MAX_TASK_BYTES = 1024 * 1024
#: The most gold call turns one task may have (multi-step benchmarks have tens at most).
MAX_TASK_TURNS = 64
#: The most gold calls one task may have, over all its turns.
MAX_TASK_CALLS = 256


class _Bad(Exception):
    pass


def _finite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise _Bad(f"{where} holds a non-finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            _finite(v, where)
    elif isinstance(value, list):
        for v in value:
            _finite(v, where)


def _messages(obj: dict) -> list[dict]:
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _Bad("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _Bad(f"messages[{i}] is not an object")
        if m.get("role") not in ROLES:
            raise _Bad(f"messages[{i}] has role {m.get('role')!r}, expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise _Bad(f"messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" for m in out):
        raise _Bad("'messages' has no user message")
    if out[-1]["role"] not in ("user", "tool"):
        raise _Bad(f"'messages' must end with a user or tool message, not {out[-1]['role']!r}")
    return out


def _tools(obj: dict) -> list[dict]:
    tools = obj.get("tools")
    if not isinstance(tools, list) or not tools:
        raise _Bad("'tools' must be a non-empty list of function schemas")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("function", t), dict):
            raise _Bad(f"tools[{i}] is not an object")
        fn = schema_of(t)
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _Bad(f"tools[{i}] has no name")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise _Bad(f"tools[{i}].parameters must be an object")
        _finite(fn, f"tools[{i}]")
        out.append({"type": "function", "function": fn})
    return out


def _call(c: Any, where: str) -> ToolCall:
    if not isinstance(c, dict):
        raise _Bad(f"{where} is not an object")
    fn = c.get("function", c)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise _Bad(f"{where} has no name")
    args = fn.get("arguments", {})
    if isinstance(args, str):  # OpenAI style: arguments as a JSON string
        try:
            args = json.loads(args)
        except (json.JSONDecodeError, RecursionError):
            raise _Bad(f"{where}.arguments is not valid JSON") from None
    if not isinstance(args, dict):
        raise _Bad(f"{where}.arguments must be an object")
    _finite(args, where)
    return ToolCall(fn["name"], args)


def _ground_truth(obj: dict, names: set[str]) -> list[list[ToolCall]]:
    gt = obj.get("ground_truth")
    if not isinstance(gt, list) or not gt:
        raise _Bad("'ground_truth' must be a non-empty list of turns (lists of calls)")
    if len(gt) > MAX_TASK_TURNS:
        raise _Bad(f"'ground_truth' has {len(gt)} turns, over the limit of {MAX_TASK_TURNS} per task (MAX_TASK_TURNS)")
    n_calls = sum(len(t) for t in gt if isinstance(t, list))
    if n_calls > MAX_TASK_CALLS:
        raise _Bad(f"'ground_truth' has {n_calls} calls, over the limit of {MAX_TASK_CALLS} per task (MAX_TASK_CALLS)")
    turns = []
    for i, turn in enumerate(gt):
        if not isinstance(turn, list):
            raise _Bad(f"ground_truth[{i}] must be a list of calls")
        turns.append([_call(c, f"ground_truth[{i}][{j}]") for j, c in enumerate(turn)])
    while turns and not turns[-1]:
        turns.pop()
    if any(not t for t in turns):
        raise _Bad("ground_truth has an empty turn before the last call turn")
    for t in turns:
        for c in t:
            if c.name not in names:
                raise _Bad(f"ground_truth calls {c.name!r}, which is not in 'tools'")
    return turns


def _outputs(obj: dict, turns: list[list[ToolCall]]) -> list[list[Any]] | None:
    if obj.get("tool_outputs") is None:
        return None
    outs = obj["tool_outputs"]
    if not isinstance(outs, list):
        raise _Bad("'tool_outputs' must be a list of lists")
    while len(outs) > len(turns) and outs[-1] == []:
        outs = outs[:-1]
    if len(outs) != len(turns):
        raise _Bad(f"'tool_outputs' has {len(outs)} turns, ground_truth has {len(turns)} call turns")
    for i, (o, t) in enumerate(zip(outs, turns)):
        if not isinstance(o, list) or len(o) != len(t):
            raise _Bad(f"tool_outputs[{i}] must be a list of {len(t)} outputs (one per call)")
        _finite(o, f"tool_outputs[{i}]")
    return outs


def _task(obj: dict) -> Task:
    tid = obj.get("id")
    if isinstance(tid, bool) or not isinstance(tid, (str, int)) or (isinstance(tid, str) and not tid.strip()):
        raise _Bad("'id' must be a non-empty string or an integer")
    messages, tools = _messages(obj), _tools(obj)
    syntax_raw = obj.get("syntax", "hermes")
    try:
        syntax = CallSyntax(syntax_raw)
    except (ValueError, TypeError):
        raise _Bad(f"'syntax' must be one of {', '.join(s.value for s in CallSyntax)}") from None
    turns = _ground_truth(obj, {schema_of(t)["name"] for t in tools})
    outputs = _outputs(obj, turns)
    final = obj.get("final_answer")
    if final is not None:
        if isinstance(final, bool) or not isinstance(final, (str, int, float)):
            raise _Bad("'final_answer' must be a string or a number")
        final = str(final)
    if messages[0]["role"] == "system":
        messages[0]["content"] = with_tools_section(messages[0]["content"], tools, syntax)
    else:
        messages.insert(0, {"role": "system", "content": system_prompt(tools, syntax, INSTRUCTION)})
    task = Task(
        id=str(tid),
        family="replay",
        split=FILE_SPLIT,
        syntax=syntax,
        tools=tools,
        messages=messages,
        gold_turns=turns + [[]],
        gold_answer=final if final else "Done.",
        answer_value=final or "",
        init_state={"matched_turns": 0},
        gold_outputs=outputs,
        variant="replay",
    )
    task.hint = hint_for(task)
    return task


def load_task_file(path: str | Path) -> tuple[list[Task], list[LineError]]:
    """Tasks of a JSONL task file and the `LineError` of every bad line (skipped).

    Raises `FileNotFoundError` only when the file does not exist (and `IsADirectoryError` for a
    directory); never for bad content.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"task file not found: {p}")
    if p.is_dir():
        raise IsADirectoryError(f"task file is a directory: {p}")
    tasks: list[Task] = []
    errors: list[LineError] = []
    seen: dict[str, int] = {}
    for line_no, obj in iter_jsonl(p, max_line_bytes=MAX_TASK_BYTES, limit_name="MAX_TASK_BYTES"):
        if isinstance(obj, LineError):
            errors.append(obj)
            continue
        try:
            task = _task(obj)
        except _Bad as exc:
            errors.append(LineError(str(p), line_no, str(exc)))
            continue
        except Exception as exc:  # a validation gap must not lose the file
            errors.append(LineError(str(p), line_no, f"invalid task: {type(exc).__name__}: {exc}"))
            continue
        if task.id in seen:
            errors.append(LineError(str(p), line_no, f"duplicate id {task.id!r} (first on line {seen[task.id]})"))
            continue
        seen[task.id] = line_no
        task.line = line_no
        tasks.append(task)
    return tasks, errors


def fit_context(tasks: list[Task], tokenizer: Any, max_tokens: int, limit: str,
                path: str | Path = "") -> tuple[list[Task], list[LineError]]:
    """The tasks whose whole gold trajectory (prompt, every gold turn and tool output, the answer,
    rendered as the model reads it) fits ``max_tokens`` tokens of ``tokenizer`` (a Hugging Face
    tokenizer), and a `LineError` naming each other one with its size and ``limit`` (the limit's
    name, e.g. ``max_context``). A task over the limit could not be probed or trained on whole,
    and would cost work in proportion to its size."""
    from diagnose.chat import render_chat

    from .episode import gold_messages

    kept, errors = [], []
    for t in tasks:
        # verbose=False: an over-long text is what is measured here, no transformers warning
        n = len(tokenizer(render_chat(gold_messages(t)), add_special_tokens=False, verbose=False)["input_ids"])
        if n > max_tokens:
            errors.append(LineError(str(path), t.line, f"task {t.id!r}: its gold trajectory is {n} tokens, over "
                                                     f"the limit of {max_tokens} ({limit}); task skipped"))
        else:
            kept.append(t)
    return kept, errors
