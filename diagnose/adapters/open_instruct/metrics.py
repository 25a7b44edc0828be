"""Per-step metrics of open-instruct traces (trainer metrics go to wandb only, ``grpo_fast.py``),
and what the saved groups say about open-instruct's filtering."""

from __future__ import annotations

import polars as pl

from diagnose.adapters._common.metrics import derived_metrics, merge_metrics

__all__ = ["filtered_groups_note", "trace_metrics"]


def _group_table(rollouts: pl.DataFrame) -> pl.DataFrame:
    """Per step and group: size and whether its rewards all agree."""
    return rollouts.group_by("step", "group_id").agg(
        pl.len().alias("n"), (pl.col("reward").max() - pl.col("reward").min()).fill_null(0.0).alias("spread"))


def filtered_groups_note(rollouts: pl.DataFrame, notes: list[str]) -> None:
    """``data_loader.py``: ``filter_zero_std_samples`` (default True) drops every group whose
    rewards are all equal in ``process_group``, before ``_save_rollouts``; a step whose groups
    are all dropped is sampled again (open-instruct before 2026-05-07 skipped it: a gap). Traces
    in which no group of several samples has equal rewards were most likely written so."""
    if looks_filtered(rollouts):
        notes.append("every saved group has rewards that differ: open-instruct drops groups whose rewards are all "
                     "equal before saving them (filter_zero_std_samples, on by default), so all-fail and all-pass "
                     "groups are missing; reward, frac_reward_zero_std (0) and turn states describe the kept groups "
                     "only; batch/filtered_prompts_pct estimates the share dropped (1 - groups saved / the most "
                     "saved at any step; 0 throughout with active_sampling, which refills the batch)")
    gaps = missing_steps(rollouts) if looks_filtered(rollouts) else []
    if gaps:
        notes.append(f"step(s) {gaps[:8]}{'...' if len(gaps) > 8 else ''} have no traces: open-instruct before "
                     "9c98253 (2026-05-07) moved on to the next step when every group of a step was filtered out, "
                     "saving nothing (later versions sample the step again); batch/filtered_prompts_pct is 1 there")


def looks_filtered(rollouts: pl.DataFrame) -> bool:
    """No saved group of several samples (8 at least) has equal rewards."""
    g = _group_table(rollouts).filter(pl.col("n") > 1)
    return g.height >= 8 and bool((g["spread"] > 0).all())


def missing_steps(rollouts: pl.DataFrame) -> list[int]:
    """Steps between the first and last traced one that have no traces."""
    steps = rollouts.get_column("step").unique().sort().to_list() if rollouts.height else []
    return sorted(set(range(steps[0], steps[-1] + 1)) - set(steps)) if steps else []


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
        gaps = missing_steps(rollouts) if looks_filtered(rollouts) else []
        if gaps:  # a step whose groups were all filtered (open-instruct before 2026-05-07)
            extra = pl.concat([extra, pl.DataFrame({"step": gaps, "batch/filtered_prompts_pct": [1.0] * len(gaps)},
                                                   schema_overrides={"step": extra.schema["step"]})],
                              how="diagonal_relaxed").sort("step")
    return merge_metrics(base, extra)
