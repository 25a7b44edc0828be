"""W&B run folders, read through the wandb CLI's own reader of the ``.wandb`` transaction log.

What wandb writes (wandb 0.31.0, read in its source and by running it offline):

* ``wandb/{run,offline-run}-<YYYYMMDD_HHMMSS>-<id>/`` per launch (a resumed run: one folder per
  launch, same id), plus a ``latest-run`` link. An offline run keeps its history, config and
  summary only in the binary ``run-<id>.wandb``; ``files/`` holds ``output.log`` (the console),
  ``requirements.txt`` and ``media/table/<key>_<_step>_<hash>.table.json`` (a ``wandb.Table`` as
  ``{"columns", "data"}``, cut at ``wandb.Table.MAX_ROWS`` = 10,000 rows; the history row keeps
  the ``nrows`` it had).
* The Python ``DataStore`` reader is gone (no ``wandb/sdk/internal/datastore.py`` in 0.31). The
  supported offline reader is the CLI's ``wandb leet inspect --json <file>`` (``wandb/cli/leet.py``
  ``launch_inspect``, run by the bundled ``wandb-core``): one JSON record per line
  (``{"num", "type", <type>: ...}``; history items flat, media keys dotted, NaN / ±inf as the
  strings ``"NaN"`` / ``"Infinity"`` / ``"-Infinity"``). A file cut mid-record prints what it
  could read and says so on stderr ("reached the end of an incomplete .wandb file"); a file that
  is no transaction log exits 1 ("bad header"); a corrupt block inside is skipped ("skipped
  corrupt data ... checksum mismatch", exit 0). So this module runs that command and never
  decodes the binary format itself.
* The x-axis: ``transformers`` ``WandbCallback.setup`` calls ``define_metric("*",
  step_metric="train/global_step", step_sync=True)`` and logs without ``step=`` (so ``_step``
  counts ``wandb.log`` calls, not optimizer steps); open-instruct ``grpo_fast.py`` defines
  ``training_step`` the same way and logs ``step=training_step``; verl's ``Tracking`` logs
  ``wandb.log(data, step=global_steps)``. The step is the ``step_metric`` of the ``*`` metric
  record when there is one, else ``_step``.

Several history rows of one step (TRL logs its metrics, then the ``completions`` table and
``profiling/*`` timings in rows of their own) are merged: the last value of each key wins.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from diagnose.adapters._common.io import subdirs, visible_files
from diagnose.adapters._common.issues import IssueLog
from diagnose.adapters.trackers.run import LoggedTable, TrackerRun, empty_metrics

__all__ = ["RUN_DIR", "WandbRef", "find_runs", "inspect_command", "is_run_dir", "read_run"]

#: a run folder: ``run-20260101_120000-abc123`` (online / synced) or ``offline-run-...``
RUN_DIR = re.compile(r"^(offline-)?run-(\d{8}_\d{6})-([A-Za-z0-9]+)$")
RUN_FILE = re.compile(r"^run-([A-Za-z0-9]+)\.wandb$")
_TYPE = re.compile(rb'^\{"num":\d+,"type":"(\w+)"')
_TABLE_TYPES = ("table-file", "incremental-table-file")
_INCOMPLETE = "incomplete .wandb file"
_CORRUPT = "skipped corrupt data"
MAX_TABLE_BYTES = 512 * 1024 * 1024
#: summary records kept (every history row writes one; what is set apart from the history, such
#: as ``train_runtime``, comes at the end of a run)
_SUMMARY_TAIL = 256


@dataclass
class WandbRef:
    """A W&B run found on disk: its id and its folders (oldest first; one per launch)."""

    id: str
    dirs: list[Path]
    offline: bool = True

    @property
    def path(self) -> Path:
        return self.dirs[-1]


# ---- discovery ------------------------------------------------------------------------


def run_file(d: Path) -> Path | None:
    """The ``run-<id>.wandb`` of a run folder (None: none, or several)."""
    found = [f for f in visible_files(d) if RUN_FILE.match(f.name)]
    return found[0] if len(found) == 1 else None


def is_run_dir(d: Path) -> bool:
    return d.is_dir() and (bool(RUN_DIR.match(d.name)) or run_file(d) is not None)


def find_runs(p: Path) -> list[WandbRef]:
    """The W&B runs at ``p``: a ``.wandb`` file, a run folder, a ``wandb/`` folder, or a launch
    folder holding ``wandb/`` (or ``<sub>/wandb/``, as with ``WANDB_DIR=<output_dir>``)."""
    if p.is_file():
        return [WandbRef(_id(p.parent, p), [p.parent], p.parent.name.startswith("offline-"))] \
            if RUN_FILE.match(p.name) else []
    if is_run_dir(p):
        folders = [p]
    else:
        bases = [p, p / "wandb"] + [d / "wandb" for d in subdirs(p) if d.name != "wandb"]
        folders = [d for b in bases if b.is_dir() for d in subdirs(b) if RUN_DIR.match(d.name)]
    by_id: dict[str, WandbRef] = {}
    for d in sorted(set(folders), key=lambda x: (_started(x), str(x))):
        rid = _id(d, run_file(d))
        ref = by_id.setdefault(rid, WandbRef(rid, [], True))
        ref.dirs.append(d)
        ref.offline = ref.offline and d.name.startswith("offline-")
    return list(by_id.values())


def _id(d: Path, f: Path | None) -> str:
    m = RUN_DIR.match(d.name)
    if m:
        return m.group(3)
    fm = RUN_FILE.match(f.name) if f is not None else None
    return fm.group(1) if fm else d.name


def _started(d: Path) -> str:
    m = RUN_DIR.match(d.name)
    return m.group(2) if m else ""


# ---- the CLI reader -------------------------------------------------------------------


def inspect_command(path: Path) -> list[str]:
    """``wandb leet inspect --json PATH``, with the interpreter that runs us (whose wandb the
    ``[trackers]`` extra installs)."""
    return [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)]


def _env() -> dict[str, str]:
    # offline: the CLI then passes --no-observability to wandb-core (no telemetry upload)
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false"}


@dataclass
class _Records:
    """What one ``.wandb`` file holds, as the CLI printed it."""

    history: list[bytes] = field(default_factory=list)
    metric: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    stderr: str = ""
    returncode: int = 0


def _inspect(f: Path) -> _Records:
    """Run the CLI on ``f`` and sort its records (history lines kept as bytes for polars)."""
    rec = _Records()
    summaries: deque[bytes] = deque(maxlen=_SUMMARY_TAIL)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(inspect_command(f), stdout=subprocess.PIPE, stderr=err, env=_env())
        assert proc.stdout is not None
        for line in proc.stdout:
            m = _TYPE.match(line)
            kind = m.group(1) if m else None
            if kind is None:
                try:
                    kind = str(json.loads(line).get("type")).encode()
                except (ValueError, AttributeError):
                    continue
            if kind == b"history":
                rec.history.append(line)
            elif kind == b"summary":
                summaries.append(line)
            elif kind in (b"metric", b"config", b"run", b"exit"):
                _small_record(rec, kind.decode(), line)
        rec.returncode = proc.wait()
        err.seek(0)
        rec.stderr = err.read().decode("utf-8", "replace").strip()
    for line in summaries:
        upd = _body(line, "summary").get("update")
        if isinstance(upd, dict):
            rec.summary.update(upd)
    return rec


def _body(line: bytes, kind: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except ValueError:
        return {}
    body = obj.get(kind) if isinstance(obj, dict) else None
    return body if isinstance(body, dict) else {}


def _small_record(rec: _Records, kind: str, line: bytes) -> None:
    body = _body(line, kind)
    if kind == "metric":
        rec.metric.append(body)
    elif kind == "config":
        upd = body.get("update")
        rec.config.update(upd if isinstance(upd, dict) else {})
    elif kind == "run":
        rec.run = body
        upd = (body.get("config") or {}).get("update")
        rec.config.update(upd if isinstance(upd, dict) else {})
    elif kind == "exit":
        code = body.get("exit_code", 0)
        rec.exit_code = code if isinstance(code, int) else 0


# ---- history --------------------------------------------------------------------------


def _step_key(metric: list[dict[str, Any]]) -> str:
    """The x-axis the trainer defined (``define_metric("*", step_metric=K)``), else ``_step``."""
    key = "_step"
    for m in metric:
        if m.get("glob_name") == "*" and isinstance(m.get("step_metric"), str) and m["step_metric"]:
            key = m["step_metric"]
    return key


def history_frame(lines: list[bytes]) -> pl.DataFrame:
    """The history records' items, one row per ``wandb.log`` call (flat keys)."""
    if not lines:
        return pl.DataFrame()
    df = pl.read_ndjson(io.BytesIO(b"".join(lines)), infer_schema_length=None)
    if "history" not in df.columns or not isinstance(df.schema["history"], pl.Struct):
        return pl.DataFrame()
    inner = df.select(pl.col("history").struct.field("item")).get_column("item")
    return inner.struct.unnest() if isinstance(inner.dtype, pl.Struct) else pl.DataFrame()


