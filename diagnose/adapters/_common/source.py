"""The `RunSource` an adapter returns (`make_source`) and the file fingerprint it carries for
the scan cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import polars as pl

from diagnose.adapters._common.issues import IssueLog
from diagnose.source import RunSource
from diagnose.transcripts import Dialect


def fingerprint(fmt: str, root: Path, files: Iterable[Path]) -> dict[str, Any]:
    """``{"format", "path", "files": {relative path: [size, mtime_ns]}}`` for the scan cache."""
    out: dict[str, list[int]] = {}
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        try:
            rel = str(f.relative_to(root)) if root.is_dir() else f.name
        except ValueError:
            rel = str(f)
        out[rel] = [st.st_size, st.st_mtime_ns]
    return {"format": fmt, "path": str(root), "files": dict(sorted(out.items()))}


def make_source(
    path: Path,
    fmt: str,
    *,
    metrics: pl.DataFrame,
    rollouts: pl.DataFrame | None,
    tokens: pl.LazyFrame | None = None,
    probe: pl.LazyFrame | None = None,
    control_tokens: list[dict[str, Any]] | None = None,
    issues: IssueLog,
    notes: list[str],
    files: Iterable[Path],
    dialect: Dialect = Dialect.CHATML,
) -> RunSource:
    return RunSource(
        path=path,
        format=fmt,
        metrics=metrics.lazy(),
        rollouts=None if rollouts is None else rollouts.lazy(),
        tokens=tokens,
        probe=probe,
        control_tokens=list(control_tokens or []),
        issues=issues.finish(),
        notes=list(notes),
        dialect=dialect,
        _fingerprint=fingerprint(fmt, path, files),
    )
