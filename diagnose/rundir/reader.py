"""RunReader: tolerant, lazy reader of a run directory (format v1, see docs/run-format.md).

Corrupt inputs never raise: a bad ``metrics.jsonl`` line, a truncated parquet file, an
incomplete checkpoint are recorded in :attr:`RunReader.issues` (path, line, message)
and skipped.  :class:`RunFormatError` is raised only when nothing at all is readable
(or the run was written by a newer, incompatible format version).

Step tables are returned as ``polars.LazyFrame`` built with ``pl.scan_parquet`` over
the valid step files, so filters and column selections are pushed down::

    r = RunReader("runs/exp1")
    r.tokens(steps=range(0, 100, 10)).filter(pl.col("is_generated")) \\
        .group_by("step").agg(pl.col("entropy").mean()).collect()

The directory is re-listed on every call, so a reader on a live run sees new steps;
per-file validation is cached by (mtime, size).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from diagnose.atomic import is_temp_name
from diagnose.parquet_check import check_parquet
from diagnose.rundir.metrics import read_metrics
from diagnose.rundir.schema import (
    CHECKPOINTS_DIR,
    KINDS,
    METRICS_JSONL,
    RUN_FORMAT,
    RUN_FORMAT_VERSION,
    RUN_JSON,
    TRAINER_STATE_JSON,
    RunFormatError,
    columns_for,
    ctrl_names_from_columns,
    parse_step_dirname,
    parse_step_filename,
    validate_schema,
)
from diagnose.source import STEP_MISMATCH, step_mismatch_message

__all__ = ["ReadIssue", "RunReader", "RunFormatError"]


@dataclass(frozen=True)
class ReadIssue:
    """One problem found while reading: ``path`` (file), ``line`` (1-based, or None), ``message``."""

    path: Path
    line: int | None
    message: str
    kind: str | None = None  # as `diagnose.source.SourceIssue.kind`

    def __str__(self) -> str:
        loc = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{loc}: {self.message}"


@dataclass(frozen=True)
class _StepFile:
    step: int
    path: Path
    schema: pl.Schema
    num_rows: int


# Flat dtypes a file check may be stored as (by name) and restored from; any other dtype is
# re-checked from the file. Only names are parsed: nothing is evaluated.
_PLAIN_DTYPES = {str(t): t for t in (
    pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64, pl.Float32, pl.Float64,
    pl.Boolean, pl.String, pl.Binary, pl.Null)}


def _dtype_to_str(dt: pl.DataType) -> str | None:
    name = str(dt)
    if name in _PLAIN_DTYPES:
        return name
    if isinstance(dt, pl.List) and str(dt.inner) in _PLAIN_DTYPES:
        return f"List({dt.inner})"
    return None


def _dtype_from_str(name: Any) -> pl.DataType | None:
    if not isinstance(name, str):
        return None
    if name in _PLAIN_DTYPES:
        return _PLAIN_DTYPES[name]
    if name.startswith("List(") and name.endswith(")") and name[5:-1] in _PLAIN_DTYPES:
        return pl.List(_PLAIN_DTYPES[name[5:-1]])
    return None


def _normalize_steps(steps: int | Iterable[int] | None) -> set[int] | None:
    if steps is None:
        return None
    if isinstance(steps, int):
        return {int(steps)}
    return {int(s) for s in steps}


class RunReader:
    """Read a run directory written by :class:`diagnose.rundir.RunWriter`.

    ``file_checks``: a record from an earlier reader's :meth:`file_checks` (e.g. kept by the
    scan cache): step files whose (mtime, size) it lists as checked clean are not opened again,
    so re-reading a live run of many steps costs only its new files.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, file_checks: Any = None) -> None:
        self.run_dir = Path(run_dir)
        self._issues: list[ReadIssue] = []
        self._issue_keys: set[tuple[str, int | None, str]] = set()
        self._file_cache: dict[Path, tuple[tuple[int, int], _StepFile | None]] = {}
        self._seed_file_checks(file_checks)
        if not self.run_dir.exists():
            raise RunFormatError(f"{self.run_dir}: no such run directory")
        if not self.run_dir.is_dir():
            raise RunFormatError(f"{self.run_dir}: not a directory")
        self._info, self._info_error = self._load_info()
        if self._info is None and not self._anything_readable():
            details = "; ".join(str(i) for i in self._issues) or "no files"
            raise RunFormatError(
                f"{self.run_dir}: not a readable run ({self._info_error}; no metrics lines and no "
                f"readable step files). Issues: {details}"
            )

    # ---- issues ----------------------------------------------------------------------

    def _issue(self, path: Path, line: int | None, message: str, kind: str | None = None) -> None:
        key = (str(path), line, message)
        if key not in self._issue_keys:
            self._issue_keys.add(key)
            self._issues.append(ReadIssue(Path(path), line, message, kind))

    @property
    def issues(self) -> list[ReadIssue]:
        """Problems found so far (grows as more of the run is read; no duplicates)."""
        return list(self._issues)

    # ---- run.json --------------------------------------------------------------------

    def _load_info(self) -> tuple[dict | None, str | None]:
        path = self.run_dir / RUN_JSON
        if not path.exists():
            msg = f"{path}: missing ({RUN_JSON} is written when the run starts)"
            self._issue(path, None, f"missing ({RUN_JSON} is written when the run starts)")
            return None, msg
        try:
            info = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            self._issue(path, None, f"unreadable or not valid JSON: {e}")
            return None, f"{path}: unreadable or not valid JSON ({e})"
        if not isinstance(info, dict):
            self._issue(path, None, f"expected a JSON object, got {type(info).__name__}")
            return None, f"{path}: expected a JSON object, got {type(info).__name__}"
        if info.get("format") != RUN_FORMAT:
            self._issue(path, None, f"'format' is {info.get('format')!r}, expected {RUN_FORMAT!r}; reading anyway")
        version = info.get("format_version")
        if isinstance(version, int) and not isinstance(version, bool) and version > RUN_FORMAT_VERSION:
            raise RunFormatError(
                f"{path}: format_version {version} is newer than this reader supports "
                f"({RUN_FORMAT_VERSION}); upgrade collapse-diagnostics"
            )
        if version != RUN_FORMAT_VERSION:
            self._issue(path, None, f"'format_version' is {version!r}, expected {RUN_FORMAT_VERSION}; reading as v1")
        ctrl = info.get("control_tokens", [])
        if not isinstance(ctrl, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) and t.get("name") for t in ctrl):
            self._issue(path, None, "'control_tokens' is not a list of {name, text, token_id, role} objects; ignored")
            info["control_tokens"] = []
        return info, None

    def _anything_readable(self) -> bool:
        metrics = self.run_dir / METRICS_JSONL
        if metrics.exists() and metrics.stat().st_size > 0 and self.metrics().height > 0:
            return True
        return any(self._valid_files(kind) for kind in KINDS)

    @property
    def info(self) -> dict:
        """Parsed ``run.json``.  Raises :class:`RunFormatError` naming the file if it is missing/corrupt."""
        if self._info is None:
            raise RunFormatError(self._info_error or f"{self.run_dir / RUN_JSON}: unreadable")
        return self._info

    @property
    def control_tokens(self) -> list[dict]:
        """``[{"name", "text", "token_id", "role"}, ...]`` from run.json; if run.json is unreadable,
        inferred from the ``lp_ctrl_<name>`` columns of the step files (text/token_id/role None)."""
        if self._info is not None:
            return [dict(t) for t in self._info.get("control_tokens", [])]
        names: list[str] = []
        for kind in ("tokens", "probe"):
            for f in self._valid_files(kind):
                for n in ctrl_names_from_columns(f.schema.names()):
                    if n not in names:
                        names.append(n)
        return [{"name": n, "text": None, "token_id": None, "role": None} for n in names]

    @property
    def ctrl_names(self) -> list[str]:
        return [t["name"] for t in self.control_tokens]

    # ---- metrics ---------------------------------------------------------------------

    def metrics(self) -> pl.DataFrame:
        """``metrics.jsonl`` as a DataFrame (`diagnose.rundir.metrics.read_metrics`): one row per
        step, ``step`` (Int64) first; bad lines are reported in :attr:`issues` and skipped."""
        return read_metrics(self.run_dir / METRICS_JSONL, self._issue)

    # ---- file checks kept between readers -----------------------------------------------

    def file_checks(self) -> dict[str, Any]:
        """The step files this reader checked and found clean (no issue), as plain JSON:
        ``{"schemas": [[[column, dtype], ...], ...], "files": {"<kind>/<name>": [mtime_ns,
        size, num_rows, schema index]}}``. Files with issues, or of dtypes not stored by name,
        are left out (they are checked again, and their issues reported again)."""
        flagged = {i.path for i in self._issues}
        schemas: list[list[list[str]]] = []
        index: dict[tuple, int] = {}
        files: dict[str, list[int]] = {}
        for path, ((mtime, size), info) in self._file_cache.items():
            if info is None or path in flagged:
                continue
            cols = [(n, _dtype_to_str(t)) for n, t in info.schema.items()]
            if any(t is None for _, t in cols):
                continue
            key = tuple(cols)
            if key not in index:
                index[key] = len(schemas)
                schemas.append([list(c) for c in cols])
            files[f"{path.parent.name}/{path.name}"] = [mtime, size, info.num_rows, index[key]]
        return {"schemas": schemas, "files": files}

    def _seed_file_checks(self, record: Any) -> None:
        """Take :meth:`file_checks` of an earlier reader; anything malformed is ignored."""
        if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
            return
        schemas: list[pl.Schema | None] = []
        for cols in record.get("schemas") or []:
            try:
                pairs = [(str(n), _dtype_from_str(t)) for n, t in cols]
            except (TypeError, ValueError):
                pairs = [("", None)]
            schemas.append(None if any(t is None for _, t in pairs) else pl.Schema(pairs))
        for rel, v in record["files"].items():
            parts = rel.split("/") if isinstance(rel, str) else []
            if (len(parts) != 2 or parts[0] not in KINDS or not isinstance(v, list) or len(v) != 4
                    or not all(isinstance(x, int) for x in v) or not 0 <= v[3] < len(schemas)):
                continue
            step = parse_step_filename(parts[1])
            schema = schemas[v[3]]
            if step is None or schema is None:
                continue
            path = self.run_dir / parts[0] / parts[1]
            self._file_cache[path] = ((v[0], v[1]), _StepFile(step=step, path=path, schema=schema, num_rows=v[2]))

    # ---- step tables -----------------------------------------------------------------

    def _valid_files(self, kind: str) -> list[_StepFile]:
        if kind not in KINDS:
            raise ValueError(f"unknown table kind {kind!r}; expected one of {KINDS}")
        directory = self.run_dir / kind
        if not directory.is_dir():
            if directory.is_symlink():
                self._issue(directory, None, "broken symlink or symlink loop; not read")
            return []
        out: list[_StepFile] = []
        try:
            entries = list(os.scandir(directory))
        except OSError as e:
            self._issue(directory, None, f"cannot list directory: {e}")
            return []
        for entry in entries:
            name = entry.name
            if name.startswith(".") or is_temp_name(name):
                continue  # temp files of in-flight / interrupted writes
            step = parse_step_filename(name)
            if step is None:
                continue
            try:
                if not entry.is_file():
                    if entry.is_symlink():
                        self._issue(Path(entry.path), None, "broken symlink or symlink loop; file skipped")
                    continue
                st = entry.stat()
            except OSError as e:
                self._issue(Path(entry.path), None, f"cannot stat ({e.strerror or e}); file skipped")
                continue
            path = Path(entry.path)
            stamp = (st.st_mtime_ns, st.st_size)
            cached = self._file_cache.get(path)
            if cached is not None and cached[0] == stamp:
                info = cached[1]
            else:
                info = self._check_file(kind, step, path, st.st_size)
                self._file_cache[path] = (stamp, info)
            if info is not None:
                out.append(info)
        out.sort(key=lambda f: f.step)
        return out

    def _check_file(self, kind: str, step: int, path: Path, size: int) -> _StepFile | None:
        """Cheap up-front validation: parquet footer and column-chunk bounds
        (`diagnose.parquet_check`), schema, step stats."""
        footer, why = check_parquet(path, size=size, ranges=("step",))
        if footer is None:
            self._issue(path, None, f"{why}; file skipped")
            return None
        schema = footer.schema
        problems = validate_schema(schema, columns_for(kind, ctrl_names_from_columns(schema.names())), table=kind)
        if any("has dtype" in p for p in problems):
            self._issue(path, None, "; ".join(problems) + "; file skipped")
            return None
        for p in problems:
            self._issue(path, None, p + " (filled with nulls)")
        lo, hi = footer.ranges.get("step", (None, None))
        if lo is not None and (lo != step or hi != step):
            self._issue(path, None, step_mismatch_message("rows", f"{lo}..{hi}", step, "the step column"),
                        kind=STEP_MISMATCH)
        return _StepFile(step=step, path=path, schema=schema, num_rows=footer.num_rows)

    def steps(self, kind: str) -> list[int]:
        """Sorted steps present for ``kind``: 'rollouts' | 'tokens' | 'probe' (valid files only),
        'metrics' (steps with a metrics line) or 'checkpoints' (complete checkpoints)."""
        if kind == "metrics":
            return self.metrics().get_column("step").to_list()
        if kind == "checkpoints":
            return [s for s, _ in self.checkpoints()]
        return [f.step for f in self._valid_files(kind)]

    def files(self, kind: str, steps: int | Iterable[int] | None = None) -> list[tuple[int, Path]]:
        """``[(step, path)]`` of the valid step files of ``kind`` (optionally only ``steps``)."""
        wanted = _normalize_steps(steps)
        return [(f.step, f.path) for f in self._valid_files(kind) if wanted is None or f.step in wanted]

    def scan(self, kind: str, steps: int | Iterable[int] | None = None) -> pl.LazyFrame:
        """Lazy scan of table ``kind`` over the valid step files (optionally only ``steps``).

        The result always has every column of the format-v1 schema (missing optional
        columns as nulls) plus any extra columns, in schema order; with no files it is an
        empty LazyFrame with that schema.
        """
        wanted = _normalize_steps(steps)
        files = [f for f in self._valid_files(kind) if wanted is None or f.step in wanted]
        ctrl: list[str] = []
        if kind in ("tokens", "probe"):
            ctrl = list(self.ctrl_names)
            for f in files:
                for n in ctrl_names_from_columns(f.schema.names()):
                    if n not in ctrl:
                        ctrl.append(n)
        target: dict[str, pl.DataType] = {c.name: c.dtype for c in columns_for(kind, ctrl)}
        for f in files:
            for name, dtype in f.schema.items():
                target.setdefault(name, dtype)
        if not files:
            return pl.LazyFrame(schema=target)
        groups: dict[tuple, list[str]] = {}
        for f in files:
            groups.setdefault(tuple(f.schema.items()), []).append(str(f.path))
        frames = []
        for schema_items, paths in groups.items():
            schema = dict(schema_items)
            lf = pl.scan_parquet(paths, glob=False)
            if list(schema.items()) != list(target.items()):
                exprs = []
                for name, dtype in target.items():
                    if name not in schema:
                        exprs.append(pl.lit(None, dtype=dtype).alias(name))
                    elif schema[name] != dtype:
                        exprs.append(pl.col(name).cast(dtype, strict=False))
                    else:
                        exprs.append(pl.col(name))
                lf = lf.select(exprs)
            frames.append(lf)
        lf = frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical")
        if wanted is not None:
            lf = lf.filter(pl.col("step").is_in(sorted(wanted)))
        return lf

    def rollouts(self, steps: int | Iterable[int] | None = None) -> pl.LazyFrame:
        """``rollouts/step-*.parquet`` as one LazyFrame (one row per rollout)."""
        return self.scan("rollouts", steps)

    def tokens(self, steps: int | Iterable[int] | None = None) -> pl.LazyFrame:
        """``tokens/step-*.parquet`` as one LazyFrame (one row per completion token)."""
        return self.scan("tokens", steps)

    def probe(self, steps: int | Iterable[int] | None = None) -> pl.LazyFrame:
        """``probe/step-*.parquet`` as one LazyFrame (fixed control-token probe)."""
        return self.scan("probe", steps)

    # ---- checkpoints -----------------------------------------------------------------

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``[(step, dir)]`` of complete checkpoints (directories holding trainer_state.json), sorted."""
        directory = self.run_dir / CHECKPOINTS_DIR
        if not directory.is_dir():
            return []
        out = []
        for entry in directory.iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            step = parse_step_dirname(entry.name)
            if step is None:
                continue
            if not (entry / TRAINER_STATE_JSON).is_file():
                self._issue(entry, None, f"incomplete checkpoint (no {TRAINER_STATE_JSON}); skipped")
                continue
            out.append((step, entry))
        out.sort()
        return out

    def __repr__(self) -> str:
        return f"RunReader({str(self.run_dir)!r})"