def _media_prefixes(df: pl.DataFrame) -> dict[str, str]:
    """``key -> wandb type`` of the media values logged in the history (``key._type``)."""
    out = {}
    for c in df.columns:
        if c.endswith("._type") and df.schema[c] == pl.String:
            kinds = df.get_column(c).drop_nulls().unique().to_list()
            if kinds:
                out[c[: -len("._type")]] = str(kinds[0])
    return out


def numeric_metrics(df: pl.DataFrame, step_key: str, skip_prefixes: list[str]) -> tuple[pl.DataFrame, list[str]]:
    """One row per step: every numeric key (``"NaN"`` / ``"Infinity"`` strings read as floats),
    the last value of the step winning. Also returns the keys dropped as not numeric."""
    dropped: list[str] = []
    cols: list[pl.Expr] = []
    for c, dt in df.schema.items():
        if c == step_key or c.startswith("_") or any(c.startswith(p + ".") for p in skip_prefixes):
            continue
        if dt.is_numeric() or dt == pl.Boolean:
            cols.append(pl.col(c).cast(pl.Float64))
        elif dt == pl.String:
            s = df.get_column(c)
            as_num = s.cast(pl.Float64, strict=False)
            if as_num.null_count() == s.null_count():
                cols.append(pl.col(c).cast(pl.Float64, strict=False))
            else:
                dropped.append(c)
        elif dt != pl.Null:
            dropped.append(c)
    steps = pl.col(step_key).cast(pl.Float64, strict=False)
    out = df.select(pl.when(steps.is_finite() & (steps >= 0) & (steps == steps.floor())).then(steps)
                    .cast(pl.Int64).alias("step"), *cols).filter(pl.col("step").is_not_null())
    names = [c for c in out.columns if c != "step"]
    if not names:
        return empty_metrics(), dropped
    out = out.filter(pl.any_horizontal(pl.col(names).is_not_null()))
    merged = out.group_by("step", maintain_order=True).agg([pl.col(c).drop_nulls().last() for c in names])
    return merged.sort("step"), dropped


