"""Probe tables written beside another trainer's output, attached to that trainer's `RunSource`.

`diagnose.integrations.trl.DiagnoseCallback` writes a run directory of our format (``run.json``,
``metrics.jsonl`` with ``probe/<context>/<token>`` metrics, ``probe/step-NNNNNN.parquet``) into
``<output_dir>/diagnose/``. TRL's own files carry no token-level signal, so `load_run` attaches
that directory to the TRL (or verl, open-instruct) source: its probe table and control tokens
when the source has none, and its metrics columns that the trainer's files lack (the trainer's
own values win where both have a column). Torch-free: the scan imports it.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from diagnose.rundir.schema import RUN_JSON
from diagnose.source import RunSource, SourceIssue

#: the folder the callback writes into, inside the trainer's output directory
SIDECAR_DIR = "diagnose"


def sidecar_dir(root: Path) -> Path | None:
    """``<root>/diagnose`` when it holds a run directory of ours, else None."""
    d = root / SIDECAR_DIR
    try:
        return d if (d / RUN_JSON).is_file() else None
    except OSError:
        return None


def _merge_metrics(own: pl.LazyFrame, side: pl.LazyFrame) -> pl.LazyFrame:
    """Full join on ``step``; a column both have keeps the trainer's value where it has one."""
    own_cols = own.collect_schema().names()
    side_cols = side.collect_schema().names()
    shared = [c for c in side_cols if c in own_cols and c != "step"]
    side = side.rename({c: f"{c}__side" for c in shared})
    merged = own.join(side, on="step", how="full", coalesce=True)
    if shared:
        merged = merged.with_columns(pl.coalesce(pl.col(c), pl.col(f"{c}__side")).alias(c) for c in shared)
        merged = merged.drop([f"{c}__side" for c in shared])
    return merged.sort("step")


def attach_sidecar(src: RunSource) -> RunSource:
    """``src`` with the sidecar run directory under its root attached (unchanged when there is
    none, or when ``src`` is itself one of our runs)."""
    if src.format == "native":
        return src
    root = src.path if src.path.is_dir() else src.path.parent
    d = sidecar_dir(root)
    if d is None:
        return src
    from diagnose.adapters import native  # the sidecar is a run directory of ours

    side = native.load(d)
    src.issues.extend(SourceIssue(i.path, i.line, i.message) for i in side.issues)
    steps: list[int] = []
    if side.probe is not None and src.probe is None:
        src.probe = side.probe
        steps = sorted(side.probe.select(pl.col("step").unique()).collect().get_column("step").to_list())
    if side.control_tokens and not src.control_tokens:
        src.control_tokens = list(side.control_tokens)
    if side.metrics is not None:
        src.metrics = side.metrics if src.metrics is None else _merge_metrics(src.metrics, side.metrics)
    if steps:
        span = f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"
        src.notes.append(f"control-token probe signals from the live probe (DiagnoseCallback) in {d}: "
                         f"{len(steps)} probes, {span}")
    files = dict(src._fingerprint.get("files", {}))
    for rel, stamp in side.fingerprint().get("files", {}).items():
        files[f"{SIDECAR_DIR}/{rel}"] = stamp
    src._fingerprint = {**src._fingerprint, "files": dict(sorted(files.items()))}
    return src
