"""Tracker runs merged with a run's trainer layout, on the trainer's own step.

The trainer layout gives the rollouts (and whatever metrics its own files hold); the trackers give
the per-step metrics the trainer's files lack. Where several hold a value for one step and name,
the trainer's own file wins, then W&B, TensorBoard, the console (`KINDS` order). Each source is
described with what it lacks, and a run that has metrics but no rollouts is told which switch
would have logged them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import polars as pl

from diagnose.adapters.trackers.names import trainer_names
from diagnose.adapters.trackers.run import KINDS, TrackerRun

__all__ = ["combined_metrics", "describe", "fill_metrics", "run_info", "sparse_help", "validation_samples"]

#: config keys of the report header, per trainer: the first present wins (dotted: nested)
_INFO_KEYS: dict[str, tuple[str, ...]] = {
    "model": ("_name_or_path", "model_name_or_path", "actor_rollout_ref.model.path", "model.path", "model"),
    "lr": ("learning_rate", "actor_rollout_ref.actor.optim.lr", "lr"),
    "seed": ("seed", "data.seed", "actor_rollout_ref.rollout.seed"),
}


def fill_metrics(primary: pl.DataFrame, secondary: pl.DataFrame) -> pl.DataFrame:
    """``primary`` with the steps and values of ``secondary`` it lacks: a value ``primary`` has
    (NaN included) is kept; a null or a missing step / column is filled from ``secondary``."""
    if secondary.height == 0 or secondary.width <= 1:
        return primary
    if primary.height == 0 and primary.width <= 1:
        return secondary
    both = [c for c in secondary.columns if c != "step" and c in primary.columns]
    sec = secondary.with_columns(pl.col("step").cast(primary.schema["step"]))
    sec = sec.with_columns([pl.col(c).cast(primary.schema[c], strict=False) for c in both])
    out = primary.join(sec, on="step", how="full", coalesce=True, suffix="__tracker")
    return out.with_columns([pl.coalesce(c, f"{c}__tracker").alias(c) for c in both]).drop(
        [f"{c}__tracker" for c in both]).sort("step")


def combined_metrics(runs: Sequence[TrackerRun], trainer: str | None) -> pl.DataFrame:
    """The trackers' metrics in the trainer's own names (TRL: ``log_history``'s), one row per
    step, the first tracker in `KINDS` order winning where several hold a value."""
    out: pl.DataFrame | None = None
    for r in sorted(runs, key=lambda r: KINDS.index(r.kind)):
        df = trainer_names(r.metrics, trainer)
        out = df if out is None else fill_metrics(out, df)
    return out if out is not None else pl.DataFrame(schema={"step": pl.Int64})


def _get(config: dict[str, Any], dotted: str) -> Any:
    cur: Any = config
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def run_info(runs: Sequence[TrackerRun]) -> dict[str, Any]:
    """Model name, learning rate and seed from the trackers' configs (W&B), for the report header."""
    out: dict[str, Any] = {}
    for r in runs:
        for what, keys in _INFO_KEYS.items():
            if what in out:
                continue
            for k in keys:
                v = _get(r.config, k)
                if isinstance(v, (str, int, float)) and not isinstance(v, bool) and v != "":
                    out[what] = v
                    break
    return out


def _span(r: TrackerRun) -> str:
    if r.metrics.height == 0:
        return "no steps"
    steps = r.metrics.get_column("step")
    return f"steps {steps.min()}..{steps.max()} ({r.metrics.height}), {r.metrics.width - 1} metrics"


def describe(r: TrackerRun, rollouts_from: str | None) -> str:
    """One line naming the source and what it lacks. ``rollouts_from``: where the run's rollouts
    come from (None: nowhere)."""
    have = [_span(r)]
    if r.config:
        have.append("config")
    keys = r.table_keys()
    if keys:
        have.append("tables " + ", ".join(f"{k} ({sum(t.key == k for t in r.tables)})" for k in keys))
    lacks = []
    if r.kind != "wandb":
        lacks.append("config")
    if not any(k in ("completions",) for k in keys) and rollouts_from is None:
        lacks.append("rollouts")
    if r.kind == "console" and r.trainer == "trl":
        lacks.append("full precision (transformers prints 4 significant digits)")
    if r.state == "failed":
        lacks.append(f"the steps after it failed (exit code {r.exit_code})")
    elif r.state == "incomplete":
        lacks.append("the steps after its last complete record")
    lacks.append("token log-probs and control-token probabilities (no tracker logs them)")
    state = f"; {r.state}" if r.state else ""
    return f"{r.title}{state}: {', '.join(have)}; lacks {', '.join(lacks)}"


def validation_samples(r: TrackerRun) -> int:
    """Validation generations a run logged: verl's ``val/generations`` table grows by one row per
    validation, ``N`` samples per row (``ValidationGenerationsLogger``: the last one holds them all);
    open-instruct's ``sample_completions`` is one table per evaluation."""
    n = 0
    verl = [t for t in r.tables if t.key == "val/generations"]
    if verl:
        last = max(verl, key=lambda t: t.step)
        n += len(last.rows) * sum(c.startswith("output_") for c in last.columns)
    return n + sum(len(t.rows) for t in r.tables if t.key == "sample_completions")


def sparse_help(trainer: str | None, runs: Sequence[TrackerRun]) -> list[str]:
    """What would have logged rollouts, for a run with metrics but none: the switch per trainer,
    and what ``diagnose rescore`` can (not) recover."""
    val = sum(validation_samples(r) for r in runs)
    rescore = ("`diagnose rescore` cannot recover them: it re-scores a run's logged completions through its "
               "checkpoints, and this run logged none")
    if trainer == "trl":
        return ["no rollouts: TRL logs completions only with GRPOConfig(log_completions=True) (default False), to "
                "<output_dir>/completions/completions_<step>.parquet and, with report_to='wandb', a W&B 'completions' "
                "table; with tools= and report_to='wandb', TRL 1.16 + wandb 0.31 crash at the first log "
                "(wandb.Table: 'Data row contained incompatible types'), but the parquet file is written first, so "
                "log_completions=True with report_to without 'wandb' keeps them; " + rescore]
    if trainer == "verl":
        text = ("no rollouts: verl dumps them only with trainer.rollout_data_dir=DIR (default null: <step>.jsonl per "
                "step); trainer.log_val_generations=N (default 0) logs N validation generations per test_freq step "
                "to W&B (val/generations)")
        if val:
            text += f"; this run logged {val} such validation generations, kept apart from the training signals"
        return [text + "; " + rescore]
    if trainer == "open_instruct":
        return ["no rollouts: open-instruct saves them only with --save_traces (rollouts_save_path: "
                "<run_name>_rollouts_<shard>.jsonl, token ids and sampled-token log-probs; scan them with "
                "--tokenizer); its W&B sample_completions table holds eval samples only, kept apart; " + rescore]
    return []
