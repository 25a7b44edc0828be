"""Shared loaders of the dashboard: which runs exist under the root, and what the pages read.

Security model (docs/dashboard.md): the dashboard reads only run directories found under the
runs root it was started with. The page never supplies a path: the run picker offers the
relative names `discover_runs` found, and every path is resolved (symlinks followed) and
checked to stay under the root before anything is read (`resolve_run`). Nothing is unpickled:
runs are read through `diagnose` (JSON, JSON Lines, Parquet), tokenizers from ``tokenizer.json``
with the `tokenizers` library (plain JSON, no code).

Responsiveness: per-step aggregates come from the scan cache (`diagnose.scan.run.scan_run`
serves them from ``<run>/.diagnose/scan/`` and recomputes only new steps); token and rollout
tables are filtered to one step (and one sample) with polars lazy frames before anything is
collected, so a token table is never loaded whole or shipped to the browser. Loaders are
cached (``st.cache_resource`` / ``st.cache_data``) keyed by the run path and `run_stamp`, the
size and mtime of the run's top-level entries, which change when a step file is added.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import streamlit as st

from diagnose.adapters import adapter, detect_format, load_run
from diagnose.error_line import error_line
from diagnose.source import RunSource

ROOT_ENV = "DIAGNOSE_RUNS_ROOT"
DEFAULT_ROOT = "runs"
MAX_DEPTH = 3  # how deep under the root runs are looked for
MAX_DIRS = 5000  # directories visited at most while looking for runs
SKIP_DIRS = frozenset({"checkpoints", "__pycache__", "node_modules", "capability"})
MAX_TOKENS_SHOWN = 3000  # token rows of one rollout sent to the page at most
MAX_SAMPLES_LISTED = 2000  # rollouts of one step listed in the token viewer's picker at most


# ---------------------------------------------------------------------------------------------
# the runs root and the runs under it (pure functions: no streamlit state)
# ---------------------------------------------------------------------------------------------


def runs_root(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> Path:
    """The runs root: ``streamlit run dashboards/app.py -- ROOT`` (an argument after the
    script), else ``$DIAGNOSE_RUNS_ROOT`` (set by ``diagnose dashboard``), else ``./runs``;
    resolved to an absolute path."""
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    root = None
    if len(argv) > 1 and Path(argv[0]).name == "app.py":
        args = [a for a in argv[1:] if a != "--"]
        if args and not args[0].startswith("-"):
            root = args[0]
    root = root or environ.get(ROOT_ENV) or DEFAULT_ROOT
    try:
        return Path(root).expanduser().resolve()
    except (OSError, RuntimeError):  # a symlink loop: kept as given, discovery finds no run in it
        return Path(root).expanduser().absolute()


@dataclass(frozen=True)
class RunEntry:
    """A run found under the root: ``rel`` (its name relative to the root, ``.`` for the root
    itself), ``path`` (resolved) and ``format`` (as `diagnose.adapters.detect_format` sees it)."""

    rel: str
    path: Path
    format: str

    @property
    def label(self) -> str:
        return f"{self.rel}  ({self.format})"


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


_LAYOUT_DIR = re.compile(r"^(completions|checkpoint-\d+|checkpoints|rollouts|tokens|probe)$")


def _is_container(d: Path, fmt: str) -> bool:
    """A folder that an adapter recognises only through runs in its sub-folders (adapters look
    one folder down): no files of its own and at least two sub-folders that are runs. It is
    listed as its runs, not as one merged run."""
    if fmt == "native":
        return False
    runs_of = getattr(adapter(fmt), "runs", None)
    if runs_of is not None:  # the adapter knows its layout (verl: dump and metrics folders of one run)
        return len(runs_of(d)) >= 2
    try:
        entries = [e for e in os.scandir(d) if not e.name.startswith(".")]
    except OSError:
        return False
    if any(e.is_file() for e in entries):
        return False
    runs = 0
    for e in entries:
        if e.is_dir() and e.name not in SKIP_DIRS and not _LAYOUT_DIR.match(e.name) and detect_format(Path(e.path)):
            runs += 1
            if runs >= 2:
                return True
    return False


def discover_runs(root: Path, max_depth: int = MAX_DEPTH, max_dirs: int = MAX_DIRS) -> list[RunEntry]:
    """Run directories under ``root`` (the root itself included), breadth first, at most
    ``max_depth`` levels down. A directory that is a run is not looked into further; dot
    directories, ``checkpoints`` and symlinks leading outside the root are skipped."""
    try:
        root = root.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return []
    if not root.is_dir():
        return []
    found: list[RunEntry] = []
    queue: list[tuple[Path, int]] = [(root, 0)]
    visited = 0
    while queue and visited < max_dirs:
        d, depth = queue.pop(0)
        visited += 1
        try:
            real = d.resolve()
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
            continue
        if not _inside(real, root):
            continue
        fmt = detect_format(real)
        if fmt is not None and not _is_container(real, fmt):
            rel = "." if real == root else d.relative_to(root).as_posix()
            found.append(RunEntry(rel, real, fmt))
            continue
        if depth >= max_depth:
            continue
        try:
            children = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        for e in children:
            if e.name.startswith(".") or e.name in SKIP_DIRS:
                continue
            try:
                if e.is_dir():
                    queue.append((Path(e.path), depth + 1))
            except OSError:
                continue
    return sorted(found, key=lambda r: (r.rel != ".", r.rel))


class OutsideRoot(ValueError):
    """A run path that does not stay under the runs root."""


def resolve_run(root: Path, rel: str) -> Path:
    """``root / rel`` resolved; raises `OutsideRoot` unless it is a directory under ``root``."""
    root = root.resolve()
    if not rel or Path(rel).is_absolute():
        raise OutsideRoot(f"{rel!r}: not a run name under the runs root")
    try:
        p = (root / rel).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL in the name
        raise OutsideRoot(f"{rel!r}: not a run directory under the runs root ({e})") from None
    if not _inside(p, root) or not p.is_dir():
        raise OutsideRoot(f"{rel!r}: not a run directory under the runs root")
    link = link_outside(p, root)
    if link is not None:
        raise OutsideRoot(f"{rel!r}: {link[0].relative_to(p).as_posix()} is a symlink leading outside the runs root; "
                          "the run is not read")
    return p


def link_outside(run: Path, root: Path) -> tuple[Path, Path] | None:
    """The first symlink under ``run`` (not followed: directory entries only) whose target is
    outside ``root``, as ``(link, target)``; None when there is none.
    Why: a run's files are read by the adapters, which follow links; the check keeps the page
    from showing a byte from outside the root through a link inside a run."""
    for dirpath, dirnames, filenames in os.walk(run, followlinks=False):
        for name in dirnames + filenames:
            entry = Path(dirpath) / name
            if not entry.is_symlink():
                continue
            try:
                target = entry.resolve(strict=True)
            except (OSError, RuntimeError):  # a loop or a dangling link: nothing to read (the scan names it)
                continue
            if not _inside(target, root):
                return entry, target
    return None


def run_stamp(path: Path) -> tuple[tuple[str, int, int], ...]:
    """Cache key of a run's contents: (name, size, mtime_ns) of its visible top-level entries.
    Adding or replacing a step file changes its folder's mtime; appending to ``metrics.jsonl``
    changes its size. Dot entries (the scan cache itself) are left out."""
    out = []
    try:
        entries = list(os.scandir(path))
    except OSError:
        return ()
    for e in entries:
        if e.name.startswith("."):
            continue
        try:
            s = e.stat()
        except OSError:
            continue
        out.append((e.name, s.st_size, s.st_mtime_ns))
    return tuple(sorted(out))


# ---------------------------------------------------------------------------------------------
# results of loaders: a value or a message for the page (never an exception)
# ---------------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """What a loader returns: ``value``, or ``error`` (one line for the page) when it failed."""

    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def scan(path: Path) -> Loaded:
    """`diagnose.scan.run.scan_run` with the dashboard's error policy."""
    from diagnose.scan.run import scan_run

    try:
        return Loaded(scan_run(path))
    except Exception as e:  # noqa: BLE001 - any unreadable run is a message on the page
        return Loaded(error=error_line(e, limit=None))


