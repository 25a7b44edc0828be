"""Reference policies: the oracle (replays the gold trajectory; reward 1 on every task) and a
random policy (random text, random calls, stray tags; reward ~0). Both are baselines for the
checker and for the collapse detectors."""

from __future__ import annotations

import json
import random
import re
import string

from diagnose.chat import IM_END, IM_START, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, TOOL_RESPONSE_CLOSE, TOOL_RESPONSE_OPEN

from .base import Policy, Task
from .episode import gold_assistant_texts

_WORDS = (
    "the balance is done ok sure move send book lend stock id account item event flight tell me "
    "I will call now then answer dollars units seat due error sorry yes no"
).split()
_TAGS = (TOOL_CALL_OPEN, TOOL_CALL_CLOSE, TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE, IM_START, IM_END, "<|endoftext|>")
_NAME_RE = re.compile(r'"name": "([A-Za-z_][A-Za-z0-9_]*)"')


def oracle_policy(task: Task) -> Policy:
    """Replays ``task``'s gold assistant turns, whatever the tool outputs say."""
    texts = gold_assistant_texts(task)
    start = len(task.messages)

    def policy(messages: list[dict]) -> str:
        k = sum(1 for m in messages[start:] if m.get("role") == "assistant")
        return texts[min(k, len(texts) - 1)]

    return policy


def random_policy(seed: int = 0) -> Policy:
    """Random assistant turns: prose with numbers, calls to real or made-up tools with random
    arguments (Hermes, python-list or bare JSON), stray control tags, broken blocks."""
    rng = random.Random(f"random-policy/{seed}")

    def word() -> str:
        return rng.choice(_WORDS) if rng.random() < 0.7 else "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 8)))

    def value():
        r = rng.random()
        if r < 0.4:
            return rng.randrange(0, 500)
        if r < 0.8:
            return rng.choice([word(), f"{word()}-{rng.randrange(1000, 10000)}"])
        return rng.choice([None, True, 1.5, [], {}])

    def call(names: list[str]) -> str:
        name = rng.choice(names) if names and rng.random() < 0.7 else word()
        args = {word(): value() for _ in range(rng.randint(0, 3))}
        form = rng.random()
        if form < 0.5:
            return f"{TOOL_CALL_OPEN}\n{json.dumps({'name': name, 'arguments': args})}\n{TOOL_CALL_CLOSE}"
        if form < 0.75:
            inner = ", ".join(f"{k}={json.dumps(v)}" for k, v in args.items())
            return f"[{name}({inner})]"
        return json.dumps([{"name": name, "arguments": args}])

    def policy(messages: list[dict]) -> str:
        system = next((m.get("content") or "" for m in messages if m.get("role") == "system"), "")
        names = _NAME_RE.findall(system) or re.findall(r"\b([a-z]+_[a-z_]+)\(", system)
        parts = []
        for _ in range(rng.randint(1, 4)):
            r = rng.random()
            if r < 0.35:
                parts.append(" ".join(word() if rng.random() < 0.8 else str(rng.randrange(0, 500)) for _ in range(rng.randint(1, 12))))
            elif r < 0.7:
                parts.append(call(names))
            elif r < 0.85:
                parts.append(rng.choice(_TAGS))
            else:  # a truncated block
                full = call(names)
                parts.append(full[: rng.randint(1, max(1, len(full) - 1))])
        return rng.choice([" ", "\n", ""]).join(parts)

    return policy
