"""Deterministic task generation (`make_tasks`) and hints (`hint_for`, `with_hint`)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import random

from diagnose.toolcall import CallSyntax, ToolCall

from .base import SPLITS, Task, system_prompt
from .env import ToolEnv, is_error
from .families import FAMILIES, SPLIT_FAMILIES, Family, Instance

#: Share of the train/test instance space (keyed by the user request) that belongs to test.
TEST_BUCKETS = 1  # out of 5: 20%


def _is_test_instance(user: str) -> bool:
    """Partition of the request space: a request is either a train or a test request, for every
    seed, so the two splits can never share an instance."""
    return hashlib.sha256(user.encode()).digest()[0] % 5 < TEST_BUCKETS


def default_syntax(split: str) -> CallSyntax:
    return CallSyntax.PYTHONIC if split == "format_ood" else CallSyntax.HERMES


def _instance(fam: Family, stream: str, seed: int, i: int) -> Instance:
    for attempt in range(1000):
        inst = fam.generate(random.Random(f"{stream}/{seed}/{i}/{attempt}"))
        if stream == "content_ood" or _is_test_instance(inst.user) == (stream == "test"):
            return inst
    raise RuntimeError(f"no {stream} instance for family {fam.name}")  # pragma: no cover


def build_task(fam: Family, inst: Instance, task_id: str, split: str, syntax: CallSyntax) -> Task:
    """Turn a generated instance into a `Task`: prompt, gold turns, and the gold answer obtained by
    executing the gold calls."""
    tools = copy.deepcopy(fam.tools)
    env = ToolEnv(tools, fam.impls, inst.state)
    outs = []
    for turn in inst.gold_turns:
        results = [env.call(c) for c in turn]
        bad = [r for r in results if is_error(r)]
        if bad:  # a generator bug, not a user error
            raise AssertionError(f"{task_id}: gold call failed: {bad}")
        outs.append(results)
    answer, value = inst.answer(outs)
    task = Task(
        id=task_id,
        family=fam.name,
        split=split,
        syntax=CallSyntax(syntax),
        tools=tools,
        messages=[
            {"role": "system", "content": system_prompt(tools, syntax)},
            {"role": "user", "content": inst.user},
        ],
        gold_turns=[list(t) for t in inst.gold_turns] + [[]],
        gold_answer=answer,
        answer_value=value,
        init_state=copy.deepcopy(inst.state),
        variant=inst.variant,
    )
    task.hint = hint_for(task)
    return task


def make_tasks(split: str, n: int, seed: int = 0, *, syntax: CallSyntax | str | None = None) -> list[Task]:
    """``n`` tasks of ``split``, cycling through its families; deterministic in (split, n, seed),
    and prefix-stable: ``make_tasks(s, 10)[:5] == make_tasks(s, 5)``.

    ``format_ood`` task *i* is ``test`` task *i* (same seed) in python-list syntax.
    ``syntax`` overrides the split's call syntax (e.g. ``CallSyntax.JSON``).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError("n must be >= 0")
    syn = CallSyntax(syntax) if syntax is not None else default_syntax(split)
    stream = "test" if split == "format_ood" else split
    fams = SPLIT_FAMILIES[split]
    tasks = []
    for i in range(n):
        fam = FAMILIES[fams[i % len(fams)]]
        inst = _instance(fam, stream, seed, i)
        tasks.append(build_task(fam, inst, f"{split}-{fam.name}-s{seed}-{i:05d}", split, syn))
    return tasks


# ---------------------------------------------------------------------------------- hints


def _describe_args(call: ToolCall) -> str:
    parts = [f"{k} {v}" if not isinstance(v, str) else f'{k} "{v}"' for k, v in call.arguments.items()]
    return " and ".join(parts)


def hint_for(task: Task, level: int = 1) -> str:
    """A short hint for hint-guided RL, meant to be appended to the system prompt.

    level 1: the first call and its arguments (``Hint: first call find_account with name "Alice".``);
    level 2: the plan of tool names per turn (``Hint: call find_account and find_account, then
    transfer, then get_balance, then answer.``); level 3: both (``... Plan: ...``).
    """
    turns = [t for t in task.gold_turns if t]
    if not turns:
        return "Hint: answer directly."
    first = turns[0][0]
    args = _describe_args(first)
    h1 = f"Hint: first call {first.name}" + (f" with {args}." if args else ".")
    plan = ", then ".join(" and ".join(c.name for c in t) for t in turns)
    h2 = f"Hint: call {plan}, then answer."
    if level <= 1:
        return h1
    if level == 2:
        return h2
    return f"{h1} Plan: {plan}, then answer."


def with_hint(task: Task, level: int = 1) -> Task:
    """A copy of ``task`` whose system prompt ends with ``hint_for(task, level)``."""
    hint = hint_for(task, level)
    messages = copy.deepcopy(task.messages)
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = (messages[0].get("content") or "") + "\n\n" + hint
    else:
        messages.insert(0, {"role": "system", "content": hint})
    return dataclasses.replace(task, messages=messages)
