"""The capability probe's results as they live in a run directory: ``<run>/capability/``.

One schema, one writer, one reader, so that ``diagnose probe`` writes what ``scan``, the
dashboard and the notebooks read. Why a directory of its own: ``probe/`` already holds the
fixed control-token probe written during training; this one is written after the fact, per
checkpoint, by ``diagnose probe``.

Files (all written atomically):

- ``results.parquet`` -- long table, one row per (checkpoint, measure), see ``RESULT_SCHEMA``.
- ``summary.parquet`` -- one row per checkpoint: format score, capability score, gap, verdict.
- ``meta.json`` -- what was probed: tasks, split, thresholds, versions, time.
"""

from __future__ import annotations

import io
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from diagnose.atomic import atomic_write_bytes, atomic_write_json
from diagnose.regular_file import check_regular, read_text

DIRNAME = "capability"

# measures: generation-based ones carry turn-state rates and (for interventions) a fired rate
MEASURES = ("native", "repair_forbid", "repair_prefill", "alt_pythonic", "alt_json", "likelihood")

RESULT_SCHEMA: dict[str, pl.DataType] = {
    "checkpoint": pl.String,        # e.g. "step-000120", or a model directory's name
    "step": pl.Int64,               # training step of the checkpoint; null for a bare model dir
    "measure": pl.String,           # one of MEASURES
    "accuracy": pl.Float64,         # share of tasks solved (likelihood: share of steps ranked first)
    "n": pl.Int64,                  # tasks (generation measures) or scored gold steps (likelihood)
    "fired_rate": pl.Float64,       # interventions: share of episodes in which it fired; else null
    "healthy_call": pl.Float64,     # turn-state rates over generated turns; null for likelihood
    "healthy_response": pl.Float64,
    "polluted": pl.Float64,
    "collapsed": pl.Float64,
}

SUMMARY_SCHEMA: dict[str, pl.DataType] = {
    "checkpoint": pl.String,
    "step": pl.Int64,
    "format_score": pl.Float64,     # native accuracy (the format as trained)
    "capability_score": pl.Float64, # best content score with the format taken out of the way
    "format_gap": pl.Float64,       # capability_score - format_score
    "verdict": pl.String,           # "healthy" | "capability intact, format broken" | "capability lost" | ...
}


@dataclass
class CapabilityResults:
    run_dir: Path
    results: pl.DataFrame
    summary: pl.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)


