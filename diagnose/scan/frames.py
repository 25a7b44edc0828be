"""The polars pieces the signal layer shares: step frames (one row per step) joined into one,
non-finite values as nulls, and the streaming collect every signal query ends in."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

__all__ = ["as_f64", "collect", "finite_or_null", "join_steps", "restrict_steps"]


def collect(lf: pl.LazyFrame) -> pl.DataFrame:
    """Collect with the streaming engine: a token table of 50M+ rows is never materialised."""
    return lf.collect(engine="streaming")


def restrict_steps(lf: pl.LazyFrame, steps: list[int] | None) -> pl.LazyFrame:
    """The rows of those steps (None: all)."""
    if steps is None:
        return lf
    return lf.filter(pl.col("step").is_in(pl.Series(steps, dtype=pl.Int64).implode()))


def as_f64(e: pl.Expr) -> pl.Expr:
    return e.cast(pl.Float64)


def finite_or_null(e: pl.Expr) -> pl.Expr:
    """NaN and ±inf become null, so means skip them (non-finite values are counted apart)."""
    e = as_f64(e)
    return pl.when(e.is_finite()).then(e)


def _by_step(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(pl.col("step").cast(pl.Int64)).sort("step")


def join_steps(frames: Sequence[pl.DataFrame | None]) -> pl.DataFrame:
    """One row per step of any frame (full join on ``step``, Int64, sorted); a column two frames
    have is taken from the first."""
    frames = [f for f in frames if f is not None and "step" in f.columns]
    if not frames:
        return pl.DataFrame(schema={"step": pl.Int64})
    out = _by_step(frames[0])
    for f in frames[1:]:
        f = _by_step(f)
        dup = [c for c in f.columns if c != "step" and c in out.columns]
        if dup:
            f = f.drop(dup)
        out = out.join(f, on="step", how="full", coalesce=True)
    return out.sort("step")
