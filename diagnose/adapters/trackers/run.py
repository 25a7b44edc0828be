"""`TrackerRun`: what one experiment tracker holds of a run, in the tracker's own metric names.

A tracker is where a trainer's per-step metrics (and sometimes its logged completions) live when
the trainer's own files do not hold them: a W&B run folder, TensorBoard event files, a console
log. Each reader (`diagnose.adapters.trackers.wandb`, ``.tensorboard``, ``.console``) returns one
`TrackerRun`; `diagnose.adapters.trackers.names` maps its names to the signal names the
detectors know.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from diagnose.source import SourceIssue

#: Tracker kinds, in the order their metrics are trusted when several hold the same step
#: (the trainer's own files come first of all: `diagnose.adapters.trackers.merge`).
KINDS: tuple[str, ...] = ("wandb", "tensorboard", "console")

#: How each kind is named in the report.
KIND_NAMES: dict[str, str] = {"wandb": "W&B run", "tensorboard": "TensorBoard events", "console": "console log"}


@dataclass
class LoggedTable:
    """A table a trainer logged to its tracker (W&B ``wandb.Table``) at one step: its rows as the
    tracker stored them (cells are JSON values: text, numbers, message lists)."""

    key: str  #: the logged key (``completions``, ``val/generations``, ``sample_completions``)
    step: int  #: the trainer's step of the history row that logged it
    path: Path
    columns: list[str]
    rows: list[list[Any]]
    #: rows the table had when logged (W&B keeps at most ``wandb.Table.MAX_ROWS`` in the file)
    logged_rows: int | None = None


@dataclass
class TrackerRun:
    """One run of one tracker. ``metrics``: one row per trainer step (``step``, Int64) and one
    Float64 column per numeric metric, under the tracker's own names (``train/reward``,
    ``actor/entropy``). ``step_from`` says which logged key was the step."""

    kind: str
    path: Path
    name: str
    metrics: pl.DataFrame
    step_from: str = ""
    #: other names ``--run`` may use (a W&B display name, a run folder)
    aliases: tuple[str, ...] = ()
    #: the trainer that wrote it, from its metric names (``trl``, ``verl``, ``open_instruct``)
    trainer: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    tables: list[LoggedTable] = field(default_factory=list)
    #: ``finished`` | ``failed`` (exit code != 0) | ``incomplete`` (ended mid-write: crashed or
    #: still running) | None (the tracker does not say)
    state: str | None = None
    exit_code: int | None = None
    issues: list[SourceIssue] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return self.metrics.height

    @property
    def title(self) -> str:
        """``W&B run 3xk9 (wandb/offline-run-...)``."""
        return f"{KIND_NAMES.get(self.kind, self.kind)} {self.name} ({self.path})"

    def table_keys(self) -> list[str]:
        return list(dict.fromkeys(t.key for t in self.tables))


def empty_metrics() -> pl.DataFrame:
    return pl.DataFrame(schema={"step": pl.Int64})
