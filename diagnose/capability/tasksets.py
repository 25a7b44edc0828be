"""The probe's task set: held-out generated tasks or a user task file, and the same tasks
re-rendered in another call syntax.

Why re-render instead of new tasks: the alternative-syntax measures must differ from native in
the format *only*. For generated tasks, ``resyntax(test task i, PYTHONIC)`` is exactly the
``format_ood`` task *i* (same instance, python-list tools section and gold calls; a test checks
this), and JSON is the same instance with the JSON section; task-file tasks get the same
treatment (their system prompt's tools section is swapped).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

from diagnose.jsonl import LineError
from diagnose.tasks import Task, load_task_file, make_tasks
from diagnose.tasks.base import system_prompt, with_tools_section
from diagnose.toolcall import CallSyntax, render_tools_instructions


def resyntax(task: Task, syntax: CallSyntax | str) -> Task:
    """``task`` with its tools section and expected call syntax switched to ``syntax``."""
    syntax = CallSyntax(syntax)
    if task.syntax == syntax:
        return task
    old = render_tools_instructions(task.tools, task.syntax)
    new = render_tools_instructions(task.tools, syntax)
    messages = copy.deepcopy(task.messages)
    if messages and messages[0].get("role") == "system":
        content = messages[0].get("content") or ""
        if old in content:
            messages[0]["content"] = content.replace(old, new, 1)
        else:
            messages[0]["content"] = with_tools_section(content, task.tools, syntax)
    else:
        messages.insert(0, {"role": "system", "content": system_prompt(task.tools, syntax)})
    return dataclasses.replace(task, syntax=syntax, messages=messages)


@dataclasses.dataclass
class TaskSet:
    tasks: list[Task]
    source: str  # "test split, seed 0" or the task file path
    errors: list[LineError]

    def fingerprint(self) -> str:
        """Identifies the task set (ids, prompts, gold calls): results of two probes are
        comparable only if their fingerprints are equal."""
        h = hashlib.sha256()
        for t in self.tasks:
            h.update(json.dumps([t.id, t.syntax.value, t.messages, [[c.to_dict() for c in turn] for turn in t.gold_turns],
                                 t.answer_value], sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]


def load_taskset(n_tasks: int, *, split: str = "test", seed: int = 0, task_file: str | Path | None = None) -> TaskSet:
    """``n_tasks`` generated tasks of ``split``, or every usable task of a task file (bad lines
    come back in ``errors``; a missing file raises ``FileNotFoundError``): the probe keeps the
    first ``n_tasks`` of them that fit its context (`diagnose.tasks.fit_context`)."""
    if task_file is not None:
        tasks, errors = load_task_file(task_file)
        return TaskSet(tasks, str(task_file), errors)
    return TaskSet(make_tasks(split, n_tasks, seed=seed), f"{split} split, seed {seed}", [])
