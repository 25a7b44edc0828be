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

import polars as pl

from diagnose.adapters._issues import IssueLog
from diagnose.adapters._rollouts import json_scalar_column
from diagnose.adapters._trl_completions import FileRows, frame_rows
from diagnose.adapters._turns import TurnClassifier
from diagnose.adapters.trackers.run import LoggedTable

__all__ = ["trl_table_rows", "validation_note"]

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
