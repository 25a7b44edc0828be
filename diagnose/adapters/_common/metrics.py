"""Per-step metrics frames: building, name mapping, metrics derived from rollouts, merging,
and non-finite checks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from diagnose.adapters._common.issues import IssueLog
from diagnose.adapters._common.values import as_float
from diagnose.turns import FormatError, TurnState

STATES: tuple[str, ...] = tuple(s.value for s in TurnState)
ERRORS: tuple[str, ...] = tuple(e.value for e in FormatError)


def metrics_frame(records: Mapping[int, Mapping[str, Any]]) -> pl.DataFrame:
    """``{step: {name: value}}`` -> one row per step (sorted), ``step`` (Int64) first, every
    numeric/bool metric as Float64 (non-numeric values are dropped)."""
    steps = sorted(records)
    names: dict[str, None] = {}
    for s in steps:
        for k, v in records[s].items():
            if k != "step" and as_float(v) is not None:
                names.setdefault(k, None)
    cols = [pl.Series("step", steps, dtype=pl.Int64)]
    for k in names:
        cols.append(pl.Series(k, [as_float(records[s].get(k)) for s in steps], dtype=pl.Float64))
    return pl.DataFrame(cols) if steps else pl.DataFrame(schema={"step": pl.Int64})


def non_numeric_metric_issues(records: Mapping[int, Mapping[str, Any]], path: str, issues: IssueLog) -> None:
    """One issue per metric with values that are no number, bool or null (a string, a list, an
    object): `metrics_frame` drops those values, and the user should know which."""
    bad: dict[str, list[Any]] = {}
    for s in sorted(records):
        for k, v in records[s].items():
            if k != "step" and v is not None and as_float(v) is None:
                entry = bad.setdefault(str(k), [0, s, type(v).__name__])
                entry[0] += 1
    for k, (n, first, kind) in bad.items():
        issues.add(path, None, f"metric {k!r} is not a number at {n} step(s) (first: step {first}, a {kind}); "
                               "those values dropped")


def map_names(df: pl.DataFrame, mapping: Mapping[str, str]) -> pl.DataFrame:
    """Add our name for each mapped column (originals are kept). The first source present wins
    when several map to one name; a name already present is never overwritten."""
    add = []
    taken = set(df.columns)
    for src, dst in mapping.items():
        if src in df.columns and dst not in taken:
            add.append(pl.col(src).alias(dst))
            taken.add(dst)
    return df.with_columns(add) if add else df


def derived_metrics(rollouts: pl.DataFrame, reward_columns: Sequence[str] = ()) -> pl.DataFrame:
    """Per-step metrics computed from the rollouts, with native names:

    ``reward``/``reward_std`` (mean/std over finite rewards), ``accuracy`` (mean, if the column
    exists), ``rewards/<col>/mean`` per reward column, ``turn_state/<state>`` (share of assistant
    turns in that state), ``format_error/<type>`` (turns with that error / turns; types seen in
    the run) and ``rollouts/count``.
    """
    if rollouts.height == 0:
        return pl.DataFrame(schema={"step": pl.Int64})
    finite = pl.when(pl.col("reward").is_finite()).then(pl.col("reward"))
    aggs: list[pl.Expr] = [
        finite.mean().alias("reward"),
        finite.std(ddof=0).alias("reward_std"),
        pl.len().cast(pl.Float64).alias("rollouts/count"),
    ]
    if "accuracy" in rollouts.columns:
        aggs.append(pl.col("accuracy").fill_nan(None).mean().alias("accuracy"))
    for c in reward_columns:
        if c in rollouts.columns:
            aggs.append(pl.when(pl.col(c).is_finite()).then(pl.col(c)).mean().alias(f"rewards/{c}/mean"))
    has_states = rollouts.get_column("turn_states").drop_nulls().len() > 0
    if has_states:
        n_turns = pl.col("turn_states").list.len().sum()
        for s in STATES:
            aggs.append((pl.col("turn_states").list.eval(pl.element() == s).list.sum().sum() / n_turns)
                        .alias(f"turn_state/{s}"))
        seen = set(rollouts.get_column("error_types").explode().drop_nulls().unique().to_list())
        for e in ERRORS:
            if e in seen:
                aggs.append((pl.col("error_types").list.eval(pl.element() == e).list.sum().sum() / n_turns)
                            .alias(f"format_error/{e}"))
    out = rollouts.group_by("step").agg(aggs).sort("step")
    cast = [pl.col(c).cast(pl.Float64) for c in out.columns if c != "step"]
    return out.with_columns(cast)


def merge_metrics(primary: pl.DataFrame, derived: pl.DataFrame) -> pl.DataFrame:
    """``primary`` with the columns of ``derived`` it lacks (outer join on step, sorted)."""
    if derived.height == 0 or derived.width <= 1:
        return primary
    extra = [c for c in derived.columns if c == "step" or c not in primary.columns]
    if len(extra) <= 1:
        return primary
    if primary.height == 0:
        out = derived.select(extra)
        for c in primary.columns:
            if c not in out.columns:
                out = out.with_columns(pl.lit(None, dtype=primary.schema[c]).alias(c))
        return out.sort("step")
    return primary.join(derived.select(extra), on="step", how="full", coalesce=True).sort("step")


def nonfinite_metric_issues(df: pl.DataFrame, path: str, issues: IssueLog) -> None:
    """One issue per metric column holding NaN/inf (value kept: a NaN loss is a signal)."""
    for c in df.columns:
        if c == "step" or df.schema[c] not in (pl.Float64, pl.Float32):
            continue
        bad = df.filter(pl.col(c).is_not_null() & ~pl.col(c).is_finite())
        if bad.height:
            first = bad.row(0, named=True)
            issues.add(path, None, f"metric {c!r} is non-finite at {bad.height} step(s) "
                                   f"(first: step {first['step']}, {first[c]}); kept")
