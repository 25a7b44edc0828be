"""``metrics.jsonl``: the line the writer appends, the repairs a resume makes, and the reader
that parses the lines back into one frame.

One line per ``log_metrics`` call: ``{"step", <flat keys>..., "nonfinite"?}``. Nested dicts are
flattened with ``/``; non-finite floats are written as ``null`` and named under ``nonfinite``
(JSON has no NaN), and the reader restores them. The reader never raises on a bad line: it
reports it (file, line, why) through the ``issue`` callback it is given and skips it.
"""

from __future__ import annotations

import enum
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from diagnose.atomic import atomic_write_bytes
from diagnose.rundir.schema import _check_step, step_value

__all__ = ["complete_trailing_line", "drop_metrics_after", "flatten_metrics", "metrics_record", "read_metrics"]

#: How the reader hears of a problem: ``issue(path, line or None, message)``.
Issue = Callable[[Path, int | None, str], None]

_RESERVED_METRIC_KEYS = ("step", "nonfinite")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf,
              "infinity": math.inf, "-infinity": -math.inf}


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------


def _scalar(key: str, v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, enum.Enum):
        return _scalar(key, v.value)
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray) and v.size == 1:
        return v.reshape(()).item()
    if hasattr(v, "numel") and hasattr(v, "item"):  # torch tensor
        if v.numel() == 1:
            return v.item()
    raise TypeError(
        f"metric {key!r}: unsupported value {type(v).__name__}; "
        "metrics must be scalars (int, float, bool, str, None, numpy/torch scalars)"
    )


def flatten_metrics(prefix: str, d: Mapping, out: dict[str, Any]) -> None:
    """Flatten nested mappings into ``out`` with ``/``-joined keys under ``prefix``
    (``{"a": {"b": 1}}`` -> ``{"a/b": 1}``)."""
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            flatten_metrics(key, v, out)
        else:
            out[key] = v