def source(path: Path) -> Loaded:
    try:
        return Loaded(load_run(path))  # with rescored / live-probe tables attached
    except Exception as e:  # noqa: BLE001
        return Loaded(error=error_line(e, limit=None))


def capability(path: Path) -> Loaded:
    """``diagnose.capability.read_capability``: value None when the run was not probed."""
    from diagnose.capability import read_capability

    try:
        return Loaded(read_capability(path))
    except Exception as e:  # noqa: BLE001 - CapabilityReadError and anything else: a message
        return Loaded(error=error_line(e, limit=None))


def _table(src: RunSource, kind: str, steps: Iterable[int] | None) -> pl.LazyFrame | None:
    """One step table of the run, restricted to ``steps`` before anything is read. Native runs
    go through `RunReader` (only the step files asked for are opened)."""
    lf = getattr(src, kind)
    if lf is None:
        return None
    if steps is None:
        return lf
    steps = sorted({int(s) for s in steps})
    if src.format == "native":
        from diagnose.rundir import RunReader

        return RunReader(src.path).scan(kind, steps)
    return lf.filter(pl.col("step").is_in(steps))


def table_steps(src: RunSource, kind: str) -> list[int]:
    """Steps that have rows in a step table (``rollouts``, ``tokens``, ``probe``)."""
    if getattr(src, kind) is None:
        return []
    if src.format == "native":
        from diagnose.rundir import RunReader

        return RunReader(src.path).steps(kind)
    df = getattr(src, kind).select(pl.col("step").unique()).collect()
    return sorted(int(s) for s in df.get_column("step").to_list())