def capability_dir(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / DIRNAME


def _frame(rows: list[dict[str, Any]] | pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    df = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(rows, schema=schema, strict=False)
    missing = [c for c in schema if c not in df.columns]
    df = df.with_columns([pl.lit(None, dtype=schema[c]).alias(c) for c in missing])
    return df.select([pl.col(c).cast(t) for c, t in schema.items()])


WRITE_ID = "collapse-diagnostics/capability_write"  # one id per write_capability call, in all three files


def _parquet_bytes(df: pl.DataFrame, write_id: str | None = None) -> bytes:
    buf = io.BytesIO()
    df.write_parquet(buf, metadata={WRITE_ID: write_id} if write_id else None)
    return buf.getvalue()


def write_capability(run_dir: str | os.PathLike[str], results: list[dict[str, Any]] | pl.DataFrame,
                     summary: list[dict[str, Any]] | pl.DataFrame, meta: dict[str, Any] | None = None) -> Path:
    """Write (replace) ``<run>/capability/``; each file atomically, all three stamped with one
    write id, so a reader can tell a set cut short by a kill between the files (`read_capability`
    refuses to mix two probes' tables)."""
    d = capability_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    write_id = secrets.token_hex(8)
    atomic_write_bytes(d / "results.parquet", _parquet_bytes(_frame(results, RESULT_SCHEMA), write_id))
    atomic_write_bytes(d / "summary.parquet", _parquet_bytes(_frame(summary, SUMMARY_SCHEMA), write_id))
    atomic_write_json(d / "meta.json", {**(meta or {}), "write_id": write_id})
    return d


class CapabilityReadError(Exception):
    """A capability file exists but cannot be read; the message names the file."""


def _check_one_write(d: Path, meta: dict[str, Any]) -> None:
    """The three files carry one write id (files from before ids existed carry none)."""
    ids = {"meta.json": meta.get("write_id")}
    for name in ("results.parquet", "summary.parquet"):
        if (d / name).exists():
            try:
                check_regular(d / name)
                ids[name] = pl.read_parquet_metadata(d / name).get(WRITE_ID)
            except Exception as e:  # noqa: BLE001 - reported with the file
                raise CapabilityReadError(f"{d / name}: unreadable ({type(e).__name__}: {e})") from None
    if len(set(ids.values())) > 1:
        raise CapabilityReadError(
            f"{d}: results.parquet, summary.parquet and meta.json are from different probe runs (a probe killed "
            "while writing them?); run diagnose probe again")


def read_capability(run_dir: str | os.PathLike[str]) -> CapabilityResults | None:
    """The probe results of a run, or None when the run has not been probed."""
    d = capability_dir(run_dir)
    if not (d / "summary.parquet").exists():
        return None
    frames = {}
    for name, schema in (("results", RESULT_SCHEMA), ("summary", SUMMARY_SCHEMA)):
        path = d / f"{name}.parquet"
        try:
            if os.path.lexists(path):
                check_regular(path)  # a pipe is named, never opened
            frames[name] = _frame(pl.read_parquet(path), schema) if path.exists() else _frame([], schema)
        except Exception as e:  # noqa: BLE001 - any decoding failure is reported with the file
            raise CapabilityReadError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    meta: dict[str, Any] = {}
    if (d / "meta.json").exists():
        try:
            meta = json.loads(read_text(d / "meta.json"))
        except (OSError, ValueError) as e:
            raise CapabilityReadError(f"{d / 'meta.json'}: unreadable ({e})") from None
        if not isinstance(meta, dict):
            raise CapabilityReadError(f"{d / 'meta.json'}: expected a JSON object, got {type(meta).__name__}")
    _check_one_write(d, meta)
    return CapabilityResults(Path(run_dir), frames["results"], frames["summary"], meta)


def merge_and_write(out_dir: Path, results: list[dict], summary: list[dict], meta: dict) -> tuple[Path, str | None]:
    """Write ``<out_dir>/capability/``, keeping earlier results for other checkpoints when they
    were probed on the same tasks with the same settings (else they are replaced, and the
    returned note says so)."""
    note = None
    new_names = {r["checkpoint"] for r in summary}
    res_df = pl.DataFrame(results, schema=RESULT_SCHEMA, strict=False)
    sum_df = pl.DataFrame(summary, schema=SUMMARY_SCHEMA, strict=False)
    try:
        old = read_capability(out_dir)
    except CapabilityReadError as e:
        old, note = None, f"earlier results unreadable ({e}); replaced"
    if old is not None:
        same = (old.meta.get("tasks", {}).get("fingerprint") == meta["tasks"]["fingerprint"]
                and old.meta.get("config") == meta["config"])
        if same:
            keep = ~pl.col("checkpoint").is_in(sorted(new_names))
            res_df = pl.concat([old.results.filter(keep), res_df], how="vertical_relaxed")
            sum_df = pl.concat([old.summary.filter(keep), sum_df], how="vertical_relaxed")
            merged = {k: v for k, v in (old.meta.get("checkpoints") or {}).items() if k not in new_names}
            merged.update(meta["checkpoints"])
            meta["checkpoints"] = merged
        else:
            note = "earlier results in this directory were probed on other tasks or settings; replaced"
    sum_df = sum_df.sort(["step", "checkpoint"], nulls_last=True)
    res_df = res_df.sort(["step", "checkpoint"], nulls_last=True, maintain_order=True)
    return write_capability(out_dir, res_df, sum_df, meta), note