def _tables(df: pl.DataFrame, step_key: str, media: dict[str, str], files: Path, issues: IssueLog) -> list[LoggedTable]:
    out: list[LoggedTable] = []
    for key, kind in media.items():
        if kind not in _TABLE_TYPES or f"{key}.path" not in df.columns:
            continue
        nrows = pl.col(f"{key}.nrows") if f"{key}.nrows" in df.columns else pl.lit(None)
        rows = df.filter(pl.col(f"{key}.path").is_not_null()).select(
            pl.col(step_key).cast(pl.Int64, strict=False).alias("s"), pl.col(f"{key}.path").alias("p"),
            nrows.cast(pl.Int64, strict=False).alias("n"))
        for s, rel, n in rows.iter_rows():
            t = read_table(files / rel, key, -1 if s is None else s, issues)
            if t is not None:
                t.logged_rows = n
                if n is not None and n > len(t.rows):
                    issues.add(t.path, None, f"table {key!r} at step {s} had {n} rows, the file holds {len(t.rows)}: "
                                             "wandb keeps at most wandb.Table.MAX_ROWS (10,000) rows of a logged table")
                out.append(t)
    return out


def read_table(f: Path, key: str, step: int, issues: IssueLog) -> LoggedTable | None:
    """A ``*.table.json`` file (``{"columns": [...], "data": [[...], ...]}``); None if unreadable."""
    try:
        if f.stat().st_size > MAX_TABLE_BYTES:
            issues.add(f, None, f"table file over {MAX_TABLE_BYTES >> 20} MiB; not read")
            return None
        obj = json.loads(f.read_bytes())
    except FileNotFoundError:
        issues.add(f, None, f"table {key!r} logged at step {step} but its file is missing; not read")
        return None
    except (OSError, ValueError, RecursionError) as e:
        issues.add(f, None, f"unreadable table file ({type(e).__name__}: {str(e)[:160]}); not read")
        return None
    cols, data = (obj.get("columns"), obj.get("data")) if isinstance(obj, dict) else (None, None)
    if not isinstance(cols, list) or not isinstance(data, list):
        issues.add(f, None, "not a wandb table ({'columns': [...], 'data': [...]}); not read")
        return None
    rows = [r for r in data if isinstance(r, list) and len(r) == len(cols)]
    if len(rows) < len(data):
        issues.add(f, None, f"{len(data) - len(rows)} table row(s) without {len(cols)} cells; skipped")
    return LoggedTable(key, step, f, [str(c) for c in cols], rows)


