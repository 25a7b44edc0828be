"""Tables a trainer logged to W&B, as what they are to the analyses.

* TRL ``completions`` (``GRPOTrainer.log``: ``wandb.Table(dataframe=pd.DataFrame(table))``, the same
  table it writes to ``completions_<step>.parquet``): training rollouts, read with the TRL
  adapter's own row reader; the trainer layout's parquet file wins for a step that has both.
* verl ``val/generations`` (``ValidationGenerationsLogger``: one row per validation,
  ``step, input_1, output_1, score_1, ...``) and open-instruct ``sample_completions``
  (``maybe_evaluate``: eval prompts and responses): validation samples, kept apart from the
  training signals and named in the notes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import polars as pl

from diagnose.adapters._common.issues import IssueLog
from diagnose.adapters._common.rollouts import json_scalar_column
from diagnose.adapters.trl.completions import FileRows, frame_rows
from diagnose.adapters._common.turns import TurnClassifier
from diagnose.adapters._common.values import as_step
from diagnose.adapters.trackers.run import LoggedTable

__all__ = ["trl_table_rows", "validation_note", "validation_rollouts", "validation_states_note"]

_CELLS = ("prompt", "completion")


def trl_table_rows(tables: Sequence[LoggedTable], skip_steps: set[int], issues: IssueLog,
                   classifier: TurnClassifier) -> list[FileRows]:
    """TRL's W&B ``completions`` tables as the TRL adapter's rows, for the steps in none of the
    trainer's parquet files (``skip_steps``). Of several tables logged at one step (an evaluation's,
    the summary log's after training) the last is kept, as the parquet file of that step is
    overwritten by each."""
    out: list[FileRows] = []
    last = {t.step: t for t in tables if t.key == "completions"}
    for t in last.values():
        if t.step in skip_steps:
            continue
        if "completion" not in t.columns:
            issues.add(t.path, None, f"W&B completions table without a 'completion' column (columns: {t.columns}); "
                                     "not read")
            continue
        cols = {c: [r[i] for r in t.rows] for i, c in enumerate(t.columns)}
        cols.setdefault("step", [t.step] * len(t.rows))  # a frame of no column has no rows
        df = pl.DataFrame([json_scalar_column(c, v) for c, v in cols.items() if c not in _CELLS])
        out.append(frame_rows(t.step, df, t.path, issues, classifier, {c: cols[c] for c in _CELLS if c in cols}))
    return out


def validation_note(tables: Sequence[LoggedTable]) -> str | None:
    """What validation samples the run logged, kept apart (None: none)."""
    verl = [t for t in tables if t.key == "val/generations"]
    oi = [t for t in tables if t.key == "sample_completions"]
    parts = []
    if verl:
        last = max(verl, key=lambda t: t.step)
        per = sum(c.startswith("output_") for c in last.columns)
        steps = [r[0] for r in last.rows] if last.columns and last.columns[0] == "step" else []
        parts.append(f"verl's W&B val/generations: {per} validation generations at each of {len(last.rows)} "
                     f"validation steps ({', '.join(map(str, steps[:8]))}{', ...' if len(steps) > 8 else ''})")
    if oi:
        parts.append(f"open-instruct's W&B sample_completions: eval samples at steps "
                     f"{', '.join(str(t.step) for t in oi[:8])}{', ...' if len(oi) > 8 else ''}")
    if not parts:
        return None
    return "; ".join(parts) + ": validation, kept apart from the training signals (not read as rollouts)"


def _verl_validation(tables: Sequence[LoggedTable]) -> list[tuple[int, str | None, str, Any]]:
    verl = [t for t in tables if t.key == "val/generations" and t.columns[:1] == ["step"]]
    if not verl:
        return []
    last = max(verl, key=lambda t: t.step)  # the table grows: its last log holds every validation
    idx = {c: i for i, c in enumerate(last.columns)}
    rows = []
    for r in last.rows:
        k = 1
        while f"output_{k}" in idx:
            out = r[idx[f"output_{k}"]]
            if isinstance(out, str):
                inp = r[idx[f"input_{k}"]] if f"input_{k}" in idx else None
                rows.append((as_step(r[0]) if as_step(r[0]) is not None else last.step,
                             inp if isinstance(inp, str) else None, out, r[idx[f"score_{k}"]] if f"score_{k}" in idx else None))
            k += 1
    return rows


def _oi_validation(tables: Sequence[LoggedTable]) -> list[tuple[int, str | None, str, Any]]:
    rows = []
    for t in tables:
        if t.key != "sample_completions" or "response" not in t.columns:
            continue
        idx = {c: i for i, c in enumerate(t.columns)}
        for r in t.rows:
            out = r[idx["response"]]
            if isinstance(out, str):
                rows.append((t.step, r[idx["prompt"]] if "prompt" in idx else None, out,
                             r[idx["scores"]] if "scores" in idx else None))
    return rows


def validation_rollouts(tables: Sequence[LoggedTable]) -> pl.DataFrame | None:
    """The validation samples a run logged to W&B as rollout rows with turn states (None: none):
    verl's ``val/generations`` (text decoded without special tokens, split at the agent loop's
    tool rounds, as verl's dumps are) and open-instruct's ``sample_completions`` (ChatML text)."""
    from diagnose.adapters._common.rollouts import rollouts_frame, turn_columns
    from diagnose.adapters._common.values import as_float
    from diagnose.adapters.verl.dumps import prompt_tool_names
    from diagnose.transcripts import Dialect

    frames = []
    for rows, verl in ((_verl_validation(tables), True), (_oi_validation(tables), False)):
        if not rows:
            continue
        cols: dict[str, Any] = {"step": [r[0] for r in rows], "prompt": [r[1] for r in rows],
                                "completion": [r[2] for r in rows], "reward": [as_float(r[3]) for r in rows]}
        seen: dict[int, int] = {}
        cols["sample_id"] = []
        for r in rows:  # numbered within each validation step
            cols["sample_id"].append(seen.get(r[0], 0))
            seen[r[0]] = cols["sample_id"][-1] + 1
        cols["group_id"] = cols["sample_id"]
        if verl:
            cols.update(turn_columns(TurnClassifier(dialect=Dialect.VERL), cols["completion"],
                                     [prompt_tool_names(r[1]) for r in rows]))
        else:
            cols.update(turn_columns(TurnClassifier(), cols["completion"]))
        frames.append(rollouts_frame(cols))
    return pl.concat(frames, how="diagonal_relaxed").sort("step", "sample_id") if frames else None


def validation_states_note(df: pl.DataFrame) -> str:
    """Per validation step: how many samples had a collapsed turn (``3/4``)."""
    per = df.group_by("step").agg(pl.len().alias("n"), pl.col("turn_states").list.contains("collapsed").sum()
                                  .alias("c")).sort("step")
    parts = [f"step {s}: {c}/{n}" for s, n, c in per.iter_rows()]
    return ("validation samples with a collapsed turn (from the W&B validation tables, kept apart): "
            + ", ".join(parts[:12]) + (", ..." if len(parts) > 12 else ""))
