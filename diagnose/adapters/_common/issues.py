"""Issue bookkeeping of one load: `IssueLog` (deduplicated, capped per file) and
`NonFinite` (one issue per file and field holding NaN/inf).
"""

from __future__ import annotations

import math
import os
from typing import Any

from diagnose.jsonl import LineError
from diagnose.source import STEP_MISMATCH, SourceIssue, step_mismatch_message


class IssueLog:
    """Issues of one load, without duplicates, in the order found. At most ``per_file`` issues
    are kept per file (a binary file has a bad "line" every few hundred bytes); the rest are
    counted and summarised in one issue by `finish`."""

    def __init__(self, per_file: int = 10) -> None:
        self.items: list[SourceIssue] = []
        self.per_file = per_file
        self._seen: set[tuple[str, int | None, str]] = set()
        self._count: dict[str, int] = {}
        self._dropped: dict[str, int] = {}

    def add(self, path: str | os.PathLike[str], line: int | None, message: str, kind: str | None = None) -> None:
        key = (str(path), line or None, message)
        if key in self._seen:
            return
        self._seen.add(key)
        n = self._count.get(key[0], 0)
        if n >= self.per_file:
            self._dropped[key[0]] = self._dropped.get(key[0], 0) + 1
            return
        self._count[key[0]] = n + 1
        self.items.append(SourceIssue(key[0], key[1], message, kind))

    def step_mismatch(self, path: str | os.PathLike[str], what: str, steps: Any, file_step: int,
                      authority: str) -> None:
        """A step file whose rows name other steps than its file name (`STEP_MISMATCH`, which
        makes the scan cache recompute every step)."""
        self.add(path, None, step_mismatch_message(what, steps, file_step, authority), kind=STEP_MISMATCH)

    def line_error(self, e: LineError, suffix: str = "line skipped") -> None:
        msg = e.message if not suffix or e.line == 0 else f"{e.message}; {suffix}"
        self.add(e.path, e.line or None, msg)

    def finish(self) -> list[SourceIssue]:
        for path, n in self._dropped.items():
            self.items.append(SourceIssue(path, None, f"{n} more problem(s) in this file not listed"))
        self._dropped.clear()
        return list(self.items)


class NonFinite:
    """Counts non-finite values per (file, field) so that each gets one issue, not one per row."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], list[Any]] = {}

    def check(self, path: str | os.PathLike[str], field: str, value: Any, line: int | None) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            entry = self._seen.setdefault((str(path), field), [0, line, repr(value)])
            entry[0] += 1

    def add(self, path: str | os.PathLike[str], field: str, n: int, first: float, line: int | None) -> None:
        entry = self._seen.setdefault((str(path), field), [0, line, repr(first)])
        entry[0] += n

    def flush(self, issues: IssueLog, what: str = "kept as is") -> None:
        for (path, field), (n, line, first) in self._seen.items():
            where = f" (first: {first}" + (f" at line {line})" if line else ")")
            issues.add(path, None, f"{n} non-finite value(s) in {field!r}{where}; {what}")
        self._seen.clear()
