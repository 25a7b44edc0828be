"""Rollouts frames in the contract columns: typing of extra JSON columns, concatenation across
files, list columns of turn states/errors and group ids.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from diagnose.adapters._common.turns import TurnClassifier
from diagnose.adapters._common.values import as_float


STR_LIST = pl.List(pl.String)

ROLLOUT_CONTRACT: dict[str, pl.DataType] = {
    "step": pl.Int64(),
    "sample_id": pl.Int64(),
    "group_id": pl.Int64(),
    "prompt": pl.String(),
    "completion": pl.String(),
    "reward": pl.Float64(),
    "accuracy": pl.Float64(),
    "n_turns": pl.Int32(),
    "turn_states": STR_LIST,
    "error_types": STR_LIST,
}


def empty_rollouts(accuracy: bool = False) -> pl.DataFrame:
    schema = {k: v for k, v in ROLLOUT_CONTRACT.items() if accuracy or k != "accuracy"}
    return pl.DataFrame(schema=schema)


def json_scalar_column(name: str, values: list[Any]) -> pl.Series:
    """An extra column from JSON values: numbers -> Float64 (ints stay Int64), bools -> Boolean,
    strings -> String, anything else (lists, objects, mixed types) -> JSON text."""
    kinds = {type(v) for v in values if v is not None}
    if kinds and kinds <= {bool}:
        return pl.Series(name, values, dtype=pl.Boolean)
    if kinds and kinds <= {int}:
        try:
            return pl.Series(name, values, dtype=pl.Int64)
        except (OverflowError, pl.exceptions.PolarsError):
            pass
    if kinds and kinds <= {int, float}:
        return pl.Series(name, [None if v is None else as_float(v) for v in values], dtype=pl.Float64)
    if not kinds or kinds <= {str}:
        return pl.Series(name, values, dtype=pl.String)
    return pl.Series(
        name,
        [None if v is None else (v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str))
         for v in values],
        dtype=pl.String,
    )


def rollouts_frame(cols: Mapping[str, list[Any] | pl.Series], extras: Mapping[str, pl.Series | list[Any]] = ()) -> pl.DataFrame:
    """Contract columns (those present in ``cols``, in contract order, with contract dtypes)
    followed by ``extras`` (Series, or JSON value lists typed with `json_scalar_column`)."""
    series = []
    for name, dtype in ROLLOUT_CONTRACT.items():
        if name in cols:
            v = cols[name]
            if isinstance(v, pl.Series):
                series.append(v.alias(name).cast(dtype))
            else:
                series.append(pl.Series(name, v, dtype=dtype, strict=False))
    for name, values in dict(extras).items():
        if name in ROLLOUT_CONTRACT:
            continue
        s = values if isinstance(values, pl.Series) else json_scalar_column(name, list(values))
        series.append(s.alias(name))
    return pl.DataFrame(series)


def concat_frames(frames: list[pl.DataFrame], empty: pl.DataFrame) -> pl.DataFrame:
    frames = [f for f in frames if f.width]
    if not frames:
        return empty
    try:
        return pl.concat(frames, how="diagonal_relaxed")
    except pl.exceptions.PolarsError:
        # incompatible extra columns across files: stringify the extras that clash
        names: dict[str, set] = {}
        for f in frames:
            for k, v in f.schema.items():
                names.setdefault(k, set()).add(v)
        clash = [k for k, v in names.items() if len(v) > 1 and k not in ROLLOUT_CONTRACT]
        return pl.concat([f.with_columns([_as_text(f.get_column(k)) for k in clash if k in f.columns])
                          for f in frames], how="diagonal_relaxed")


def _as_text(s: pl.Series) -> pl.Series:
    if s.dtype.is_nested() or s.dtype == pl.Object:
        return pl.Series(s.name, [None if v is None else json.dumps(v, default=str) for v in s.to_list()],
                         dtype=pl.String)
    return s.cast(pl.String, strict=False)


class ListColumn:
    """A list[str] column built from many repeated lists: each distinct list is converted once,
    then gathered (building millions of small Python lists into polars is the slow part)."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, ...] | None, int] = {}
        self._uniques: list[list[str] | None] = []
        self.keys: list[int] = []

    def append(self, value: Sequence[str] | None) -> None:
        k = None if value is None else tuple(value)
        i = self._ids.get(k)
        if i is None:
            i = self._ids[k] = len(self._uniques)
            self._uniques.append(None if value is None else list(value))
        self.keys.append(i)

    def series(self, name: str) -> pl.Series:
        uniques = pl.Series(name, self._uniques, dtype=STR_LIST)
        return uniques.gather(pl.Series(self.keys, dtype=pl.UInt32)) if self.keys else uniques.head(0)


def turn_columns(classifier: TurnClassifier, completions: Sequence[str | None],
                 tool_names: Sequence[tuple[str, ...] | None] | None = None) -> dict[str, Any]:
    """``turn_states``, ``error_types`` (Series) and ``n_turns`` for a list of completions
    (a null completion gets nulls); ``tool_names``: per completion, the tools its prompt offers."""
    states, errors, n = ListColumn(), ListColumn(), []
    for i, c in enumerate(completions):
        if c is None:
            states.append(None)
            errors.append(None)
            n.append(None)
            continue
        s, e = classifier.completion(c, None if tool_names is None else tool_names[i])
        states.append(s)
        errors.append(e)
        n.append(len(s))
    return {"turn_states": states.series("turn_states"), "error_types": errors.series("error_types"), "n_turns": n}


def groups_by_key(keys: Sequence[Any]) -> list[int]:
    """Group ids by first appearance of each key (None: a group of its own)."""
    ids: dict[Any, int] = {}
    out = []
    nxt = 0
    for k in keys:
        if k is None:
            out.append(nxt)
            nxt += 1
            continue
        g = ids.get(k)
        if g is None:
            g = ids[k] = nxt
            nxt += 1
        out.append(g)
    return out


def groups_consecutive(keys: Sequence[Any]) -> list[int]:
    """Group ids for runs of equal consecutive keys (TRL logs a group's rows together)."""
    out = []
    g = -1
    prev: Any = object()
    for k in keys:
        if k is None or k != prev:
            g += 1
        prev = k
        out.append(g)
    return out
