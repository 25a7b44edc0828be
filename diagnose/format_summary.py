"""Turn-state tables for a set of conversations: classify every assistant turn once, then let
polars do the counting (`diagnose formats`, the demo, adapters of text-only runs)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import polars as pl

from diagnose.conversations import Conversation
from diagnose.turns import TurnState, classify_turn

STATES: tuple[str, ...] = tuple(s.value for s in TurnState)

TURN_SCHEMA = pl.Schema(
    {
        "conversation": pl.String,
        "turn": pl.Int32,
        "state": pl.Enum(list(STATES)),
        "errors": pl.List(pl.String),
        "n_calls": pl.Int32,
    }
)


def turn_table(conversations: Iterable[Conversation], **columns: Any) -> pl.DataFrame:
    """One row per assistant turn: conversation id, turn index, state, error types, calls.

    Extra keyword columns (e.g. ``source=...``) are taken per conversation from ``extra``.
    """
    rows: dict[str, list[Any]] = {k: [] for k in TURN_SCHEMA}
    extra_cols: dict[str, list[Any]] = {k: [] for k in columns}
    for conv in conversations:
        for i, text in enumerate(conv.assistant_texts()):
            c = classify_turn(text, conv.tools)
            rows["conversation"].append(conv.id)
            rows["turn"].append(i)
            rows["state"].append(c.state.value)
            rows["errors"].append([e.value for e in c.errors])
            rows["n_calls"].append(len(c.calls))
            for k, default in columns.items():
                extra_cols[k].append(conv.extra.get(k, default))
    df = pl.DataFrame(rows, schema=TURN_SCHEMA)
    return df.with_columns(pl.Series(k, v) for k, v in extra_cols.items()) if columns else df


def summarize(turns: pl.DataFrame, n_conversations: int) -> dict[str, Any]:
    """The `diagnose formats --json` object: counts per state and per error type."""
    states = dict(turns.group_by("state").len().select(pl.col("state").cast(pl.String), "len").iter_rows())
    errors = (
        turns.select(pl.col("errors").explode().drop_nulls())
        .group_by("errors")
        .len()
        .sort(["len", "errors"], descending=[True, False])
    )
    n = turns.height
    return {
        "conversations": n_conversations,
        "assistant_turns": n,
        "states": {s: int(states.get(s, 0)) for s in STATES},
        "state_rates": {s: (states.get(s, 0) / n if n else 0.0) for s in STATES},
        "errors": {e: int(k) for e, k in errors.iter_rows()},
    }
