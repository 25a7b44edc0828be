"""The scan cache: where it lives, what identifies the run and the code, reading and writing it.

    from diagnose.scan.cache import load_cached_scan
    load_cached_scan("runs/exp1")             # the last cached result, instantly (None if none)

`diagnose.scan.run.scan_run` decides what to recompute; this module is the store it uses.

Where: ``<run>/.diagnose/scan/`` when the run is a directory we may write to (any format),
else ``$DIAGNOSE_HOME/scan/<hash>/`` or ``~/.cache/collapse-diagnostics/scan/<hash>/`` (``hash``:
of the run's absolute path; e.g. a single conversation JSONL file, or a read-only run). A run
chosen by name in a folder of several (``run=``, ``--run NAME``: open-instruct's shared save
path, a TRL root, verl experiments) has its own: ``<folder>/.diagnose/runs/<name>/scan/``, or a
home cache whose hash covers the name too, so switching between runs never evicts one. The cache
directory is replaced as a whole (`diagnose.atomic.atomic_dir`): a reader sees the complete
old cache, the complete new one, or none.

What is in it (docs/scan.md, "Cache"):

* ``manifest.json``: versions and keys (see below), the load options, the adapter's fingerprint
  of the run (``{"format", "path", "files": {relative path: [size, mtime_ns]}}``) and the
  ``tree`` (size and mtime of every visible file under the run, the quick check);
* ``derived.parquet``: the rollout / token / probe-derived signals, one row per step (the
  incremental base);
* ``signals.parquet``: the full per-step signal table (derived + metrics), exactly what
  ``step_signals(src)`` returns;
* ``result.json``: the ScanResult JSON (``to_json()`` plus ``issues``);
* ``file_checks.json``: the adapter's validated step files (``RunSource.file_checks``).

Keys: ``signals_key`` (cache version, signal-code hash, ``DetectConfig.low_prob``, format, load
options): a change recomputes the signals; ``result_key`` (cache and JSON schema versions,
detection-code hash, the whole ``DetectConfig``): a change re-runs detection on the cached
signals. The code hashes are sha256 digests of the source files that compute signals (adapters,
turn classification, ``scan/signals.py``) and episodes (``scan/detect.py``, ``scan/episodes.py``),
so editing them never serves stale results.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from diagnose.atomic import atomic_dir, atomic_path, atomic_write_json, is_temp_name
from diagnose.scan.detect import DetectConfig
from diagnose.scan.result import SCHEMA_VERSION, CacheInfo, RunScanResult, result_from_json

__all__ = [
    "CACHE_SUBDIR",
    "CACHE_VERSION",
    "Cached",
    "cache_dir_candidates",
    "find_cache",
    "load_cached_scan",
    "write_cache",
]

#: Layout of the cache directory and of ``result.json``. A change re-runs detection (signals
#: are reused when their own key matches).
CACHE_VERSION = 1
#: Semantics of the cached signal tables (on top of the code hash): bump to force recomputation.
SIGNALS_VERSION = 1

CACHE_SUBDIR = Path(".diagnose") / "scan"
#: Caches of runs chosen by name (``run=``) inside their folder: ``RUNS_SUBDIR / <name> / "scan"``.
RUNS_SUBDIR = Path(".diagnose") / "runs"
MANIFEST = "manifest.json"
DERIVED = "derived.parquet"
SIGNALS = "signals.parquet"
RESULT = "result.json"
FILE_CHECKS = "file_checks.json"  # the adapter's validated step files (RunSource.file_checks)

#: The quick check walks at most this many files; a larger tree always loads the run.
MAX_TREE_FILES = 200_000

_SIGNAL_CODE = ("diagnose.scan.signals", "diagnose.scan.token_signals", "diagnose.scan.frames",
                "diagnose.scan.names", "diagnose.adapters", "diagnose.rundir", "diagnose.turns",
                "diagnose.transcripts", "diagnose.toolcall", "diagnose.conversations", "diagnose.jsonl",
                "diagnose.source", "diagnose.parquet_check",
                "diagnose.rescore.tables")  # the rescored tables attached to a source
_EPISODE_CODE = ("diagnose.scan.detect", "diagnose.scan.verdict", "diagnose.scan.episodes", "diagnose.scan.drops",
                 "diagnose.scan.moves", "diagnose.scan.implicated", "diagnose.scan.examples",
                 "diagnose.scan.pathologies", "diagnose.scan.series", "diagnose.scan.names", "diagnose.scan.result")


# ---------------------------------------------------------------------------------------------
# where, and what identifies the run
# ---------------------------------------------------------------------------------------------


def abs_path(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def run_root(path: Path) -> Path:
    """The run's root: a directory, or a single-file run (``run.json`` stands for its folder)."""
    if path.is_file() and path.name == "run.json":
        return path.parent
    return path


