"""verl's trainer metrics: the file logger (``verl/utils/tracking.py`` ``FileLogger``), ``{"step": N,
"data": {...}}`` orjson lines (NaN and +-inf become ``null``), mapped to our names, merged with the
metrics derived from the dumps, and what a restart did to the file (opened ``"wb"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from diagnose.adapters._common.issues import IssueLog
from diagnose.adapters._common.metrics import map_names, metrics_frame, non_numeric_metric_issues, nonfinite_metric_issues
from diagnose.adapters._common.values import as_step
from diagnose.jsonl import LineError, iter_jsonl

#: verl metric name -> our name (originals are kept as well; the first present source wins).
NAME_MAP: dict[str, str] = {
    "actor/entropy": "entropy",
    "actor/pg_clipfrac": "clip_ratio",
    "actor/kl_loss": "kl",  # KL to the reference policy (use_kl_loss)
    "actor/reward_kl_penalty": "kl",  # ... or the in-reward KL penalty (use_kl_in_reward)
    "actor/grad_norm": "grad_norm",
    "actor/lr": "lr",
    "response_length/mean": "completions/mean_length",
    "response_length/max": "completions/max_length",
    "response_length/min": "completions/min_length",
    "response_length/clip_ratio": "completions/clipped_ratio",
    "critic/score/mean": "reward",
    "tool_call_counts/mean": "tool_calls_per_episode",
    "training/rollout_probs_diff_mean": "mismatch/abs_prob_diff",
}


def read_metrics(files: list[Path], issues: IssueLog) -> pl.DataFrame | None:
    """The file logger's lines by step (several lines of a step merged, later wins). A ``null``
    value is read as NaN: the logger writes NaN and ±inf as null (orjson), and verl's metrics
    are numbers, so a null is a lost non-finite value."""
    if not files:
        return None
    records: dict[int, dict[str, Any]] = {}
    from_null: set[str] = set()
    for f in files:
        nulls: dict[str, list[int]] = {}
        for line_no, obj in iter_jsonl(f):
            if isinstance(obj, LineError):
                issues.line_error(obj)
                continue
            step = as_step(obj.get("step"))
            data = obj.get("data")
            if step is None or not isinstance(data, dict):
                why = (f"invalid 'step' ({repr(obj.get('step'))[:60]}; expected an integer 0..2^63-1)" if step is None
                       else f"'data' is {type(data).__name__}, not an object")
                issues.add(f, line_no, "not a {\"step\": N, \"data\": {...}} metrics line: " + why + "; line skipped")
                continue
            rec = records.setdefault(step, {})
            for k, v in data.items():
                if v is None:
                    nulls.setdefault(str(k), []).append(line_no)
                    v = float("nan")
                rec[str(k)] = v
        from_null.update(nulls)
        for k, lines in nulls.items():
            issues.add(f, lines[0], f"metric {k!r} is null on {len(lines)} line(s): verl's file logger (orjson) "
                                    "writes NaN and +-inf as null; read as NaN")
    df = metrics_frame(records)
    non_numeric_metric_issues(records, ", ".join(str(f) for f in files), issues)
    # NaN/inf written as such (not by orjson): one issue per metric; nulls were reported above
    nonfinite_metric_issues(df.select([c for c in df.columns if c not in from_null]),
                            ", ".join(str(f) for f in files), issues)
    return verl_names(df)


def verl_names(df: pl.DataFrame) -> pl.DataFrame:
    """verl's metric names with the names the detectors know added (`NAME_MAP`; not the
    response lengths, which `map_lengths` maps once the dumps say whether they count tool rounds):
    the file logger's and the trackers' (``Tracking`` logs the same keys to every backend)."""
    return map_names(df, {k: v for k, v in NAME_MAP.items() if k not in _GENERATED_LENGTH})


#: verl's response_length/* are the response's attention mask (``metric_utils.py``
#: ``_compute_response_info``), tool-response tokens included: the generated length only when
#: there are no tool or interaction rounds.
_GENERATED_LENGTH = ("response_length/mean", "response_length/max", "response_length/min")
_LENGTH_NOTE = ("response_length/* count every response token, the tool responses and role headers the agent loop "
                "inserts included (verl takes them from the attention mask): in this multi-turn run they are not "
                "the generated length and are not mapped to completions/*_length (response_length/clip_ratio, the "
                "share cut at rollout.response_length, is completions/clipped_ratio)")


def _multi_turn(df: pl.DataFrame, rollouts: pl.DataFrame) -> bool:
    """Whether a run had tool or interaction rounds: ``num_turns`` (user + assistant turns + 1,
    ``ToolAgentLoop.run``) above 2 at some step, or a dumped response of several turns."""
    for c in ("num_turns/max", "val-aux/num_turns/max"):
        if c in df.columns and (df.get_column(c).fill_nan(None).drop_nulls() > 2).any():
            return True
    return rollouts.height > 0 and "turn_states" in rollouts.columns and \
        bool((rollouts.get_column("turn_states").list.len() > 1).any())


def map_lengths(df: pl.DataFrame, rollouts: pl.DataFrame, notes: list[str]) -> pl.DataFrame:
    if _multi_turn(df, rollouts):
        if any(c in df.columns for c in _GENERATED_LENGTH):
            notes.append(_LENGTH_NOTE)
        return df
    return map_names(df, {k: NAME_MAP[k] for k in _GENERATED_LENGTH})


def merge_derived(primary: pl.DataFrame, derived: pl.DataFrame) -> pl.DataFrame:
    """Trainer metrics, with the rollout-derived ones added; where both have a name, the
    trainer's value wins and the derived one fills the steps the trainer has none for (a
    metrics file truncated on resume)."""
    if derived.height == 0 or derived.width <= 1:
        return primary
    if primary.height == 0:
        return derived
    both = [c for c in derived.columns if c != "step" and c in primary.columns]
    out = primary.join(derived, on="step", how="full", coalesce=True, suffix="__derived")
    return out.with_columns([pl.coalesce(c, f"{c}__derived").alias(c) for c in both]).drop(
        [f"{c}__derived" for c in both]).sort("step")


def training_steps(metrics: pl.DataFrame) -> list[int]:
    """Steps with training metrics (a validation-only line, e.g. step 0, has only val-* keys)."""
    train = [c for c in metrics.columns if c != "step" and not c.startswith("val-")]
    if not train:
        return []
    return metrics.filter(pl.any_horizontal(pl.col(train).is_not_null())).get_column("step").to_list()


def resume_check(metrics: pl.DataFrame, dump_steps: list[int], mfile: Path, issues: IssueLog) -> None:
    steps = training_steps(metrics)
    if not steps or not dump_steps:
        return
    first = min(steps)
    lost = [s for s in dump_steps if s < first]
    if first > 1 and lost:
        issues.add(mfile, None, f"trainer metrics start at step {first}, but rollout dumps go back to step "
                                f"{min(lost)}: verl opens this file with 'wb', so the restart (resume) truncated it and "
                                f"the trainer metrics of {len(lost)} step(s) are lost; rewards and turn states of those "
                                "steps come from the dumps")
