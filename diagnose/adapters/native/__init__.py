"""Our own run directory (format v1, docs/run-format.md) as a `RunSource`, via `RunReader`.

Everything is already in our names: metrics come from ``metrics.jsonl``, the step tables are
the reader's lazy scans (corrupt step files are reported by the reader and skipped).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import polars as pl

from diagnose.adapters._common.hooks import run_alias, runs  # one run per path: the default hooks
from diagnose.adapters._common.io import subdirs, visible_files
from diagnose.adapters._common.issues import IssueLog
from diagnose.adapters._common.source import make_source
from diagnose.rundir.reader import RunReader
from diagnose.rundir.schema import KINDS, METRICS_JSONL, RUN_JSON, RunFormatError, rollouts_schema
from diagnose.source import RunSource

__all__ = ["FORMAT", "OPTIONS", "detect", "has_candidates", "load", "run_alias", "runs", "step_of_file"]

FORMAT = "native"
#: `load_run` options `load` takes (the reader's validated files, from the scan cache)
OPTIONS = ("file_checks",)
_STEP_FILE = re.compile(r"^(rollouts|tokens|probe)/step-(\d+)\.parquet$")


def _root(p: Path) -> Path:
    return p.parent if p.is_file() else p


def detect(p: Path) -> bool:
    if p.is_file():
        return p.name == RUN_JSON
    return (p / RUN_JSON).is_file()


def has_candidates(p: Path) -> bool:
    root = _root(p)
    return (root / METRICS_JSONL).is_file() or any((root / k).is_dir() for k in KINDS)


def step_of_file(rel: str, single_file: bool) -> int | str:
    """For the scan cache: the step of a ``rollouts|tokens|probe/step-NNNNNN.parquet`` file,
    ``"metrics"`` for ``metrics.jsonl`` (only the metrics layer depends on it), else
    ``"global"`` (``run.json``: any step may depend on it)."""
    m = _STEP_FILE.match(rel)
    if m:
        return int(m.group(2))
    return "metrics" if rel == METRICS_JSONL else "global"


def _files(root: Path) -> list[Path]:
    files = [f for f in (root / RUN_JSON, root / METRICS_JSONL) if f.is_file()]
    for d in subdirs(root):
        if d.name in KINDS:
            files.extend(visible_files(d))
    return files


def load(p: Path, *, file_checks: Any = None) -> RunSource:
    """``file_checks``: `RunReader.file_checks` of an earlier load (see `load_run`)."""
    root = _root(p)
    issues = IssueLog()
    notes: list[str] = []
    try:
        reader = RunReader(root, file_checks=file_checks)
    except RunFormatError as e:
        if "newer than this reader supports" in str(e):
            raise
        msg = str(e)
        issues.add(root, None, msg[len(f"{root}: "):] if msg.startswith(f"{root}: ") else msg)
        return make_source(root, FORMAT, metrics=pl.DataFrame(schema={"step": pl.Int64}),
                           rollouts=pl.DataFrame(schema=rollouts_schema()), issues=issues,
                           notes=["nothing readable in this run directory"], files=_files(root))
    metrics = reader.metrics()
    rollouts = reader.rollouts()
    tokens = reader.tokens() if reader.steps("tokens") else None
    probe = reader.probe() if reader.steps("probe") else None
    control_tokens = reader.control_tokens
    for i in reader.issues:
        issues.add(i.path, i.line, i.message, i.kind)
    if tokens is None:
        notes.append("no readable tokens/ step files: no token probabilities, entropies or control-token log-probs")
    if probe is None:
        notes.append("no readable probe/ step files: no fixed control-token probe")
    if not control_tokens:
        notes.append("run.json lists no control tokens: no lp_ctrl_<name> columns")
    src = make_source(root, FORMAT, metrics=metrics, rollouts=None, tokens=tokens, probe=probe,
                      control_tokens=control_tokens, issues=issues, notes=notes, files=_files(root))
    src.rollouts = rollouts
    src.file_checks = reader.file_checks()
    src.scan_steps = reader.scan
    return src
