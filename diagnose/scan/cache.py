"""Scan results cached with the run, recomputed incrementally.

    from diagnose.scan.cache import scan_run, load_cached_scan
    result = scan_run("runs/exp1")            # loads, scans, caches; a re-scan only redoes what changed
    result.cache.hit                          # True: served from the cache (run not even loaded)
    load_cached_scan("runs/exp1")             # the last cached result, instantly (None if none)

Where: ``<run>/.diagnose/scan/`` when the run is a directory we may write to (any format),
else ``$DIAGNOSE_HOME/scan/<hash>/`` or ``~/.cache/collapse-diagnostics/scan/<hash>/`` (``hash``:
of the run's absolute path; e.g. a single conversation JSONL file, or a read-only run). The cache
directory is replaced as a whole (`diagnose.atomic.atomic_dir`): a reader sees the complete
old cache, the complete new one, or none.

What is in it (docs/scan.md, "Cache"):

* ``manifest.json``: versions and keys (see below), the adapter's fingerprint of the run
  (``{"format", "path", "files": {relative path: [size, mtime_ns]}}``) and the ``tree`` (size and
  mtime of every visible file under the run, the quick check);
* ``derived.parquet``: the rollout / token / probe-derived signals, one row per step (the
  incremental base);
* ``signals.parquet``: the full per-step signal table (derived + metrics), exactly what
  ``step_signals(src)`` returns;
* ``result.json``: the ScanResult JSON (``to_json()`` plus ``issues``).

Re-scan, cheapest first:

1. the ``tree`` is unchanged and the keys match: the cached result is returned without loading
   the run (``cache.hit``);
2. else the run is loaded; files whose fingerprint changed (new, modified, removed) are mapped
   to steps where the layout names them (``native`` ``rollouts|tokens|probe/step-NNNNNN.parquet``,
   TRL ``completions_<step>.parquet``, verl ``<step>.jsonl``, conversation ``<step>.jsonl`` /
   ``step_<step>.jsonl`` / ``step-NNNNNN.jsonl``) and only those steps' derived signals are
   recomputed (`step_signals(src, steps=...)`, merged with `merge_signals`); metrics files
   (``metrics.jsonl``, ``trainer_state.json``, verl's metrics JSONL) only need the metrics
   layer, which is always recomputed in full (cheap); any other changed file (``run.json``,
   a single conversation file, open-instruct traces, whose file names do not bind their
   steps) or a file/step mismatch reported by the adapter recomputes all derived signals;
3. episodes and pathologies are always re-detected when anything was recomputed (cheap).

Keys: ``signals_key`` (cache version, signal-code hash, ``DetectConfig.low_prob``, format): a
change recomputes the signals; ``result_key`` (cache and JSON schema versions, detection-code
hash, the whole ``DetectConfig``): a change re-runs detection on the cached signals. The code
hashes are sha256 digests of the source files that compute signals (adapters, turn
classification, ``scan/signals.py``) and episodes (``scan/detect.py``, ``scan/episodes.py``),
so editing them never serves stale results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl

from diagnose import __version__
from diagnose.atomic import atomic_dir, atomic_path, atomic_write_json, is_temp_name
from diagnose.scan.detect import Change, DetectConfig
from diagnose.scan.episodes import (
    SCHEMA_VERSION,
    CollapseEpisode,
    ContextRise,
    ImplicatedToken,
    Pathology,
    PriorScan,
    RolloutExample,
    ScanResult,
    SignalMove,
    scan_source,
)
from diagnose.scan.signals import combine_signals, merge_signals, metric_signals, step_signals
from diagnose.source import RunSource, SourceIssue

__all__ = [
    "CACHE_VERSION",
    "CacheInfo",
    "Progress",
    "RunScanResult",
    "cache_dir_candidates",
    "load_cached_scan",
    "result_from_json",
    "scan_run",
]

#: Layout of the cache directory and of ``result.json``. A change re-runs detection (signals
#: are reused when their own key matches).
CACHE_VERSION = 1
#: Semantics of the cached signal tables (on top of the code hash): bump to force recomputation.
SIGNALS_VERSION = 1

CACHE_SUBDIR = Path(".diagnose") / "scan"
MANIFEST = "manifest.json"
DERIVED = "derived.parquet"
SIGNALS = "signals.parquet"
RESULT = "result.json"
FILE_CHECKS = "file_checks.json"  # the adapter's validated step files (RunSource.file_checks)

#: Chunking of the signal computation when a progress callback is given (one chunk is about
#: this many bytes of step files; chunks cost ~0.1 s of fixed overhead each).
CHUNK_BYTES = 48 * 1024 * 1024
MAX_CHUNKS = 20
#: The quick check walks at most this many files; a larger tree always loads the run.
MAX_TREE_FILES = 200_000

#: ``progress(stage, done, total)``: stage is ``load`` (total None), ``signals`` (chunks) or
#: ``detect``; called with done=0 at the start of a stage and done=total at its end.
Progress = Callable[[str, int, "int | None"], None]

_SIGNAL_CODE = ("diagnose.scan.signals", "diagnose.adapters", "diagnose.rundir.reader", "diagnose.turns",
                "diagnose.toolcall", "diagnose.conversations", "diagnose.jsonl", "diagnose.source")
_EPISODE_CODE = ("diagnose.scan.detect", "diagnose.scan.episodes")
_MISMATCH = "but the file name says"  # adapters' wording of a file-name / data step mismatch


# ---------------------------------------------------------------------------------------------
# result types
# ---------------------------------------------------------------------------------------------


@dataclass
class CacheInfo:
    """How a result was obtained. ``signals``: ``cached`` | ``incremental`` | ``full`` |
    ``off``; ``steps_recomputed``: the steps whose derived signals were recomputed (None: all
    of them, or none when ``signals == "cached"``); ``episodes``: ``cached`` | ``computed``."""

    enabled: bool = True
    dir: Path | None = None
    hit: bool = False  # served entirely from the cache (the run was not loaded)
    loaded_run: bool = True
    signals: str = "full"
    steps_recomputed: list[int] | None = None
    episodes: str = "computed"
    reason: str = ""
    written: bool = False
    write_error: str | None = None

    def describe(self) -> str:
        if not self.enabled:
            return "cache disabled (--no-cache)"
        if self.hit:
            return f"served from the cache ({self.dir})"
        if self.signals == "cached" and self.episodes == "cached":
            # the quick check saw files touched (size or mtime, the reason says how many); their
            # content fingerprints had not changed, so nothing was recomputed: one statement
            return ("nothing recomputed: " + (self.reason or "the run was re-read") + ", but no file's content changed"
                    + (f"; cached in {self.dir}" if self.written else ""))
        elif self.signals == "cached":
            what = "step signals from the cache; metrics re-read and detection re-run"
        elif self.signals == "incremental":
            steps = self.steps_recomputed or []
            shown = ", ".join(map(str, steps[:6])) + (", ..." if len(steps) > 6 else "")
            what = f"recomputed {len(steps)} step(s) ({shown})"
        else:
            what = "computed in full"
        why = f"; {self.reason}" if self.reason else ""
        where = (f"; cached in {self.dir}" if self.written else
                 f"; not cached ({self.write_error})" if self.write_error else "")
        return what + why + where


@dataclass
class RunScanResult(ScanResult):
    """A `ScanResult` with what the adapter could not read (``issues``) and how the result was
    obtained (``cache``). ``to_json`` adds ``issues``."""

    issues: list[SourceIssue] = field(default_factory=list)
    cache: CacheInfo = field(default_factory=CacheInfo)

    def to_json(self, include_signals: bool = False) -> dict[str, Any]:
        base = super().to_json(include_signals=include_signals)
        out: dict[str, Any] = {}
        for k, v in base.items():
            out[k] = v
            if k == "notes":
                out["issues"] = [issue_to_dict(i) for i in self.issues]
        out.setdefault("issues", [issue_to_dict(i) for i in self.issues])
        return out


def issue_to_dict(i: SourceIssue) -> dict[str, Any]:
    return {"path": str(i.path), "line": i.line, "message": i.message}


# ---------------------------------------------------------------------------------------------
# JSON -> result
# ---------------------------------------------------------------------------------------------


def _fl(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _opt(v: Any) -> float | None:
    return None if v is None else float(v)


def _change(d: Mapping[str, Any]) -> Change:
    return Change(int(d["step"]), d["method"], d["direction"], _fl(d.get("score")), int(d["alarm_step"]),
                  _fl(d.get("baseline")))


def _move(d: Mapping[str, Any]) -> SignalMove:
    return SignalMove(d["signal"], int(d["step"]), int(d["lead"]), d["direction"], d["method"], _fl(d.get("score")),
                      int(d["alarm_step"]), _fl(d.get("before")), _fl(d.get("after")), bool(d["concern"]))


def _rise(d: Mapping[str, Any]) -> ContextRise:
    return ContextRise(d["context"], d["source"], d["signal"], _fl(d.get("before")), _fl(d.get("after")),
                       _fl(d.get("ratio")), d.get("step"), d.get("lead"), bool(d["signature"]))


def _token(d: Mapping[str, Any]) -> ImplicatedToken:
    return ImplicatedToken(d["token"], d.get("role"), d.get("text"), _fl(d.get("score")),
                           [_rise(c) for c in d.get("contexts", [])], _opt(d.get("attribution_before")),
                           _opt(d.get("attribution_after")))


def _example(d: Mapping[str, Any]) -> RolloutExample:
    return RolloutExample(int(d["step"]), int(d["sample_id"]), d.get("group_id"), _opt(d.get("reward")),
                          d.get("turn_states"), d.get("excerpt"))


def _episode(d: Mapping[str, Any]) -> CollapseEpisode:
    sev = d.get("severity") or {}
    return CollapseEpisode(
        signal=d["signal"], onset_step=int(d["onset_step"]), detected_step=int(d["detected_step"]),
        trough_step=int(d["trough_step"]), recovery_step=d.get("recovery_step"), end_step=int(d["end_step"]),
        pre_level=_fl(d.get("pre_level")), peak=_fl(d.get("peak")), trough_value=_fl(d.get("trough_value")),
        relative_drop=_fl(sev.get("relative_drop")), collapsed_share_at_trough=_opt(sev.get("collapsed_share_at_trough")),
        onset_changes=[_change(c) for c in d.get("onset_changes", [])], moves=[_move(m) for m in d.get("moves", [])],
        implicated=[_token(t) for t in d.get("implicated", [])],
        examples_before=[_example(e) for e in d.get("examples_before", [])],
        examples_after=[_example(e) for e in d.get("examples_after", [])],
    )


def _pathology(d: Mapping[str, Any]) -> Pathology:
    return Pathology(d["kind"], d["signal"], int(d["first_step"]), int(d["last_step"]), int(d["n_steps"]),
                     _opt(d.get("baseline")), _opt(d.get("value")), d["message"])


def _config(d: Mapping[str, Any] | None) -> DetectConfig:
    names = {f.name for f in dataclasses.fields(DetectConfig)}
    return DetectConfig(**{k: v for k, v in (d or {}).items() if k in names})


def result_from_json(data: Mapping[str, Any], signals: pl.DataFrame | None = None) -> RunScanResult:
    """Rebuild a result from its JSON (``ScanResult.to_json()``, with or without ``issues``).
    ``signals``: the signal table (else the JSON's ``signals`` if present, else empty).
    ``result_from_json(r.to_json(), r.signals).to_json() == r.to_json()``."""
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"schema_version {data.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    if signals is None:
        if isinstance(data.get("signals"), Mapping):
            cols = data["signals"].get("columns", [])
            sig = data["signals"].get("data", {})
            signals = pl.DataFrame({c: sig.get(c, []) for c in cols}, schema={
                c: (pl.Int64 if c == "step" else pl.Float64) for c in cols})
        else:
            signals = pl.DataFrame(schema={"step": pl.Int64})
    src = data.get("source") or {}
    return RunScanResult(
        signals=signals, episodes=[_episode(e) for e in data.get("episodes", [])],
        pathologies=[_pathology(p) for p in data.get("pathologies", [])], verdict=data["verdict"],
        notes=list(data.get("notes", [])), primary_signal=data.get("primary_signal"), source_path=src.get("path"),
        source_format=src.get("format"), config=_config(data.get("config")),
        issues=[SourceIssue(str(i["path"]), i.get("line"), str(i["message"])) for i in data.get("issues", [])],
    )


# ---------------------------------------------------------------------------------------------
# where, and what identifies the run
# ---------------------------------------------------------------------------------------------


def _abs(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _root(path: Path) -> Path:
    """The run's root: a directory, or a single-file run (``run.json`` stands for its folder)."""
    if path.is_file() and path.name == "run.json":
        return path.parent
    return path


def home_cache_dir(root: Path) -> Path:
    base = os.environ.get("DIAGNOSE_HOME")
    home = Path(base).expanduser() if base else Path.home() / ".cache" / "collapse-diagnostics"
    digest = hashlib.sha256(str(root).encode("utf-8", "surrogatepass")).hexdigest()[:20]
    return home / "scan" / digest


def cache_dir_candidates(path: str | os.PathLike[str]) -> list[Path]:
    """Where the cache of the run at ``path`` may live, in lookup order: inside the run
    (directories only), then under ``$DIAGNOSE_HOME`` / ``~/.cache/collapse-diagnostics``."""
    root = _root(_abs(path))
    out = []
    if root.is_dir():
        out.append(root / CACHE_SUBDIR)
    out.append(home_cache_dir(root))
    return out


def _tree(root: Path, extra: Iterable[str] = ()) -> dict[str, list[int]] | None:
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
    """sha256 (first 16 hex) of the source files of ``modules`` (packages: all their .py)."""
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
        files = sorted(origin.parent.glob("*.py")) if spec.submodule_search_locations else [origin]
        for f in files:
            try:
                h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
            except OSError:
                h.update(f"{f.name}:unreadable".encode())
    _CODE_HASHES[modules] = h.hexdigest()[:16]
    return _CODE_HASHES[modules]


def _signals_key(cfg: DetectConfig, fmt: str) -> dict[str, Any]:
    return {"cache_version": CACHE_VERSION, "signals_version": SIGNALS_VERSION, "code": _code_hash(_SIGNAL_CODE),
            "low_prob": cfg.low_prob, "format": fmt}


def _result_key(cfg: DetectConfig) -> dict[str, Any]:
    return {"cache_version": CACHE_VERSION, "schema_version": SCHEMA_VERSION, "code": _code_hash(_EPISODE_CODE),
            "config": _canonical(cfg.to_dict())}


def _canonical(obj: Any) -> Any:
    """What JSON gives back (tuples -> lists, non-finite floats -> strings), for comparisons."""
    return json.loads(json.dumps(obj, default=str, allow_nan=True).replace("NaN", '"nan"'))


# ---------------------------------------------------------------------------------------------
# which steps a file holds
# ---------------------------------------------------------------------------------------------

_NATIVE_STEP = re.compile(r"^(rollouts|tokens|probe)/step-(\d+)\.parquet$")
_TRL_STEP = re.compile(r"(?:^|/)completions_(\d+)\.parquet$")
_VERL_STEP = re.compile(r"(?:^|/)(\d+)\.jsonl$")
_CONV_STEP = re.compile(r"(?:^|/)(?:step[_-]?)?(\d+)\.jsonl$")


def file_role(fmt: str, rel: str, single_file: bool) -> int | str:
    """What a fingerprint file holds: a step (int), ``"metrics"`` (only the metrics layer
    depends on it) or ``"global"`` (any step may depend on it)."""
    rel = rel.replace(os.sep, "/")
    name = rel.rsplit("/", 1)[-1]
    if fmt == "native":
        m = _NATIVE_STEP.match(rel)
        if m:
            return int(m.group(2))
        return "metrics" if rel == "metrics.jsonl" else "global"
    if fmt == "trl":
        m = _TRL_STEP.search(rel)
        if m:
            return int(m.group(1))
        return "metrics" if name == "trainer_state.json" else "global"
    if fmt == "verl":
        m = _VERL_STEP.search(rel)
        if m:
            return int(m.group(1))
        return "metrics" if name.endswith(".jsonl") else "global"
    if fmt == "conversations" and not single_file:
        m = _CONV_STEP.search(rel)
        return int(m.group(1)) if m else "global"
    return "global"  # open_instruct: a trace file's name does not bind its lines' steps


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = set(old) | set(new)
    return sorted(k for k in keys if old.get(k) != new.get(k))


# ---------------------------------------------------------------------------------------------
# signals: derived layer (incremental) + metrics layer (always in full)
# ---------------------------------------------------------------------------------------------


def _fill_counts(df: pl.DataFrame) -> pl.DataFrame:
    """After a merge, counts that `step_signals` reports as 0 (not null) where the step has the
    table: ``format_error/*`` where the step has turns, ``ctx/*/n`` where it has tokens (a type
    or context first seen in new steps is absent from old rows)."""
    fills = []
    if "turn_state/healthy_call" in df.columns:
        has = pl.col("turn_state/healthy_call").is_not_null()
        fills += [pl.when(has & pl.col(c).is_null()).then(pl.lit(0.0)).otherwise(pl.col(c)).alias(c)
                  for c in df.columns if c.startswith("format_error/")]
    if "n_tokens" in df.columns:
        has = pl.col("n_tokens").is_not_null()
        fills += [pl.when(has & pl.col(c).is_null()).then(pl.lit(0.0)).otherwise(pl.col(c)).alias(c)
                  for c in df.columns if c.startswith("ctx/") and c.endswith("/n")]
    return df.with_columns(fills) if fills else df


def _source_steps(src: RunSource) -> list[int]:
    steps: set[int] = set()
    for lf in (src.rollouts, src.tokens, src.probe):
        if lf is None or "step" not in lf.collect_schema():
            continue
        steps.update(lf.select(pl.col("step").cast(pl.Int64).unique()).collect(engine="streaming")
                     .get_column("step").drop_nulls().to_list())
    return sorted(steps)


def _derived_signals(src: RunSource, steps: list[int] | None, cfg: DetectConfig, size_bytes: int,
                     progress: Progress | None) -> pl.DataFrame:
    """`step_signals` of the source without its metrics, for ``steps`` (None: all), in chunks
    (with progress) when a progress callback is given and the step files are large."""
    derived_src = dataclasses.replace(src, metrics=None)
    n_chunks = min(MAX_CHUNKS, size_bytes // CHUNK_BYTES) if progress is not None else 0
    if n_chunks >= 2:
        todo = steps if steps is not None else _source_steps(src)
        n_chunks = min(n_chunks, len(todo))
        if n_chunks >= 2:
            out: pl.DataFrame | None = None
            progress("signals", 0, n_chunks)
            for i in range(n_chunks):
                part = todo[i * len(todo) // n_chunks:(i + 1) * len(todo) // n_chunks]
                out = merge_signals(out, step_signals(derived_src, part, low_prob=cfg.low_prob))
                progress("signals", i + 1, n_chunks)
            return _fill_counts(out) if out is not None else pl.DataFrame(schema={"step": pl.Int64})
    if progress is not None:
        progress("signals", 0, 1)
    out = step_signals(derived_src, steps, low_prob=cfg.low_prob)
    if progress is not None:
        progress("signals", 1, 1)
    return out


# ---------------------------------------------------------------------------------------------
# reading / writing the cache
# ---------------------------------------------------------------------------------------------


@dataclass
class _Cached:
    dir: Path
    manifest: dict[str, Any]


def _read_manifest(d: Path) -> _Cached | None:
    try:
        m = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(m, dict) or m.get("cache_version") != CACHE_VERSION:
        return None
    return _Cached(d, m)


def _find_cache(root: Path) -> tuple[_Cached | None, str]:
    """The first readable cache of the run; with a reason when one exists but is unusable."""
    reason = ""
    for d in cache_dir_candidates(root):
        if not (d / MANIFEST).exists():
            continue
        c = _read_manifest(d)
        if c is None:
            reason = f"cache in {d} unreadable or of another version: rebuilt"
            continue
        if d.parent.parent != root and c.manifest.get("root") != str(root):
            continue  # a home cache of another path (hash collision)
        return c, ""
    return None, reason


def _read_file_checks(c: _Cached | None, fmt: str | None) -> Any:
    """The file checks kept by the cache, for the same format; None if none or unreadable."""
    if c is None or (fmt is not None and fmt != c.manifest.get("format")):
        return None
    try:
        return json.loads((c.dir / FILE_CHECKS).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _read_parquet(path: Path) -> pl.DataFrame:
    df = pl.read_parquet(path)
    if "step" not in df.columns:
        raise ValueError(f"{path}: no step column")
    return df


def _read_result(c: _Cached) -> RunScanResult:
    data = json.loads((c.dir / RESULT).read_text(encoding="utf-8"))
    return result_from_json(data, _read_parquet(c.dir / SIGNALS))


def load_cached_scan(run_dir: str | os.PathLike[str]) -> RunScanResult | None:
    """The last cached scan of the run at ``run_dir`` (a directory or a single-file run), read
    from the cache only: nothing is recomputed and the run's files are not checked, so the
    result may be stale (``scan_run`` brings it up to date). None when there is no readable
    cache."""
    root = _root(_abs(run_dir))
    c, _ = _find_cache(root)
    if c is None:
        return None
    try:
        result = _read_result(c)
    except Exception:  # noqa: BLE001 - any unreadable / inconsistent cache file: no cache
        return None
    result.cache = CacheInfo(dir=c.dir, hit=True, loaded_run=False, signals="cached", episodes="cached",
                             reason="read by load_cached_scan (not checked against the run's files)")
    return result


def _write_cache(dirs: list[Path], manifest: dict[str, Any], derived: pl.DataFrame,
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


# ---------------------------------------------------------------------------------------------
# the scan
# ---------------------------------------------------------------------------------------------


def _wrap(res: ScanResult, issues: list[SourceIssue], info: CacheInfo) -> RunScanResult:
    fields = {f.name: getattr(res, f.name) for f in dataclasses.fields(ScanResult)}
    return RunScanResult(**fields, issues=list(issues), cache=info)


def scan_run(path: str | os.PathLike[str], *, format: str | None = None,  # noqa: A002
             cfg: DetectConfig | None = None, use_cache: bool = True,
             progress: Progress | None = None) -> RunScanResult:
    """Scan the run at ``path`` (any layout `diagnose.adapters.load_run` reads; ``format``
    forces one), reusing and updating its cache unless ``use_cache`` is False.

    Raises `diagnose.adapters.UnknownRunLayout` (no such path, no known layout) and
    `diagnose.rundir.RunFormatError` (a native run of a newer format version). Unreadable
    files inside the run are ``issues`` of the result, never errors. ``progress``: see
    `Progress`; with it, large step tables are processed in chunks to report progress.
    """
    from diagnose.adapters import FORMATS, UnknownRunLayout, load_run

    cfg = cfg or DetectConfig()
    if format == "auto":
        format = None  # noqa: A001
    arg = _abs(path)
    try:
        exists = arg.exists()
    except OSError as e:
        raise UnknownRunLayout(arg, f"cannot access ({e})") from None
    if not exists:
        raise UnknownRunLayout(arg, "no such file or directory", [format] if format else FORMATS)
    root = _root(arg)
    info = CacheInfo(enabled=use_cache)
    cached: _Cached | None = None
    if use_cache:
        cached, info.reason = _find_cache(root)
    man = cached.manifest if cached else {}
    rkey = _result_key(cfg)

    # 1. quick check: nothing changed on disk -> the cached result, without loading the run.
    # The tree is taken before loading: whatever changes during the load shows next time.
    tree = None
    if use_cache:
        old_fp = man.get("fingerprint") or {}
        tree = _tree(root, [k for k in (old_fp.get("files") or {}) if os.path.isabs(k)])
    if cached is not None:
        fmt_ok = format is None or format == man.get("format")
        if (tree is not None and tree == man.get("tree") and fmt_ok
                and man.get("signals_key") == _signals_key(cfg, man.get("format", ""))
                and man.get("result_key") == rkey and man.get("arg") == str(arg)):
            try:
                result = _read_result(cached)
            except Exception as e:  # noqa: BLE001 - a corrupt cache file: recompute
                info.reason = f"cache unreadable ({type(e).__name__}): rebuilt"
            else:
                info.dir, info.hit, info.loaded_run = cached.dir, True, False
                info.signals, info.episodes, info.reason = "cached", "cached", ""
                result.cache = info
                return result
        else:
            info.reason = _why_stale(man, tree, format, cfg, rkey, str(arg))

    # 2. load the run
    if progress is not None:
        progress("load", 0, None)
    src = load_run(arg, format=format, file_checks=_read_file_checks(cached, format))
    if progress is not None:
        progress("load", 1, 1)
    fp = src.fingerprint()
    files = fp.get("files", {})
    skey = _signals_key(cfg, src.format)
    single_file = root.is_file()

    derived: pl.DataFrame | None = None
    changed: list[str] | None = None  # fingerprint files changed since the cache (None: unknown)
    if cached is not None and man.get("signals_key") == skey and (man.get("fingerprint") or {}).get("format") == src.format:
        try:
            old = _fill_counts(_read_parquet(cached.dir / DERIVED))
        except Exception as e:  # noqa: BLE001
            info.reason = f"cache unreadable ({type(e).__name__}): rebuilt"
        else:
            changed = _changed((man.get("fingerprint") or {}).get("files", {}), files)
            roles = [file_role(src.format, rel, single_file) for rel in changed]
            mismatch = any(_MISMATCH in i.message for i in src.issues)
            if "global" in roles or mismatch:
                info.reason = (info.reason + "; " if info.reason else "") + (
                    "a file/step mismatch in the run" if mismatch else
                    f"{sum(r == 'global' for r in roles)} run-wide file(s) changed")
            else:
                steps = sorted({r for r in roles if isinstance(r, int)})
                if not steps:
                    derived = old
                    info.signals = "cached"
                else:
                    size = sum(files.get(rel, [0])[0] for rel in changed if rel in files)
                    new = _derived_signals(src, steps, cfg, size, progress)
                    keep = old.filter(~pl.col("step").is_in(pl.Series(steps, dtype=pl.Int64).implode()))
                    derived = _fill_counts(merge_signals(keep, new))
                    info.signals, info.steps_recomputed = "incremental", steps
    elif cached is not None and not info.reason:
        info.reason = "signal code, low_prob or format changed"
    if derived is None:
        size = sum(v[0] for v in files.values() if isinstance(v, list) and v)
        derived = _derived_signals(src, None, cfg, size, progress)
        info.signals, info.steps_recomputed = "full", None
    if not use_cache:
        info.signals = "off"

    # 3. metrics layer (always in full), episodes
    metrics = metric_signals(src.metrics) if src.metrics is not None else None
    signals = combine_signals(derived, metrics)
    reuse = cached is not None and changed == [] and man.get("result_key") == rkey
    result: RunScanResult | None = None
    if reuse:
        try:
            result = _read_result(cached)
            result.signals = signals
            result.issues = list(src.issues)
            info.episodes = "cached"
        except Exception:  # noqa: BLE001
            result = None
    if result is None:
        if progress is not None:
            progress("detect", 0, 1)
        prior = None
        if cached is not None and man.get("result_key") == rkey:  # same config and detection code
            try:
                old_result = _read_result(cached)
                prior = PriorScan(old_result.signals, old_result.episodes)
            except Exception:  # noqa: BLE001 - an unreadable cache: nothing to reuse
                prior = None
        result = _wrap(scan_source(src, cfg, signals=signals, prior=prior), src.issues, info)
        if progress is not None:
            progress("detect", 1, 1)
        info.episodes = "computed"
    result.cache = info

    if use_cache:
        if tree is not None:
            # a file whose stat changed between the tree walk and the adapter's fingerprint may
            # have been read half old, half new: recorded as unknown, so it is redone next time
            for k in [k for k in files if os.path.isabs(k) and k not in tree]:
                try:
                    st = os.stat(k)
                    tree[k] = [st.st_size, st.st_mtime_ns]
                except OSError:
                    tree[k] = [-1, -1]
            fp = {**fp, "files": {rel: (st if tree.get(rel.replace(os.sep, "/")) == st else [-1, -1])
                                  for rel, st in files.items()}}
        manifest = {
            "cache_version": CACHE_VERSION, "package_version": __version__,
            "written": datetime.now(timezone.utc).isoformat(), "root": str(root), "arg": str(arg),
            "format": src.format, "signals_key": skey, "result_key": rkey,
            "n_steps": int(signals.height), "fingerprint": fp, "tree": tree,
            "files": {"derived": DERIVED, "signals": SIGNALS, "result": RESULT,
                      **({"file_checks": FILE_CHECKS} if src.file_checks else {})},
        }
        dirs = cache_dir_candidates(root)
        if cached is not None and cached.dir in dirs:  # keep writing where it was found
            dirs.remove(cached.dir)
            dirs.insert(0, cached.dir)
        d, err = _write_cache(dirs, manifest, derived, result, src.file_checks)
        info.dir, info.written, info.write_error = d, d is not None, err
    return result


def _why_stale(man: Mapping[str, Any], tree: Any, fmt: str | None, cfg: DetectConfig, rkey: Any, arg: str) -> str:
    if tree is None:
        return "run too large for the quick check"
    if fmt is not None and fmt != man.get("format"):
        return f"format {fmt} requested (cached: {man.get('format')})"
    if man.get("signals_key") != _signals_key(cfg, man.get("format", "")):
        return "signal code or low_prob changed"
    if man.get("result_key") != rkey:
        old = (man.get("result_key") or {}).get("config")
        return "detection config changed" if old != rkey["config"] else "detection code or cache version changed"
    if man.get("arg") != arg:
        return "run given by another path"
    old_tree = man.get("tree") or {}
    n = len(_changed(old_tree, tree))
    return f"{n} file(s) with a new size or modification time"