ROLLOUT_COLUMNS = ("step", "sample_id", "group_id", "reward", "accuracy", "n_turns", "turn_states", "error_types",
                   "is_hint", "is_off_policy")


def rollouts_at(src: RunSource, step: int, sample_ids: Sequence[int] | None = None,
                with_text: bool = True, limit: int = MAX_SAMPLES_LISTED) -> pl.DataFrame:
    """Rollouts of one step (optionally some samples only), sorted by sample id."""
    lf = _table(src, "rollouts", [step])
    if lf is None:
        return pl.DataFrame()
    names = lf.collect_schema().names()
    cols = [c for c in ROLLOUT_COLUMNS if c in names]
    if with_text:
        cols += [c for c in ("prompt", "completion") if c in names]
    lf = lf.filter(pl.col("step") == step)
    if sample_ids is not None:
        lf = lf.filter(pl.col("sample_id").is_in([int(s) for s in sample_ids]))
    return lf.select(cols).sort("sample_id").head(limit).collect()


def token_counts_at(src: RunSource, step: int) -> pl.DataFrame:
    """``sample_id``, ``n_tokens`` (generated) of one step's token table."""
    lf = _table(src, "tokens", [step])
    if lf is None:
        return pl.DataFrame(schema={"sample_id": pl.Int64, "n_tokens": pl.UInt32})
    return (lf.filter(pl.col("step") == step)
            .group_by("sample_id").agg(pl.col("is_generated").sum().alias("n_tokens"))
            .sort("sample_id").collect())


def token_rows(src: RunSource, step: int, sample_id: int, limit: int = MAX_TOKENS_SHOWN) -> pl.DataFrame:
    """The token rows of one rollout (sorted by position, at most ``limit``): the only token
    rows the dashboard ever collects."""
    lf = _table(src, "tokens", [step])
    if lf is None:
        return pl.DataFrame()
    return (lf.filter((pl.col("step") == step) & (pl.col("sample_id") == sample_id))
            .sort("position").head(limit).collect())


def find_tokenizer_file(run: Path) -> Path | None:
    """A ``tokenizer.json`` saved with the run (the run directory, or its newest checkpoint
    that has one), staying under the run directory."""
    cands = [run / "tokenizer.json"]
    ckpt = run / "checkpoints"
    if ckpt.is_dir():
        try:
            dirs = sorted((d for d in ckpt.iterdir() if d.is_dir() and not d.name.startswith(".")),
                          key=lambda d: d.name, reverse=True)
        except OSError:
            dirs = []
        cands += [d / "tokenizer.json" for d in dirs]
    for c in cands:
        try:
            if c.is_file() and _inside(c.resolve(), run.resolve()):
                return c
        except OSError:
            continue
    return None