def metrics_record(step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object ``log_metrics`` writes: ``{"step", <flat keys>..., "nonfinite"?}``.

    Nested dicts are flattened with ``/`` (``{"completions": {"mean_length": 3}}`` ->
    ``"completions/mean_length"``).  Non-finite floats are written as ``null`` and
    listed in ``"nonfinite": {key: "nan" | "inf" | "-inf"}``.
    """
    step = _check_step(step)
    flat: dict[str, Any] = {}
    flatten_metrics("", metrics, flat)
    rec: dict[str, Any] = {"step": step}
    nonfinite: dict[str, str] = {}
    for key, raw in flat.items():
        if key in _RESERVED_METRIC_KEYS:
            if key == "step" and _scalar(key, raw) == step:
                continue
            raise ValueError(f"metric key {key!r} is reserved by the run format")
        v = _scalar(key, raw)
        if isinstance(v, float) and not math.isfinite(v):
            nonfinite[key] = "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
            v = None
        rec[key] = v
    if nonfinite:
        rec["nonfinite"] = nonfinite
    return rec


def complete_trailing_line(path: Path) -> int:
    """Make ``path`` end at a line boundary.

    An incomplete trailing line (no newline) is removed, unless it is a complete JSON
    object, in which case the missing newline is appended.  Returns the number of bytes
    removed.
    """
    if not path.exists():
        return 0
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        keep = 0
        pos = size
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            buf = f.read(pos - start)
            i = buf.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        f.seek(keep)
        tail = f.read()
        try:
            complete = isinstance(json.loads(tail.decode("utf-8")), dict)
        except (UnicodeDecodeError, ValueError):
            complete = False
        if complete:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
            removed = 0
        else:
            f.truncate(keep)
            removed = size - keep
        f.flush()
        os.fsync(f.fileno())
    return removed


def _line_step(line: bytes) -> int | None:
    """The ``step`` of one metrics line, None when the line is no JSON object with an int step."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    step = obj.get("step") if isinstance(obj, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def drop_metrics_after(path: Path, step: int, fsync: bool) -> int:
    """Rewrite ``path`` atomically without the lines of steps > ``step``; returns how many."""
    if not path.exists():
        return 0
    kept: list[bytes] = []
    dropped = 0
    with open(path, "rb") as f:
        for line in f:
            s = _line_step(line)
            if s is not None and s > step:
                dropped += 1
            else:
                kept.append(line if line.endswith(b"\n") else line + b"\n")
    if dropped:
        atomic_write_bytes(path, b"".join(kept), fsync=fsync)
    return dropped


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------


def read_metrics(path: Path, issue: Issue) -> pl.DataFrame:
    """``metrics.jsonl`` as a DataFrame: one row per step (sorted), ``step`` (Int64) first.

    Bad lines (truncated, not JSON, not an object, no integer ``step``) are reported through
    ``issue`` with their line number and skipped.  Values listed in ``nonfinite`` are restored
    to NaN / ±inf.  Several lines for the same step (e.g. train and eval metrics, or steps
    re-logged after a resume) are merged; later values win.
    """
    empty = pl.DataFrame(schema={"step": pl.Int64})
    if not path.exists():
        issue(path, None, "broken symlink or symlink loop; not read" if path.is_symlink() else "missing")
        return empty
    try:
        data = path.read_bytes()
    except OSError as e:
        issue(path, None, f"unreadable: {e}")
        return empty
    if not data.strip():
        issue(path, None, "empty: no metrics line")
        return empty
    lines = data.split(b"\n")
    last_unterminated = lines[-1] != b""
    if not last_unterminated:
        lines = lines[:-1]
    merged: dict[int, dict[str, Any]] = {}
    first_line: dict[int, int] = {}
    relogged: list[tuple[int, int, int]] = []  # (step, first line, line logging a key again)
    keys: dict[str, None] = {"step": None}
    n_lines = len(lines)
    for i, raw in enumerate(lines, start=1):
        rec = _parse_line(path, i, raw, issue, unterminated=last_unterminated and i == n_lines)
        if rec is None:
            continue
        step = rec.pop("step")
        for k in rec:
            keys.setdefault(k, None)
        into = merged.setdefault(step, {})
        if step in first_line and not into.keys().isdisjoint(rec):
            relogged.append((step, first_line[step], i))
        first_line.setdefault(step, i)
        into.update(rec)
    if relogged:  # a step logged twice (re-run after a resume?): named, merged
        s, a, b = relogged[0]
        issue(path, b, f"step {s} logged again (first on line {a}); {len(relogged)} re-logged line(s) in "
                       "all, merged with later values winning")
    if not merged:
        return empty
    steps = sorted(merged)
    columns = [pl.Series("step", steps, dtype=pl.Int64)]
    for key in list(keys)[1:]:
        columns.append(_metric_series(path, key, [merged[s].get(key) for s in steps], issue))
    return pl.DataFrame(columns)


def _parse_line(path: Path, lineno: int, raw: bytes, issue: Issue, *, unterminated: bool) -> dict | None:
    text_bytes = raw.strip()
    if not text_bytes:
        return None
    try:
        text = text_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        issue(path, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start}); line skipped")
        return None
    try:
        obj = json.loads(text)
    except ValueError as e:
        if unterminated:
            issue(path, lineno, f"incomplete last line (truncated write?): {e}; line skipped")
        else:
            issue(path, lineno, f"invalid JSON ({e}); line skipped")
        return None
    if not isinstance(obj, dict):
        issue(path, lineno, f"expected a JSON object, got {type(obj).__name__}; line skipped")
        return None
    raw_step = obj.get("step")
    step = step_value(raw_step)
    if step is None:
        issue(path, lineno, f"missing or invalid 'step' ({raw_step!r}; expected an integer 0..2^63-1); "
                            "line skipped")
        return None
    nonfinite = obj.pop("nonfinite", None)
    rec: dict[str, Any] = {}
    flatten_metrics("", obj, rec)
    rec["step"] = step
    if nonfinite is not None:
        if isinstance(nonfinite, list):
            nonfinite = {k: "nan" for k in nonfinite if isinstance(k, str)}
        if not isinstance(nonfinite, dict):
            issue(path, lineno, f"'nonfinite' must be an object or list, got {type(nonfinite).__name__}; ignored")
        else:
            for k, kind in nonfinite.items():
                value = _NONFINITE.get(str(kind).lower(), math.nan)
                if rec.get(k) is None and k != "step":
                    rec[k] = value
    return rec


def _metric_series(path: Path, key: str, values: list[Any], issue: Issue) -> pl.Series:
    kinds = {type(v) for v in values if v is not None}
    if not kinds or kinds <= {float, int, bool}:
        if kinds <= {bool} and kinds:
            return pl.Series(key, values, dtype=pl.Boolean)
        if kinds <= {int}:
            try:
                return pl.Series(key, values, dtype=pl.Int64)
            except (OverflowError, pl.exceptions.PolarsError):
                pass
        return pl.Series(key, [None if v is None else float(v) for v in values], dtype=pl.Float64)
    if kinds <= {str}:
        return pl.Series(key, values, dtype=pl.String)
    names = sorted(t.__name__ for t in kinds)
    issue(path, None, f"metric {key!r} has mixed/non-scalar value types {names}; stored as JSON strings")
    return pl.Series(
        key,
        [None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in values],
        dtype=pl.String,
    )
