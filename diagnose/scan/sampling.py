"""Confidence intervals of the turn-state shares when turn states come from a sample of the
rollouts (``diagnose scan --sample N``, `diagnose.turn_batch.sampling`).

A step's share of turns in a state is a ratio estimate, ``p = sum(a_i) / sum(m_i)`` over the
sampled rollouts (``a_i`` turns of rollout ``i`` in the state, ``m_i`` its turns): turns of one
rollout are not independent, so the variance is taken over rollouts (the linearised ratio
estimator of a simple random sample without replacement, Cochran 1977, 6.3):
``var(p) = (1 - n/N) / (n (n - 1) m̄²) · sum((a_i - p m_i)²)``. The 95 % half-width
``1.96 sqrt(var(p))`` is the ``turn_state/<state>/ci95`` signal; 0 when every rollout of the step
was classified, null when fewer than two were.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import polars as pl

from diagnose.turns import TurnState

__all__ = ["CI_SUFFIX", "Z95", "sample_note", "turn_state_ci"]

Z95 = 1.959963984540054
CI_SUFFIX = "/ci95"


def turn_state_ci(rollouts: pl.LazyFrame) -> pl.DataFrame | None:
    """``step`` and ``turn_state/<state>/ci95`` per step, or None when no step was sampled (at
    every step all rollouts, or none, have turn states): exact shares need no interval."""
    ts = pl.col("turn_states")
    counts = rollouts.group_by("step").agg(pl.len().alias("N"), ts.is_not_null().sum().alias("n")) \
        .filter((pl.col("n") > 0) & (pl.col("n") < pl.col("N"))).collect(engine="streaming")
    if counts.height == 0:
        return None
    m = ts.list.len().cast(pl.Float64)
    aggs = [pl.len().cast(pl.Float64).alias("N"), ts.is_not_null().sum().cast(pl.Float64).alias("n"),
            m.sum().alias("sm"), (m * m).sum().alias("smm")]
    for s in TurnState:
        a = ts.list.eval(pl.element() == s.value).list.sum().cast(pl.Float64)
        aggs += [a.sum().alias(f"sa:{s.value}"), (a * a).sum().alias(f"saa:{s.value}"),
                 (a * m).sum().alias(f"sam:{s.value}")]
    per = rollouts.group_by("step").agg(aggs).collect(engine="streaming")
    n, mbar = pl.col("n"), pl.col("sm") / pl.col("n")
    cols = []
    for s in TurnState:
        p = pl.col(f"sa:{s.value}") / pl.col("sm")
        ss = pl.col(f"saa:{s.value}") - 2 * p * pl.col(f"sam:{s.value}") + p * p * pl.col("smm")
        var = (1 - n / pl.col("N")) * ss.clip(lower_bound=0) / (n * (n - 1) * mbar * mbar)
        cols.append(pl.when((n >= 2) & (pl.col("sm") > 0)).then(Z95 * var.sqrt()).alias(f"turn_state/{s.value}{CI_SUFFIX}"))
    return per.select(pl.col("step").cast(pl.Int64), *cols).sort("step")


def sample_note(signals: pl.DataFrame, sample: tuple[int, int], episodes: Sequence[Any] = ()) -> str:
    """The report's line on a sampled scan: each turn-state share with its 95 % interval, at the
    first episode's trough (else the last step with an interval)."""
    n, seed = sample
    head = f"turn states classified on a random sample of {n} rollout(s) per step (seed {seed}), not all"
    cols = [f"turn_state/{s.value}{CI_SUFFIX}" for s in TurnState]
    if not all(c in signals.columns for c in cols):
        return head + ": no turn states were classified by the scan (this layout stores them, or has none), so the " \
                      "sample changed nothing"
    have = signals.filter(pl.col(cols[0]).is_not_null())
    if have.height == 0:
        return head + ": no step had two or more sampled rollouts (no intervals)"
    step = episodes[0].trough_step if episodes and episodes[0].trough_step in have.get_column("step").to_list() \
        else have.get_column("step").max()
    row = have.filter(pl.col("step") == step).row(0, named=True)
    shares = ", ".join(f"{s.value} {row.get(f'turn_state/{s.value}', float('nan')):.3f} ± {row[c]:.3f}"
                       for s, c in zip(TurnState, cols))
    return (f"{head}: turn-state shares are estimates, with 95% confidence half-widths in the signals "
            f"turn_state/<state>/ci95; at step {step}: {shares}")
