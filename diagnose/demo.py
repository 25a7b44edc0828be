"""`diagnose demo`: the main job on the embedded default, end to end on one CPU.

Rolls out three sources on the same held-out tasks and classifies every assistant turn:
- ``gold``: the oracle (ground-truth calls) — what healthy multi-step tool use looks like;
- ``tiny-untrained``: the embedded tiny model, randomly initialised, sampled for real;
- ``bare-call (synthetic)``: the oracle, except that each tool-call turn is, with probability 0.8,
  replaced by the collapse signature seen in real Qwen2.5-1.5B runs (a bare ``<tool_call>`` and
  the turn ends). It is labelled synthetic: it shows what the classifier reports for that
  failure, not a measured collapse (the trainer's `collapse` preset produces a real one).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from diagnose.atomic import atomic_write_text
from diagnose.chat import TOOL_CALL_OPEN
from diagnose.conversations import Conversation
from diagnose.format_summary import STATES, turn_table
from diagnose.model.generation import hf_policy
from diagnose.tasks import Task, make_tasks, oracle_policy, run_episode
from diagnose.model.build import ensure_default_model
from diagnose.model.resolve import load_model_and_tokenizer


def bare_call_policy(task: Task, rate: float, seed: int):
    """Oracle turns, with each call turn replaced by a bare `<tool_call>` at ``rate``."""
    oracle = oracle_policy(task)
    rng = random.Random(seed)

    def policy(messages: list[dict[str, Any]]) -> str:
        text = oracle(messages)
        return TOOL_CALL_OPEN if TOOL_CALL_OPEN in text and rng.random() < rate else text

    return policy


def run_demo(out: Path, *, n_tasks: int = 24, seed: int = 0, console: Console | None = None) -> pl.DataFrame:
    console = console or Console()
    with console.status("building the embedded tiny model (first run only)"):
        model_dir = ensure_default_model()
    model, tokenizer = load_model_and_tokenizer(model_dir)
    tasks = make_tasks("test", n_tasks, seed=seed)
    sources = {
        "gold": lambda t: oracle_policy(t),
        "tiny-untrained": lambda t: hf_policy(model, tokenizer, seed=seed),
        "bare-call (synthetic)": lambda t: bare_call_policy(t, 0.8, seed),
    }
    convs: list[Conversation] = []
    rewards: list[dict[str, Any]] = []
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("rolling out", total=len(tasks) * len(sources))
        for source, make_policy in sources.items():
            for task in tasks:
                ep = run_episode(task, make_policy(task))
                convs.append(Conversation(f"{source}/{task.id}", ep.messages, task.tools,
                                          extra={"source": source, "reward": ep.score.reward}))
                rewards.append({"source": source, "reward": ep.score.reward})
                progress.advance(bar)

    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": c.id, "messages": c.messages, "tools": c.tools, **c.extra}) for c in convs]
    atomic_write_text(out / "conversations.jsonl", "\n".join(lines) + "\n")

    turns = turn_table(convs, source="")
    by_source = (
        turns.group_by("source")
        .agg([(pl.col("state") == s).mean().alias(s) for s in STATES] + [pl.len().alias("turns")])
        .join(pl.DataFrame(rewards).group_by("source").agg(pl.col("reward").mean()), on="source")
        .sort("source")
    )
    table = Table(title=f"turn states by source ({n_tasks} test tasks each; model: {model_dir})")
    for col in ["source", "turns", "reward", *STATES]:  # folded headers: fits 80 columns
        table.add_column(col.replace("_", "\n"), justify="left" if col == "source" else "right")
    for row in by_source.iter_rows(named=True):
        table.add_row(row["source"], str(row["turns"]), f"{row['reward']:.2f}",
                      *(f"{row[s]:.0%}" for s in STATES))
    console.print(table)
    console.print(f"conversations written to {out / 'conversations.jsonl'}; "
                  f"classify them again with: diagnose formats {out / 'conversations.jsonl'}")
    return by_source
