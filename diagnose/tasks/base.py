"""Core types of the tool-use environment: `Task`, `Score`, `Episode`, `Policy`, `SPLITS`, and the
small JSON helpers every other module of the package shares (tool schemas, argument
normalisation, answer matching)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from diagnose.toolcall import CallSyntax, ToolCall
from diagnose.turns import TurnClassification, TurnState


#: A tool implementation: (state, validated arguments) -> result dict; mutates ``state``.
#: Raise `ToolError` for a failed precondition.
ToolImpl = Callable[..., dict[str, Any]]


class ToolError(Exception):
    """A tool's refusal; becomes ``{"error": message}``."""


#: A policy maps the conversation so far (system, user, assistant and tool messages) to the raw
#: text of the next assistant turn (tool-call blocks included, no ``<|im_end|>``).
Policy = Callable[[list[dict]], str]

#: The built-in splits. ``train``/``test``: the same three families, disjoint instances.
#: ``content_ood``: unseen families and tools. ``format_ood``: the test instances, python-list syntax.
SPLITS: tuple[str, ...] = ("train", "test", "content_ood", "format_ood")

#: Split name of tasks read from a user task file.
FILE_SPLIT = "file"

INSTRUCTION = "You are a helpful assistant. Use the tools to do the task, then answer briefly."


@dataclass
class Task:
    """One episode's worth of work: the prompt, the tools, the initial world and the gold path."""

    id: str
    family: str  # "bank", "inventory", ... or "replay" for task-file tasks
    split: str  # one of SPLITS, or "file"
    syntax: CallSyntax
    tools: list[dict]  # {"type": "function", "function": {...}} schemas
    messages: list[dict]  # [system, user]; the system prompt holds the tools section
    gold_turns: list[list[ToolCall]]  # gold calls per assistant turn; the last is [] (the answer)
    gold_answer: str  # gold final answer text
    answer_value: str = ""  # what the final answer must contain ("" = anything goes)
    init_state: dict[str, Any] = field(default_factory=dict)  # the world before the episode
    gold_outputs: list[list[Any]] | None = None  # replay tasks: the recorded tool outputs
    variant: str = ""  # the family's task variant, e.g. "transfer_balance"
    hint: str = ""  # the level-1 hint (see `hint_for`); not in the prompt unless added
    line: int = 0  # the task file line it was read from (0: a generated task), for messages

    @property
    def user(self) -> str:
        """The (last) user request."""
        return next((m.get("content") or "" for m in reversed(self.messages) if m.get("role") == "user"), "")

    @property
    def n_gold_calls(self) -> int:
        return sum(len(t) for t in self.gold_turns)


@dataclass
class Score:
    """How an episode did. ``reward`` is binary: ``state_right and answer_right``.

    ``calls_right``: matched gold calls / gold calls, matching name + normalised arguments as a
    multiset over the whole episode (order and turn placement ignored; a call made twice matches
    one gold call once). ``calls_precision``: matched / calls made.
    """

    reward: float
    calls_right: float
    state_right: bool
    answer_right: bool
    calls_precision: float = 0.0
    n_turns: int = 0  # assistant turns taken
    n_calls: int = 0  # call attempts (well-formed or not)
    well_formed_calls: int = 0  # calls that parsed
    tool_errors: int = 0  # tool outputs that were error objects (bad args, unknown tool, ...)
    finished: bool = False  # the episode ended with a turn without calls (not by max_turns)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Episode:
    task_id: str
    messages: list[dict]
    turn_states: list[TurnState]
    score: Score
    turn_calls: list[list[ToolCall]] = field(default_factory=list)  # well-formed calls per turn
    classifications: list[TurnClassification] = field(default_factory=list)
    final_answer: str | None = None  # content of the call-free last turn, None if none

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible summary (messages, states, calls, score)."""
        return {
            "task_id": self.task_id,
            "messages": self.messages,
            "turn_states": [str(s) for s in self.turn_states],
            "turn_calls": [[c.to_dict() for c in t] for t in self.turn_calls],
            "final_answer": self.final_answer,
            "score": self.score.to_dict(),
        }


# --------------------------------------------------------------------------- JSON helpers


def tool_schema(name: str, description: str, /, **params: str) -> dict[str, Any]:
    """A compact Qwen/OpenAI function schema; every parameter is required.
    ``params`` maps parameter name -> JSON type (``string``, ``integer``, ``number``, ``boolean``)."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {p: {"type": t} for p, t in params.items()},
                "required": list(params),
            },
        },
    }


def schema_of(tool: dict[str, Any]) -> dict[str, Any]:
    """The ``function`` part of a tool schema (accepts the bare form too)."""
    fn = tool.get("function", tool)
    return fn if isinstance(fn, dict) else {}


def tool_names(tools: Sequence[dict[str, Any]]) -> list[str]:
    return [str(schema_of(t).get("name")) for t in tools]


def canon(value: Any) -> Any:
    """Normalise a JSON value for comparison: integral floats become ints, dicts are key-sorted."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        return value
    if isinstance(value, dict):
        return {str(k): canon(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [canon(v) for v in value]
    return repr(value)


def call_key(call: ToolCall) -> str:
    """Comparison key of a call: name + normalised arguments."""
    return json.dumps([call.name, canon(call.arguments)], sort_keys=True, ensure_ascii=False, default=repr)


def multiset_matches(made: Sequence[ToolCall], gold: Sequence[ToolCall]) -> int:
    """Size of the multiset intersection of two call lists (by `call_key`)."""
    pool: dict[str, int] = {}
    for c in gold:
        k = call_key(c)
        pool[k] = pool.get(k, 0) + 1
    hits = 0
    for c in made:
        k = call_key(c)
        if pool.get(k, 0) > 0:
            pool[k] -= 1
            hits += 1
    return hits


def contains_value(text: str, value: str) -> bool:
    """Whether ``value`` occurs in ``text`` as a whole token: case-insensitive, any run of
    whitespace inside ``value`` matches any whitespace, and it may not be glued to a letter or
    digit on either side ("70" is in "is 70." but not in "170" or "70.5")."""
    value = value.strip()
    if not value:
        return True
    pattern = r"\s+".join(re.escape(part) for part in value.split())
    return re.search(rf"(?<![0-9A-Za-z_]){pattern}(?![0-9A-Za-z_]|\.\d)", text, re.IGNORECASE) is not None


def with_tools_section(text: str, tools: Sequence[dict[str, Any]], syntax: CallSyntax) -> str:
    """``text`` followed by the tools section of ``syntax`` (as Qwen2.5 puts it after the system
    prompt), unless ``text`` already holds it."""
    from diagnose.toolcall import render_tools_instructions

    section = render_tools_instructions(list(tools), syntax)
    if section in text:
        return text
    sep = "" if section.startswith("\n") or not text else "\n\n"
    return text + sep + section


def system_prompt(tools: Sequence[dict[str, Any]], syntax: CallSyntax, instruction: str = INSTRUCTION) -> str:
    """The system message of a task: a short instruction, then the tools section."""
    return with_tools_section(instruction, tools, syntax)
