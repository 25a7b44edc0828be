"""Per-step metrics of open-instruct traces (trainer metrics go to wandb only, ``grpo_fast.py``),
and what the saved groups say about open-instruct's filtering."""

from __future__ import annotations

import polars as pl

from diagnose.adapters._metrics import derived_metrics, merge_metrics

__all__ = ["filtered_groups_note", "trace_metrics"]


def _group_table(rollouts: pl.DataFrame) -> pl.DataFrame:
    """Per step and group: size and whether its rewards all agree."""
    return rollouts.group_by("step", "group_id").agg(
        pl.len().alias("n"), (pl.col("reward").max() - pl.col("reward").min()).fill_null(0.0).alias("spread"))


def filtered_groups_note(rollouts: pl.DataFrame, notes: list[str]) -> None:
    """``data_loader.py``: ``filter_zero_std_samples`` (default True) drops every group whose
    rewards are all equal in ``process_group``, before ``_save_rollouts``; a step whose groups
    are all dropped is sampled again, not saved. Traces in which no group of several samples
    has equal rewards were most likely written so."""
    g = _group_table(rollouts).filter(pl.col("n") > 1)
    if g.height >= 8 and (g["spread"] > 0).all():
        notes.append("every saved group has rewards that differ: open-instruct drops groups whose rewards are all "
                     "equal before saving them (filter_zero_std_samples, on by default), so all-fail and all-pass "
                     "groups are missing; reward, frac_reward_zero_std (0) and turn states describe the kept groups "
                     "only; batch/filtered_prompts_pct estimates the share dropped (1 - groups saved / the most "
                     "saved at any step; 0 throughout with active_sampling, which refills the batch)")


def trace_metrics(rollouts: pl.DataFrame) -> pl.DataFrame:
    """Derived metrics plus tool use from ``request_info`` (TRL's names: calls per rollout, failed
    share of calls), the timeout share, the share cut at the length limit and the generated
    length (tool-output tokens not counted)."""
    base = derived_metrics(rollouts)
    calls = pl.col("num_calls").cast(pl.Float64)
    extra = rollouts.group_by("step").agg(
        calls.mean().alias("tools/call_frequency"),
        pl.when(calls.sum() > 0).then(pl.col("n_failed_calls").cast(pl.Float64).sum() / calls.sum())
        .alias("tools/failure_frequency"),
        pl.col("timeouts").cast(pl.Float64).mean().alias("tools/timeout_frequency"),
        (pl.col("finish_reason") == "length").cast(pl.Float64).mean().alias("completions/clipped_ratio"),
        pl.col("n_tokens").cast(pl.Float64).mean().alias("completions/mean_length"),
    ).sort("step")
    groups = _group_table(rollouts).group_by("step").agg(pl.len().alias("_g"))
    most = groups["_g"].max() if groups.height else None
    if most:
        extra = extra.join(groups.select("step", (1.0 - pl.col("_g") / most).alias("batch/filtered_prompts_pct")),
                           on="step", how="left")
    return merge_metrics(base, extra)
