"""Representative rollouts of a collapse episode: on-policy rollouts of the last logged step
before the onset and of the first logged step from the trough (`RolloutExample`). Before: the
healthiest first (no collapsed turn, highest reward); at the trough: the most collapsed first
(a collapsed turn, lowest reward); ties by sample id."""

from __future__ import annotations

import polars as pl

from diagnose.scan.detect import DetectConfig
from diagnose.scan.result import RolloutExample
from diagnose.source import on_policy

__all__ = ["example_rollouts"]

_COLUMNS = ("step", "sample_id", "group_id", "reward", "turn_states", "completion")


def example_rollouts(rollouts: pl.LazyFrame | None, before_lt: int, after_step: int,
                     cfg: DetectConfig) -> tuple[list[RolloutExample], list[RolloutExample]]:
    """Up to ``n_examples`` rollouts of the last step before ``before_lt`` and of the first step
    at or after ``after_step`` (failing that, at or after ``before_lt``); their text cut to
    ``excerpt_chars``."""
    if rollouts is None or cfg.n_examples <= 0:
        return [], []
    schema = rollouts.collect_schema()
    if "step" not in schema or "sample_id" not in schema:
        return [], []
    steps = rollouts.select(pl.col("step").unique()).collect(engine="streaming").get_column("step").sort()
    before_steps = steps.filter(steps < before_lt)
    after_steps = steps.filter(steps >= after_step)
    if not len(after_steps):
        after_steps = steps.filter(steps >= before_lt)
    before = int(before_steps[-1]) if len(before_steps) else None
    after = int(after_steps[0]) if len(after_steps) else None
    pick = [s for s in (before, after) if s is not None]
    if not pick:
        return [], []
    df = (rollouts.filter(pl.col("step").is_in(pick) & on_policy(schema.names()))
          .select([c for c in _COLUMNS if c in schema]).collect())
    collapsed = (pl.col("turn_states").list.eval(pl.element() == "collapsed").list.any().fill_null(False)
                 if "turn_states" in df.columns else pl.lit(False))
    reward = pl.col("reward").fill_nan(None) if "reward" in df.columns else pl.lit(None, pl.Float64)
    df = df.with_columns(collapsed.alias("_collapsed"), reward.alias("_reward"))
    return _ranked(df, before, cfg, most_collapsed=False), _ranked(df, after, cfg, most_collapsed=True)


def _ranked(df: pl.DataFrame, step: int | None, cfg: DetectConfig, most_collapsed: bool) -> list[RolloutExample]:
    """The step's rollouts, the healthiest (or the most collapsed) first, ties by sample id."""
    if step is None:
        return []
    order = df.filter(pl.col("step") == step).sort(["_collapsed", "_reward", "sample_id"], nulls_last=True,
                                                   descending=[most_collapsed, not most_collapsed, False])
    return _examples(order, cfg)


def _examples(frame: pl.DataFrame, cfg: DetectConfig) -> list[RolloutExample]:
    out = []
    for r in frame.head(cfg.n_examples).iter_rows(named=True):
        text = r.get("completion")
        out.append(RolloutExample(int(r["step"]), int(r["sample_id"]), r.get("group_id"), r.get("reward"),
                                  r.get("turn_states"), text[: cfg.excerpt_chars] if isinstance(text, str) else None))
    return out