# ---- one run --------------------------------------------------------------------------


def _last_exception(output_log: Path) -> str | None:
    """The last ``SomeError: message`` line of the console (the run's crash, if it crashed)."""
    try:
        with output_log.open("rb") as fh:
            fh.seek(max(0, output_log.stat().st_size - 65536))
            tail = fh.read().decode("utf-8", "replace")
    except OSError:
        return None
    found = re.findall(r"^((?:\w+\.)*\w*(?:Error|Exception|Interrupt)(?:: [^\n]*)?)$", tail, re.MULTILINE)
    return found[-1][:300] if found else None


def _read_folder(d: Path, issues: IssueLog) -> tuple[_Records | None, Path | None]:
    f = run_file(d)
    if f is None:
        several = [x.name for x in visible_files(d) if RUN_FILE.match(x.name)]
        issues.add(d, None, f"several .wandb files ({', '.join(several)}); the folder is not read" if several else
                   "no run-<id>.wandb transaction log (W&B keeps the history only there); no metrics")
        return None, None
    if importlib.util.find_spec("wandb") is None:
        issues.add(f, None, "a W&B run, but wandb is not installed (its CLI reads the .wandb file): "
                            "pip install 'collapse-diagnostics[trackers]'; not read")
        return None, f
    try:
        rec = _inspect(f)
    except OSError as e:
        issues.add(f, None, f"could not run `wandb leet inspect` ({e.strerror or e}); not read")
        return None, f
    if rec.returncode != 0:
        why = rec.stderr.splitlines()[-1] if rec.stderr else f"exit code {rec.returncode}"
        issues.add(f, None, f"`wandb leet inspect` could not read it ({why[:240]}); "
                            + ("records before the error kept" if rec.history else "nothing read"))
    if rec.returncode == 0 and _CORRUPT in rec.stderr:
        why = next((ln for ln in rec.stderr.splitlines() if _CORRUPT in ln), "")
        issues.add(f, None, "corrupt data in the .wandb file was skipped by `wandb leet inspect` "
                            f"({why.split(':', 1)[-1].strip()[:200]}): the records in it are lost, the rest is read "
                            f"({len(rec.history)} history rows)")
    if rec.returncode == 0 and _INCOMPLETE in rec.stderr:
        issues.add(f, None, "the .wandb file ends mid-record (the run crashed, was killed or is still being written): "
                            f"everything before it is read ({len(rec.history)} history rows)")
    return rec, f


