"""From the folder the user gives to the trackers a run is read with (`load_run` calls these).

* `launch_layout`: the trainer layout and the tracker runs at a path: a launch folder (the trainer's
  output one or two folders down: TRL's ``output_dir``, verl's ``checkpoints/<project>/<experiment>``),
  an ``output_dir``, a tracker folder or a log file;
* `choose_trackers`: one run per tracker kind; several of a kind are never merged (``run`` picks
  one, else none of them is read and an issue lists them);
* `TrackerData`: what the chosen runs hold, in the trainer's own names, for the adapter's ``load``;
* `describe_sources`: the report's lines naming each source and what it lacks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from diagnose.adapters.trackers.discover import TrackerRef, find_trackers, is_tracker_path
from diagnose.adapters.trackers.merge import combined_metrics, describe, run_info, sparse_help
from diagnose.adapters.trackers.names import guess_trainer
from diagnose.adapters.trackers.run import KIND_NAMES, KINDS, LoggedTable, TrackerRun
from diagnose.source import SourceIssue

__all__ = ["Launch", "TrackerData", "choose_trackers", "describe_sources", "launch_layout", "read_trackers"]

#: folders of a launch folder that are never the trainer's output
_TRACKER_DIRS = {"wandb", "runs", "tensorboard_log", "mlruns", "logs", "swanlog"}
_MAX_DEPTH = 3
#: folders looked at below a launch folder (it may be a repository checkout with data and models)
_MAX_VISITS = 200
#: formats a trainer's output below a launch folder can have (a conversation dump is no trainer's)
_TRAINER_FORMATS = ("native", "trl", "open_instruct", "verl")


@dataclass
class Launch:
    """What a path holds: the trainer layout's folder or file (None: trackers only), its format,
    and the tracker runs found."""

    trainer: Path | None
    format: str | None
    trackers: list[TrackerRef]
    #: other folders holding a trainer layout (several outputs in one launch folder)
    others: list[Path] = field(default_factory=list)


def launch_layout(p: Path, detect: Callable[[Path], str | None]) -> Launch:
    """The trainer layout at ``p`` (``detect``: the adapters' format detection) and its trackers:
    ``p`` itself when it is a run or a tracker's own output, else a folder up to three levels down
    holding a trainer layout (tracker folders skipped); the trackers anywhere at ``p``."""
    fmt = detect(p)
    if fmt is not None or is_tracker_path(p):
        return Launch(p if fmt is not None else None, fmt, find_trackers(p))
    found: list[tuple[Path, str]] = []
    todo, visits = [(p, 0)], 0
    while todo and visits < _MAX_VISITS:
        d, depth = todo.pop(0)
        visits += 1
        try:
            subs = sorted(x for x in d.iterdir() if x.is_dir() and not x.name.startswith("."))
        except OSError:
            continue
        for s in subs:
            if s.name in _TRACKER_DIRS:
                continue
            f = detect(s)
            if f in _TRAINER_FORMATS:
                found.append((s, f))
            elif depth + 1 < _MAX_DEPTH:
                todo.append((s, depth + 1))
    trackers = find_trackers(p)
    if not found:
        return Launch(None, None, trackers)
    return Launch(found[0][0], found[0][1], trackers, [f for f, _ in found[1:]])


def choose_trackers(refs: Sequence[TrackerRef], run: str | None, where: Path
                    ) -> tuple[list[TrackerRef], list[SourceIssue], list[str]]:
    """At most one run per tracker kind. With several of a kind, ``run`` (a W&B run id or run
    folder; an events folder; a log file name) picks one and a note lists the others; without a
    match none is read and an issue lists them: runs are never merged, and never picked by a
    guess. Returns the chosen runs, the issues and the notes."""
    chosen: list[TrackerRef] = []
    issues: list[SourceIssue] = []
    notes: list[str] = []
    for kind in KINDS:
        refs_k = [r for r in refs if r.kind == kind]
        if len(refs_k) == 1:
            chosen += refs_k
        elif refs_k:
            hit = [r for r in refs_k if run is not None and r.answers_to(run)]
            if len(hit) == 1:
                chosen += hit
                others = ", ".join(r.name for r in refs_k if r is not hit[0])
                notes.append(f"{KIND_NAMES[kind]} {hit[0].name} read (--run); the other {KIND_NAMES[kind]}s here, "
                             f"not read: {others}")
            else:
                names = ", ".join(r.name for r in refs_k)
                issues.append(SourceIssue(str(where), None, f"{len(refs_k)} {KIND_NAMES[kind]}s here ({names}): none "
                                                            "is read (runs are never merged); choose one with --run NAME"))
    return chosen, issues, notes


@dataclass
class TrackerData:
    """What the chosen tracker runs hold, for a trainer adapter's ``load``: ``metrics`` in the
    trainer's own names (TRL: ``log_history``'s), one row per step; the logged tables."""

    runs: list[TrackerRun]
    trainer: str | None
    metrics: pl.DataFrame
    tables: list[LoggedTable]

    @property
    def files(self) -> list[Path]:
        return [f for r in self.runs for f in r.files]

    @property
    def issues(self) -> list[SourceIssue]:
        return [i for r in self.runs for i in r.issues]

    @property
    def notes(self) -> list[str]:
        return [n for r in self.runs for n in r.notes]

    def info(self) -> dict[str, Any]:
        return run_info(self.runs)


def read_trackers(refs: Sequence[TrackerRef], trainer: str | None = None) -> TrackerData | None:
    """Read the chosen runs; ``trainer``: the trainer layout's format (else guessed from the
    logged names and config)."""
    if not refs:
        return None
    runs = [r.read() for r in refs]
    if trainer not in ("trl", "verl", "open_instruct"):
        guesses = [r.trainer or guess_trainer(r.metrics.columns, r.config) for r in runs]
        trainer = next((g for g in guesses if g is not None), None)
    for r in runs:
        r.trainer = r.trainer or trainer
    return TrackerData(runs, trainer, combined_metrics(runs, trainer), [t for r in runs for t in r.tables])


def describe_sources(data: TrackerData | None, trainer_source: str | None, rollouts_from: str | None,
                     has_rollouts: bool) -> list[str]:
    """The report's lines: the trainer layout, then each tracker with what it lacks, then, for a
    run with metrics but no rollouts, which switch would have logged them."""
    lines = [trainer_source] if trainer_source else []
    if data is None:
        return lines
    lines += [describe(r, rollouts_from) for r in data.runs]
    if not has_rollouts:
        lines += sparse_help(data.trainer, data.runs)
    return lines