def decode_tokens(tokenizer_file: Path | None, ids: Iterable[int],
                  control_tokens: Sequence[dict[str, Any]] = ()) -> dict[int, str]:
    """Text of each distinct token id: control tokens by their registered text, others by the
    run's tokenizer when there is one, else ``⟨id⟩``."""
    ids = sorted({int(i) for i in ids})
    out = {int(t["token_id"]): str(t.get("text") or t.get("name")) for t in control_tokens if "token_id" in t}
    tok = None
    if tokenizer_file is not None:
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tokenizer_file))
        except Exception:  # noqa: BLE001 - an unreadable tokenizer: ids only
            tok = None
    for i in ids:
        if i in out:
            continue
        text = None
        if tok is not None:
            try:
                text = tok.decode([i], skip_special_tokens=False)
            except Exception:  # noqa: BLE001
                text = None
        out[i] = text if text else f"⟨{i}⟩"
    return out


# ---------------------------------------------------------------------------------------------
# cached wrappers (keyed by path + stamp; the stamp is recomputed on every rerun, cheaply)
# ---------------------------------------------------------------------------------------------


@st.cache_data(ttl=30, show_spinner=False, max_entries=4)
def cached_runs(root: str) -> list[RunEntry]:
    return discover_runs(Path(root))


@st.cache_resource(show_spinner="Scanning the run (cached in <run>/.diagnose/scan/; new steps only next time)...",
                   max_entries=8)
def _cached_scan(path: str, stamp: tuple) -> Loaded:  # noqa: ARG001 - stamp is the cache key
    return scan(Path(path))


@st.cache_resource(show_spinner=False, max_entries=8)
def _cached_source(path: str, stamp: tuple) -> Loaded:  # noqa: ARG001
    return source(Path(path))


@st.cache_data(show_spinner=False, max_entries=16)
def _cached_capability(path: str, stamp: tuple) -> Loaded:  # noqa: ARG001
    return capability(Path(path))


def load_scan(path: Path) -> Loaded:
    return _cached_scan(str(path), run_stamp(path))


def load_source(path: Path) -> Loaded:
    return _cached_source(str(path), run_stamp(path))


def load_capability(path: Path) -> Loaded:
    return _cached_capability(str(path), run_stamp(path))


@st.cache_data(show_spinner=False, max_entries=16)
def cached_table_steps(path: str, stamp: tuple, kind: str) -> list[int]:
    src = _cached_source(path, stamp)
    return table_steps(src.value, kind) if src.ok else []


@st.cache_data(show_spinner=False, max_entries=32)
def cached_rollouts_at(path: str, stamp: tuple, step: int, sample_ids: tuple[int, ...] | None = None,
                       with_text: bool = True) -> pl.DataFrame:
    src = _cached_source(path, stamp)
    return rollouts_at(src.value, step, sample_ids, with_text) if src.ok else pl.DataFrame()


@st.cache_data(show_spinner=False, max_entries=32)
def cached_token_counts(path: str, stamp: tuple, step: int) -> pl.DataFrame:
    src = _cached_source(path, stamp)
    return token_counts_at(src.value, step) if src.ok else pl.DataFrame()


@st.cache_data(show_spinner=False, max_entries=32)
def cached_token_rows(path: str, stamp: tuple, step: int, sample_id: int) -> pl.DataFrame:
    src = _cached_source(path, stamp)
    return token_rows(src.value, step, sample_id) if src.ok else pl.DataFrame()


@st.cache_data(show_spinner=False, max_entries=32)
def cached_decode(path: str, stamp: tuple, ids: tuple[int, ...]) -> dict[int, str]:
    src = _cached_source(path, stamp)
    ctrl = src.value.control_tokens if src.ok else []
    return decode_tokens(find_tokenizer_file(Path(path)), ids, ctrl)


def clear_caches() -> None:
    st.cache_data.clear()
    st.cache_resource.clear()