def read_run(ref: WandbRef) -> TrackerRun:
    """The W&B run ``ref``: its history by trainer step, config, summary and logged tables. A
    folder or file that cannot be read becomes an issue; what could be read is returned."""
    issues = IssueLog()
    notes: list[str] = []
    frames: list[pl.DataFrame] = []
    tables: list[LoggedTable] = []
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    files: list[Path] = []
    step_key, name, exit_code, state = "_step", "", None, None
    skipped: set[str] = set()
    for d in ref.dirs:
        rec, f = _read_folder(d, issues)
        if f is not None:
            files.append(f)
        if rec is None:
            continue
        config.update(rec.config)
        summary.update(rec.summary)
        name = str(rec.run.get("display_name") or name)
        hist = history_frame(rec.history)
        key = _step_key(rec.metric)
        if hist.height and key not in hist.columns:
            notes.append(f"{d.name}: the step metric {key!r} is in no history row; steps are W&B's _step")
            key = "_step"
        step_key = key
        if hist.height:
            media = _media_prefixes(hist)
            frame, dropped = numeric_metrics(hist, key, list(media))
            frames.append(frame)
            tables += _tables(hist, key, media, d / "files", issues)
            skipped.update(dropped)
            skipped.update(k for k, kind in media.items() if kind not in _TABLE_TYPES)
        files += _table_files(d)
        exit_code = rec.exit_code
        state = ("finished" if rec.exit_code == 0 else "failed") if rec.exit_code is not None else "incomplete"
        if rec.exit_code not in (None, 0):
            crash = _last_exception(d / "files" / "output.log")
            issues.add(d, None, f"the run failed (exit code {rec.exit_code})"
                                + (f"; its console ends with: {crash}" if crash else "") + "; what it logged is read")
    metrics = _combine(frames, notes, ref)
    if skipped:
        notes.append(f"W&B values that are not numbers are not read as metrics: {', '.join(sorted(skipped)[:8])}"
                     f"{', ...' if len(skipped) > 8 else ''} (histograms, media, text)")
    config.pop("_wandb", None)
    aliases = tuple(x for x in (name, *(d.name for d in ref.dirs)) if x)
    return TrackerRun("wandb", ref.path, ref.id, metrics, step_from=step_key, aliases=aliases, config=config,
                      summary={k: v for k, v in summary.items() if not k.startswith("_")}, tables=tables,
                      state=state, exit_code=exit_code, issues=issues.finish(), notes=notes, files=files)


def _table_files(d: Path) -> list[Path]:
    media = d / "files" / "media" / "table"
    return [f for f in visible_files(media) if f.name.endswith(".table.json")] if media.is_dir() else []


def _combine(frames: list[pl.DataFrame], notes: list[str], ref: WandbRef) -> pl.DataFrame:
    """The launches of one run id in order; a step logged again after a resume: the later wins."""
    frames = [f for f in frames if f.height]
    if not frames:
        return empty_metrics()
    if len(frames) == 1:
        return frames[0]
    notes.append(f"W&B run {ref.id} was resumed: {len(ref.dirs)} launch folders read in order, a step logged "
                 "again by a later launch replaces the earlier values")
    return pl.concat(frames, how="diagonal_relaxed").group_by("step", maintain_order=True).agg(
        pl.all().drop_nulls().last()).sort("step")
