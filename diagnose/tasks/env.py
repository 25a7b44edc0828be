"""Environments: in-process Python tools over a mutable JSON state (`ToolEnv`) and the replay
environment of user task files (`ReplayEnv`). Every call returns a JSON-compatible dict; a bad
call (unknown tool, missing/extra/mistyped argument, failed precondition) returns
``{"error": "..."}`` and never raises."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

from diagnose.toolcall import ToolCall

from .base import Task, ToolError, ToolImpl, call_key, canon, schema_of
from .families import FAMILIES

def error(message: str) -> dict[str, Any]:
    return {"error": message}


def is_error(result: Any) -> bool:
    return isinstance(result, dict) and "error" in result


def validate_args(schema: dict[str, Any], arguments: Any) -> tuple[dict[str, Any] | None, str | None]:
    """Check arguments against a function schema's ``parameters``; return (coerced args, None) or
    (None, error message). Integral floats are accepted for integers; bools are not numbers."""
    if not isinstance(arguments, dict):
        return None, "arguments must be an object"
    params = schema.get("parameters") or {}
    props: dict[str, Any] = params.get("properties") or {}
    required = params.get("required") or []
    for name in required:
        if name not in arguments:
            return None, f"missing argument: {name}"
    out: dict[str, Any] = {}
    for name, value in arguments.items():
        if name not in props:
            return None, f"unexpected argument: {name}"
        typ = (props[name] or {}).get("type")
        if typ == "string":
            if not isinstance(value, str):
                return None, f"argument {name} must be a string"
        elif typ == "integer":
            if isinstance(value, float) and math.isfinite(value) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                return None, f"argument {name} must be an integer"
        elif typ == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return None, f"argument {name} must be a number"
        elif typ == "boolean":
            if not isinstance(value, bool):
                return None, f"argument {name} must be a boolean"
        out[name] = value
    return out, None


class ToolEnv:
    """Stateful tools of one task. ``state`` is plain JSON data, so states compare with ``==``."""

    def __init__(self, tools: Sequence[dict[str, Any]], impls: dict[str, ToolImpl], state: dict[str, Any]):
        self.schemas = {schema_of(t).get("name"): schema_of(t) for t in tools}
        self.impls = impls
        self.state = copy.deepcopy(state)

    def call(self, call: ToolCall) -> dict[str, Any]:
        name = call.name
        if name not in self.schemas or name not in self.impls:
            return error(f"unknown tool: {name}")
        args, problem = validate_args(self.schemas[name], call.arguments)
        if problem is not None:
            return error(problem)
        try:
            return self.impls[name](self.state, **args)
        except ToolError as exc:
            return error(str(exc))
        except Exception as exc:  # a tool bug must not kill a training run
            return error(f"tool failed: {type(exc).__name__}")

    def state_key(self) -> Any:
        return canon(self.state)


class ReplayEnv:
    """Environment of a task-file task: the expected calls of the current gold turn, as a
    multiset, must be made together in one assistant turn; then each call gets its recorded output
    (or ``{"ok": true}``) and the pointer moves on. Any other turn gets an error per call and the
    pointer stays (the model may retry). The state is the number of gold turns matched."""

    def __init__(self, gold_turns: Sequence[Sequence[ToolCall]], outputs: Sequence[Sequence[Any]] | None):
        self.turns = [list(t) for t in gold_turns if t]
        self.outputs = outputs
        self.state = {"matched_turns": 0}

    def call_turn(self, calls: Sequence[ToolCall]) -> list[Any]:
        k = self.state["matched_turns"]
        if k >= len(self.turns):
            return [error("no more tool calls expected; answer the user") for _ in calls]
        gold = self.turns[k]
        if sorted(call_key(c) for c in calls) != sorted(call_key(c) for c in gold):
            names = ", ".join(c.name for c in gold)
            return [error(f"unexpected call; expected: {names}") for _ in calls]
        recorded = self.outputs[k] if self.outputs is not None else [{"ok": True}] * len(gold)
        by_key: dict[str, list[Any]] = {}
        for g, out in zip(gold, recorded):
            by_key.setdefault(call_key(g), []).append(out)
        self.state["matched_turns"] = k + 1
        return [copy.deepcopy(by_key[call_key(c)].pop(0)) for c in calls]

    def state_key(self) -> Any:
        return dict(self.state)


def make_env(task: Task) -> ToolEnv | ReplayEnv:
    """A fresh environment in the task's initial state."""
    if task.family == "replay":
        return ReplayEnv(task.gold_turns, task.gold_outputs)
    fam = FAMILIES[task.family]
    return ToolEnv(task.tools, fam.impls, task.init_state)


def execute_turn(env: ToolEnv | ReplayEnv, calls: Sequence[ToolCall]) -> list[Any]:
    """Run one assistant turn's calls, in order; one result per call."""
    if isinstance(env, ReplayEnv):
        return env.call_turn(calls)
    return [env.call(c) for c in calls]


def gold_state(task: Task) -> Any:
    """The normalised world state after the gold calls."""
    env = make_env(task)
    for turn in task.gold_turns:
        if turn:
            execute_turn(env, turn)
    return env.state_key()
