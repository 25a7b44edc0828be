"""Text for training the tiny model's tokenizer: rendered gold conversations of every split and
call syntax, plus variations (hinted prompts, a failed call followed by recovery)."""

from __future__ import annotations

import random
from collections.abc import Iterator

from diagnose.chat import render_chat
from diagnose.toolcall import CallSyntax, ToolCall, render_calls

from .base import Task
from .episode import Rollout, gold_assistant_texts, gold_messages
from .generate import make_tasks, with_hint

#: (kind, split, syntax, weight)
_MIX: tuple[tuple[str, str, CallSyntax | None, float], ...] = (
    ("gold", "train", None, 0.40),
    ("gold", "test", None, 0.08),
    ("gold", "content_ood", None, 0.12),
    ("gold", "format_ood", None, 0.12),
    ("gold", "train", CallSyntax.JSON, 0.05),
    ("hint", "train", None, 0.13),
    ("recover", "train", None, 0.10),
)
_CHUNK = 64


def recovery_messages(task: Task, rng: random.Random) -> list[dict]:
    """Gold conversation preceded by one failed call: the first gold call with a typo in its
    first string argument, its error output, then the gold turns."""
    first = next(t for t in task.gold_turns if t)[0]
    args = dict(first.arguments)
    key = next((k for k, v in args.items() if isinstance(v, str)), None)
    if key is not None:
        args[key] = args[key] + rng.choice("xyzq")
    bad = ToolCall(first.name, args)
    r = Rollout(task, max_turns=len(task.gold_turns) + 1)
    r.step(render_calls([bad], task.syntax))
    for text in gold_assistant_texts(task):
        if r.done:
            break
        r.step(text)
    return r.messages


def tokenizer_corpus(n: int = 2000, seed: int = 0) -> Iterator[str]:
    """``n`` rendered conversations (``render_chat``), deterministic in (n, seed)."""
    rng = random.Random(f"corpus/{seed}")
    pools: dict[int, list[Task]] = {}
    used: dict[int, int] = {}
    kinds, weights = list(range(len(_MIX))), [m[3] for m in _MIX]
    for _ in range(n):
        k = rng.choices(kinds, weights)[0]
        kind, split, syntax, _w = _MIX[k]
        pool = pools.setdefault(k, [])
        if not pool:
            chunk = used.get(k, 0)
            used[k] = chunk + 1
            pool.extend(make_tasks(split, _CHUNK, seed=1_000_003 * seed + 7919 * k + chunk, syntax=syntax))
            pool.reverse()
        task = pool.pop()
        if kind == "hint":
            messages = gold_messages(with_hint(task, rng.choice((1, 2, 3))))
        elif kind == "recover":
            messages = recovery_messages(task, rng)
        else:
            messages = gold_messages(task)
        yield render_chat(messages)