def home_cache_dir(root: Path, run: str | None = None) -> Path:
    base = os.environ.get("DIAGNOSE_HOME")
    home = Path(base).expanduser() if base else Path.home() / ".cache" / "collapse-diagnostics"
    key = str(root) if run is None else f"{root}\0run={run}"
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:20]
    return home / "scan" / digest


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,99}")


def run_dirname(run: str) -> str:
    """A run name as one safe folder name, distinct for distinct names: the name itself when
    plain, else percent-encoded (verl's ``project/experiment`` -> ``project%2Fexperiment``; a
    leading dot encoded too, so it is never hidden, ``.`` or ``..``); a long one is cut and
    given a hash suffix."""
    if _PLAIN_NAME.fullmatch(run):
        return run
    q = urllib.parse.quote(run, safe="")
    if q.startswith("."):
        q = "%2E" + q[1:]
    if len(q) > 100:
        q = q[:80] + "-" + hashlib.sha256(run.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return q


def cache_dir_candidates(path: str | os.PathLike[str], run: str | None = None) -> list[Path]:
    """Where the cache of the run at ``path`` may live, in lookup order: inside the run
    (directories only), then under ``$DIAGNOSE_HOME`` / ``~/.cache/collapse-diagnostics``.
    ``run``: the name of one run of several in the folder (the ``run`` load option), whose
    cache is its own (``<path>/.diagnose/runs/<name>/scan``)."""
    root = run_root(abs_path(path))
    out = []
    if root.is_dir():
        out.append(root / CACHE_SUBDIR if run is None else root / RUNS_SUBDIR / run_dirname(run) / "scan")
    out.append(home_cache_dir(root, run))
    return out


def run_tree(root: Path, extra: Iterable[str] = ()) -> dict[str, list[int]] | None:
    """``{relative path: [size, mtime_ns]}`` of every visible file under ``root`` (dot names
    and temp files skipped, symlinked folders not followed), plus the absolute paths
    ``extra``; None if there are more than MAX_TREE_FILES."""
    out: dict[str, list[int]] = {}
    try:
        if root.is_file():
            st = root.stat()
            out[root.name] = [st.st_size, st.st_mtime_ns]
        else:
            stack = [(root, "")]
            while stack:
                d, prefix = stack.pop()
                try:
                    entries = list(os.scandir(d))
                except OSError:
                    continue
                for e in entries:
                    if e.name.startswith(".") or is_temp_name(e.name):
                        continue
                    rel = prefix + e.name
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append((Path(e.path), rel + "/"))
                        elif e.is_file():
                            st = e.stat()
                            out[rel] = [st.st_size, st.st_mtime_ns]
                    except OSError:
                        continue
                    if len(out) > MAX_TREE_FILES:
                        return None
    except OSError:
        return None
    for p in extra:
        try:
            st = os.stat(p)
            out[p] = [st.st_size, st.st_mtime_ns]
        except OSError:
            out[p] = [-1, -1]
    return dict(sorted(out.items()))


_CODE_HASHES: dict[tuple[str, ...], str] = {}


def _code_hash(modules: tuple[str, ...]) -> str:
    """sha256 (first 16 hex) of the source files of ``modules`` (packages: all their .py, sub-packages
    included: an adapter is a package of its own under ``diagnose.adapters``)."""
    if modules in _CODE_HASHES:
        return _CODE_HASHES[modules]
    h = hashlib.sha256()
    for name in modules:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or spec.origin is None:
            h.update(f"{name}:missing".encode())
            continue
        origin = Path(spec.origin)
        files = sorted(origin.parent.rglob("*.py")) if spec.submodule_search_locations else [origin]
        for f in files:
            rel = f.relative_to(origin.parent).as_posix()
            try:
                h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
            except OSError:
                h.update(f"{rel}:unreadable".encode())
    _CODE_HASHES[modules] = h.hexdigest()[:16]
    return _CODE_HASHES[modules]


def signals_key(cfg: DetectConfig, fmt: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the cached signals depend on (``options``: the load options given, JSON form)."""
    return {"cache_version": CACHE_VERSION, "signals_version": SIGNALS_VERSION, "code": _code_hash(_SIGNAL_CODE),
            "low_prob": cfg.low_prob, "format": fmt, **({"options": dict(options)} if options else {})}


def result_key(cfg: DetectConfig) -> dict[str, Any]:
    """What the cached episodes depend on, given the signals."""
    return {"cache_version": CACHE_VERSION, "schema_version": SCHEMA_VERSION, "code": _code_hash(_EPISODE_CODE),
            "config": _canonical(cfg.to_dict())}


def _canonical(obj: Any) -> Any:
    """What JSON gives back (tuples -> lists, non-finite floats -> strings), for comparisons."""
    return json.loads(json.dumps(obj, default=str, allow_nan=True).replace("NaN", '"nan"'))




def changed_files(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = set(old) | set(new)
    return sorted(k for k in keys if old.get(k) != new.get(k))



# ---------------------------------------------------------------------------------------------
# reading / writing the cache
# ---------------------------------------------------------------------------------------------


@dataclass
class Cached:
    """A cache directory found for the run, with its manifest."""

    dir: Path
    manifest: dict[str, Any]

    def read_result(self) -> RunScanResult:
        data = json.loads((self.dir / RESULT).read_text(encoding="utf-8"))
        return result_from_json(data, _read_parquet(self.dir / SIGNALS))

    def read_derived(self) -> pl.DataFrame:
        return _read_parquet(self.dir / DERIVED)

    def file_checks(self, fmt: str | None) -> Any:
        """The file checks kept by the cache, for the same format; None if none or unreadable."""
        if fmt is not None and fmt != self.manifest.get("format"):
            return None
        try:
            return json.loads((self.dir / FILE_CHECKS).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return None


def _read_manifest(d: Path) -> Cached | None:
    try:
        m = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(m, dict) or m.get("cache_version") != CACHE_VERSION:
        return None
    return Cached(d, m)


def find_cache(root: Path, run: str | None = None) -> tuple[Cached | None, str]:
    """The first readable cache of the run (``run``: its name in a folder of several); with a
    reason when one exists but is unusable."""
    reason = ""
    for d in cache_dir_candidates(root, run):
        if not (d / MANIFEST).exists():
            continue
        c = _read_manifest(d)
        if c is None:
            reason = f"cache in {d} unreadable or of another version: rebuilt"
            continue
        if not d.is_relative_to(root / ".diagnose") and (
                c.manifest.get("root") != str(root) or (c.manifest.get("options") or {}).get("run") != run):
            continue  # a home cache of another path or run (hash collision)
        return c, ""
    return None, reason


def _read_parquet(path: Path) -> pl.DataFrame:
    df = pl.read_parquet(path)
    if "step" not in df.columns:
        raise ValueError(f"{path}: no step column")
    return df


def load_cached_scan(run_dir: str | os.PathLike[str], run: str | None = None) -> RunScanResult | None:
    """The last cached scan of the run at ``run_dir`` (a directory or a single-file run; ``run``:
    the name of one run of several there, as given to ``scan_run``), read from the cache only:
    nothing is recomputed and the run's files are not checked, so the result may be stale
    (`diagnose.scan.run.scan_run` brings it up to date). None when there is no readable cache."""
    root = run_root(abs_path(run_dir))
    c, _ = find_cache(root, run)
    if c is None:
        return None
    try:
        result = c.read_result()
    except Exception:  # noqa: BLE001 - any unreadable / inconsistent cache file: no cache
        return None
    result.cache = CacheInfo(dir=c.dir, hit=True, loaded_run=False, signals="cached", episodes="cached",
                             reason="read by load_cached_scan (not checked against the run's files)")
    return result


def write_cache(dirs: list[Path], manifest: dict[str, Any], derived: pl.DataFrame,
                 result: RunScanResult, file_checks: dict[str, Any] | None = None) -> tuple[Path | None, str | None]:
    """Write the whole cache directory atomically to the first of ``dirs`` that works."""
    error = None
    for d in dirs:
        try:
            d.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(d.parent, os.W_OK):
                raise PermissionError(f"{d.parent} is not writable")
            with atomic_dir(d, overwrite=True) as tmp:
                with atomic_path(tmp / DERIVED, fsync=False) as p:
                    derived.write_parquet(p)
                with atomic_path(tmp / SIGNALS, fsync=False) as p:
                    result.signals.write_parquet(p)
                atomic_write_json(tmp / RESULT, result.to_json(), indent=None, fsync=False)
                if file_checks:
                    atomic_write_json(tmp / FILE_CHECKS, file_checks, indent=None, fsync=False)
                atomic_write_json(tmp / MANIFEST, manifest, fsync=False)
            return d, None
        except OSError as e:
            error = f"{d}: {e.strerror or e}"
    return None, error


def why_stale(man: Mapping[str, Any], tree: Any, fmt: str | None, cfg: DetectConfig, rkey: Any, arg: str,
              options: Mapping[str, Any] | None = None) -> str:
    """Why the quick check failed, in words (for ``CacheInfo.reason``)."""
    if tree is None:
        return "run too large for the quick check"
    if fmt is not None and fmt != man.get("format"):
        return f"format {fmt} requested (cached: {man.get('format')})"
    if (man.get("options") or {}) != dict(options or {}):
        return "other load options (--metrics / --run / --tokenizer)"
    if man.get("signals_key") != signals_key(cfg, man.get("format", ""), options):
        return "signal code or low_prob changed"
    if man.get("result_key") != rkey:
        old = (man.get("result_key") or {}).get("config")
        return "detection config changed" if old != rkey["config"] else "detection code or cache version changed"
    if man.get("arg") != arg:
        return "run given by another path"
    old_tree = man.get("tree") or {}
    n = len(changed_files(old_tree, tree))
    return f"{n} file(s) with a new size or modification time"

