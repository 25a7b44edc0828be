"""Rollouts of runs too large to hold their texts: a `pl.LazyFrame` whose small columns (ids,
rewards, turn states, ...) live in memory and whose text columns are read again from each step
file only when a query asks for them (polars IO plugin), and a pool that reads step files on
both cores.

Why: a verl or TRL run of 10^6 rollouts of 4k characters is ~5 GB of text; the scan needs only
counts from it (turn states, lengths), computed while each file is read. Queries that do need
the text (the examples of an episode, the dashboard's rollout browser) touch one or two steps.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import polars as pl

from diagnose.adapters._common.issues import IssueLog, NonFinite
from diagnose.jsonl import LineError

__all__ = ["POOL_MIN_BYTES", "FileMemo", "RecordedIssues", "TextPart", "file_memo", "lazy_rollouts", "map_files",
           "step_memo"]

#: Below this many bytes of step files, files are read in this process (a pool's start costs ~1 s).
POOL_MIN_BYTES = 256 * 1024 * 1024

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class TextPart:
    """Rows ``offset .. offset + length`` of the small frame come from one file; ``texts()``
    reads their text columns back (a frame of ``length`` rows, in order)."""

    offset: int
    length: int
    step: int | None
    texts: Callable[[], pl.DataFrame]


def lazy_rollouts(small: pl.DataFrame, parts: Sequence[TextPart], text_schema: dict[str, pl.DataType],
                  order: Sequence[str]) -> pl.LazyFrame:
    """``small`` with the text columns of ``text_schema`` added part by part when asked for,
    columns in ``order``. A predicate on ``step`` alone skips the parts of other steps."""
    from polars.io.plugins import register_io_source

    schema = {**small.schema, **text_schema}
    schema = {c: schema[c] for c in order}

    def source(with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None,
               batch_size: int | None) -> Iterator[pl.DataFrame]:
        cols = list(order) if with_columns is None else list(with_columns)
        need_text = any(c in text_schema for c in cols)
        left = n_rows
        for part in parts:
            if left is not None and left <= 0:
                return
            if predicate is not None and part.step is not None and _excludes(predicate, part.step):
                continue
            df = small.slice(part.offset, part.length)
            if need_text or (predicate is not None and _uses_text(predicate, text_schema)):
                df = df.hstack(part.texts().select(list(text_schema)))
            if predicate is not None:
                df = df.filter(predicate)
            df = df.select(cols)
            if left is not None:
                df = df.head(left)
                left -= df.height
            yield df

    return register_io_source(source, schema=schema)


def _excludes(predicate: pl.Expr, step: int) -> bool:
    """Whether ``predicate`` is false for every row of ``step`` (only when it reads ``step``
    alone; anything else cannot be decided here)."""
    try:
        return pl.DataFrame({"step": [step]}, schema={"step": pl.Int64}).filter(predicate).height == 0
    except Exception:  # noqa: BLE001 - the predicate reads other columns
        return False


def _uses_text(predicate: pl.Expr, text_schema: dict[str, pl.DataType]) -> bool:
    try:
        names = set(predicate.meta.root_names())
    except Exception:  # noqa: BLE001
        return True
    return bool(names & set(text_schema))


def map_files(fn: Callable[[T], R], jobs: Sequence[T], total_bytes: int, workers: int | None = None) -> list[R]:
    """``[fn(j) for j in jobs]``, on a process pool of ``workers`` (default: the CPUs this
    process may use, at most 8) when the files are large enough to pay for it; results in
    order, identical to the serial ones (``fn`` is pure per file)."""
    n = workers if workers is not None else min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                else (os.cpu_count() or 1))
    if n < 2 or len(jobs) < 2 or total_bytes < POOL_MIN_BYTES or os.environ.get("DIAGNOSE_SERIAL"):
        return [fn(j) for j in jobs]
    ctx = multiprocessing.get_context("spawn")  # polars is not fork-safe
    with ProcessPoolExecutor(min(n, len(jobs)), mp_context=ctx) as pool:
        return list(pool.map(fn, jobs, chunksize=1))


@dataclass
class RecordedIssues:
    """What reading one file found (the `IssueLog` calls a reader makes), kept to be replayed
    into the load's log in file order: reading files on a pool reports what reading them in a
    row reports."""

    adds: list[tuple[str, int | None, str, str | None]] = field(default_factory=list)
    nonfinite: NonFinite = field(default_factory=NonFinite)

    def add(self, path: Any, line: int | None, message: str, kind: str | None = None) -> None:
        self.adds.append((str(path), line, message, kind))

    def line_error(self, e: LineError, suffix: str = "line skipped") -> None:
        self._via(lambda log: log.line_error(e, suffix))

    def step_mismatch(self, path: Any, what: str, steps: Any, file_step: int, authority: str) -> None:
        self._via(lambda log: log.step_mismatch(path, what, steps, file_step, authority))

    def _via(self, call: Callable[[IssueLog], None]) -> None:
        log = IssueLog(per_file=1 << 30)
        call(log)
        for it in log.items:
            self.add(it.path, it.line, it.message, it.kind)

    def to_json(self) -> dict[str, Any]:
        return {"adds": self.adds, "nonfinite": [[list(k), v] for k, v in self.nonfinite._seen.items()]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RecordedIssues:
        out = cls([tuple(a) for a in data["adds"]])  # type: ignore[misc]
        out.nonfinite._seen = {tuple(k): list(v) for k, v in data["nonfinite"]}
        return out

    def replay(self, issues: IssueLog, nonfinite: NonFinite) -> None:
        for path, line, msg, kind in self.adds:
            issues.add(path, line, msg, kind)
        for (path, fld), (n, line, first) in self.nonfinite._seen.items():
            nonfinite._seen.setdefault((path, fld), [0, line, first])[0] += n


# ---------------------------------------------------------------------------------------------
# a memo of what reading each step file gave, across loads (the scan's incremental re-scan)
# ---------------------------------------------------------------------------------------------

_MEMO: ContextVar["FileMemo | None"] = ContextVar("diagnose_file_memo", default=None)
#: `keep_in_process`: per memo folder and salt, the entries this process has read or written
_KEPT: dict[tuple[str, str], dict[str, tuple[pl.DataFrame | None, str]]] | None = None


@dataclass
class FileMemo:
    """``<dir>/<key>.parquet`` + ``<key>.json``: one step file's small frame and the rest of what
    reading it gave (issues, ...), keyed by the file's path, size and mtime and by ``salt`` (the
    signal code and the load options): a re-scan reads only new or changed files. Plain Parquet
    and JSON (never pickle: the folder lies in the user's run). Entries not used by a load are
    removed at its end."""

    dir: Path
    salt: str
    used: set[str] = field(default_factory=set)
    #: entries already read or written in this process, ``key -> (frame, meta JSON)``, for a
    #: long-lived scanner (`keep_in_process`: ``diagnose watch`` re-scans the run at every new
    #: step and would otherwise re-read every entry's files each time); None: read from disk
    kept: dict[str, tuple[pl.DataFrame | None, str]] | None = None

    def key(self, path: Path, extra: Any = None) -> str | None:
        try:
            st = path.stat()
        except OSError:
            return None
        raw = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, self.salt, extra], default=str)
        return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    def get(self, key: str | None) -> tuple[pl.DataFrame | None, dict[str, Any]] | None:
        if key is None:
            return None
        if self.kept is not None and key in self.kept:  # the key names the step file's content: still valid
            frame, raw = self.kept[key]
            self.used.add(key)
            return frame, json.loads(raw)
        try:
            raw = (self.dir / f"{key}.json").read_text(encoding="utf-8")
            meta = json.loads(raw)
            frame = pl.read_parquet(self.dir / f"{key}.parquet") if meta.get("frame") else None
        except Exception:  # noqa: BLE001 - missing or damaged entry: read the file again
            return None
        self.used.add(key)
        if self.kept is not None:
            self.kept[key] = (frame, raw)
        return frame, meta

    def put(self, key: str | None, frame: pl.DataFrame | None, meta: dict[str, Any]) -> None:
        if key is None:
            return
        from diagnose.atomic import atomic_path, atomic_write_json

        if self.kept is not None:
            self.kept[key] = (frame, json.dumps({**meta, "frame": frame is not None}))

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if frame is not None:
                with atomic_path(self.dir / f"{key}.parquet", fsync=False) as tmp:
                    frame.write_parquet(tmp, compression="lz4")
            atomic_write_json(self.dir / f"{key}.json", {**meta, "frame": frame is not None}, indent=None, fsync=False)
            self.used.add(key)
        except OSError:  # a read-only run: no memo, nothing lost
            pass

    def prune(self) -> None:
        if self.kept is not None:
            for k in [k for k in self.kept if k not in self.used]:
                del self.kept[k]
        try:
            for f in self.dir.iterdir():
                if f.suffix in (".json", ".parquet") and f.stem not in self.used:
                    f.unlink(missing_ok=True)
        except OSError:
            pass


@contextmanager
def step_memo(directory: Path | None, salt: str) -> Iterator[None]:
    """Within the block, adapters that read step files one by one keep what each gave in
    ``directory`` (`FileMemo`) and reuse it while the file is unchanged; None: no memo."""
    kept = None if directory is None or _KEPT is None else _KEPT.setdefault((str(directory), salt), {})
    memo = None if directory is None else FileMemo(Path(directory), salt, kept=kept)
    token = _MEMO.set(memo)
    try:
        yield
    finally:
        _MEMO.reset(token)
        if memo is not None and memo.used:
            memo.prune()


def keep_in_process(on: bool = True) -> None:
    """Keep the memo's entries in this process too (``diagnose watch``): a re-scan then reads
    from disk only the entries of files it has not seen, instead of every entry each time."""
    global _KEPT
    _KEPT = (_KEPT if _KEPT is not None else {}) if on else None


def file_memo() -> FileMemo | None:
    """The memo set by `step_memo`, if any."""
    return _MEMO.get()


def memo_map(fn: Callable[[T], R], jobs: Sequence[T], paths: Sequence[Path], total_bytes: int,
             encode: Callable[[R], tuple[pl.DataFrame | None, dict[str, Any]]],
             decode: Callable[[pl.DataFrame | None, dict[str, Any]], R], extra: Any = None) -> list[R]:
    """`map_files` through the `file_memo`: files unchanged since the last load are not read."""
    memo = file_memo()
    if memo is None:
        return map_files(fn, jobs, total_bytes)
    keys = [memo.key(p, extra) for p in paths]
    hits = [memo.get(k) for k in keys]
    todo = [i for i, h in enumerate(hits) if h is None]
    size = sum(paths[i].stat().st_size for i in todo if paths[i].exists())
    fresh = dict(zip(todo, map_files(fn, [jobs[i] for i in todo], size)))
    out: list[R] = []
    for i, h in enumerate(hits):
        if h is not None:
            out.append(decode(*h))
        else:
            out.append(fresh[i])
            memo.put(keys[i], *encode(fresh[i]))
    return out
