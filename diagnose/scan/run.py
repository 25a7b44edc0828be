"""``scan_run``: a run's scan, served from its cache or brought up to date incrementally.

    from diagnose.scan.run import scan_run
    result = scan_run("runs/exp1")            # loads, scans, caches; a re-scan only redoes what changed
    result.cache.hit                          # True: served from the cache (run not even loaded)

The stages, cheapest first (the store is `diagnose.scan.cache`):

1. **quick check**: the ``tree`` is unchanged and the keys match: the cached result is returned
   without loading the run (``cache.hit``);
2. **load** the run (`diagnose.adapters.load_run`, with the load options);
3. **derived signals**: files whose fingerprint changed (new, modified, removed) are mapped to
   steps by the adapter's ``step_of_file`` and only those steps' derived signals are recomputed
   (`step_signals(src, steps=...)`, merged with `merge_signals`); metrics files only need the
   metrics layer, which is always recomputed in full (cheap); a run-wide file (``run.json``, a
   single conversation file, open-instruct traces, whose names do not bind their steps) or a
   file/step mismatch reported by the adapter (`RunSource.has_step_mismatch`) recomputes all;
4. **detect**: episodes and pathologies, re-detected when anything was recomputed (cheap;
   an unchanged episode window reuses its moves and examples, `PriorScan`);
5. **store** the cache.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl

from diagnose import __version__
from diagnose.scan import cache
from diagnose.scan.cache import Cached
from diagnose.scan.detect import DetectConfig
from diagnose.scan.episodes import PriorScan
from diagnose.scan.names import is_context_count
from diagnose.scan.result import CacheInfo, RunScanResult, wrap_result
from diagnose.scan.signals import combine_signals, merge_signals, metric_signals, step_signals
from diagnose.scan.verdict import scan_source
from diagnose.source import RunSource

__all__ = ["CHUNK_BYTES", "MAX_CHUNKS", "Progress", "scan_run"]

#: Chunking of the signal computation when a progress callback is given (one chunk is about
#: this many bytes of step files; chunks cost ~0.1 s of fixed overhead each).
CHUNK_BYTES = 48 * 1024 * 1024
MAX_CHUNKS = 20

#: ``progress(stage, done, total)``: stage is ``load`` (total None), ``signals`` (chunks) or
#: ``detect``; called with done=0 at the start of a stage and done=total at its end.
Progress = Callable[[str, int, "int | None"], None]


@dataclass
class _Scan:
    """One scan: its inputs, and what the stages found out so far."""

    arg: Path  # the path given, absolute
    root: Path  # the run's root (a folder, or the single file)
    format: str | None  # forced format; None: detect
    cfg: DetectConfig
    options: dict[str, Any]  # load options given (for load_run)
    use_cache: bool
    progress: Progress | None
    info: CacheInfo
    cached: Cached | None = None
    tree: dict[str, list[int]] | None = None
    rkey: dict[str, Any] = field(default_factory=dict)

    @property
    def man(self) -> dict[str, Any]:
        return self.cached.manifest if self.cached is not None else {}

    @property
    def options_key(self) -> dict[str, str]:
        """The load options as the cache keys on them (strings; paths absolute)."""
        out = {}
        for k, v in sorted(self.options.items()):
            out[k] = str(cache.abs_path(v)) if isinstance(v, os.PathLike) else str(v)
        return out

    def report(self, stage: str, done: int, total: int | None) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)


def scan_run(path: str | os.PathLike[str], *, format: str | None = None,  # noqa: A002
             cfg: DetectConfig | None = None, use_cache: bool = True, progress: Progress | None = None,
             metrics: str | os.PathLike[str] | None = None, run: str | None = None,
             tokenizer: str | None = None) -> RunScanResult:
    """Scan the run at ``path`` (any layout `diagnose.adapters.load_run` reads; ``format``
    forces one), reusing and updating its cache unless ``use_cache`` is False.

    ``metrics``, ``run``, ``tokenizer``: load options passed to the adapter (see
    `diagnose.adapters.load_run`); the cache keys on them. Raises
    `diagnose.adapters.UnknownRunLayout` (no such path, no known layout; `AmbiguousRun` for a
    folder of several runs without ``run``) and `diagnose.rundir.RunFormatError` (a native run
    of a newer format version). Unreadable files inside the run are ``issues`` of the result,
    never errors. ``progress``: see `Progress`; with it, large step tables are processed in
    chunks to report progress.
    """
    options = {"metrics": Path(metrics) if metrics is not None else None, "run": run, "tokenizer": tokenizer}
    scan = _start(path, format, cfg or DetectConfig(), use_cache, progress,
                  {k: v for k, v in options.items() if v is not None})
    result = _quick_check(scan)
    if result is not None:
        return result
    src = _load(scan)
    derived, changed = _derived_layer(scan, src)
    signals = combine_signals(derived, metric_signals(src.metrics) if src.metrics is not None else None)
    result = _detect(scan, src, signals, changed)
    if use_cache:
        _store(scan, src, derived, result)
    return result


def _start(path: str | os.PathLike[str], fmt: str | None, cfg: DetectConfig, use_cache: bool,
           progress: Progress | None, options: dict[str, Any]) -> _Scan:
    """Check the path and find the cache."""
    from diagnose.adapters import require_path

    if fmt == "auto":
        fmt = None
    arg = cache.abs_path(path)
    require_path(arg, fmt)
    scan = _Scan(arg=arg, root=cache.run_root(arg), format=fmt, cfg=cfg, options=options, use_cache=use_cache,
                 progress=progress, info=CacheInfo(enabled=use_cache), rkey=cache.result_key(cfg))
    if use_cache:
        scan.cached, scan.info.reason = cache.find_cache(scan.root, options.get("run"))
    return scan


def _quick_check(scan: _Scan) -> RunScanResult | None:
    """Stage 1: nothing changed on disk -> the cached result, without loading the run. The tree
    is taken before loading: whatever changes during the load shows next time."""
    man, info = scan.man, scan.info
    if scan.use_cache:
        old_fp = man.get("fingerprint") or {}
        scan.tree = cache.run_tree(scan.root, [k for k in (old_fp.get("files") or {}) if os.path.isabs(k)])
    if scan.cached is None:
        return None
    fmt_ok = scan.format is None or scan.format == man.get("format")
    if (scan.tree is not None and scan.tree == man.get("tree") and fmt_ok
            and man.get("signals_key") == cache.signals_key(scan.cfg, man.get("format", ""), scan.options_key)
            and man.get("result_key") == scan.rkey and man.get("arg") == str(scan.arg)):
        try:
            result = scan.cached.read_result()
        except Exception as e:  # noqa: BLE001 - a corrupt cache file: recompute
            info.reason = f"cache unreadable ({type(e).__name__}): rebuilt"
            return None
        info.dir, info.hit, info.loaded_run = scan.cached.dir, True, False
        info.signals, info.episodes, info.reason = "cached", "cached", ""
        result.cache = info
        return result
    info.reason = cache.why_stale(man, scan.tree, scan.format, scan.cfg, scan.rkey, str(scan.arg), scan.options_key)
    return None


def _load(scan: _Scan) -> RunSource:
    """Stage 2: the run, with the file checks the cache kept and the load options."""
    from diagnose.adapters import load_run

    scan.report("load", 0, None)
    checks = scan.cached.file_checks(scan.format) if scan.cached is not None else None
    src = load_run(scan.arg, format=scan.format, file_checks=checks, **scan.options)  # rescored tables attached
    scan.report("load", 1, 1)
    return src


def _derived_layer(scan: _Scan, src: RunSource) -> tuple[pl.DataFrame, list[str] | None]:
    """Stage 3: the derived signals, incrementally where the cache allows; with the fingerprint
    files changed since the cache (None: unknown)."""
    man, info = scan.man, scan.info
    files = src.fingerprint().get("files", {})
    derived: pl.DataFrame | None = None
    changed: list[str] | None = None
    skey = cache.signals_key(scan.cfg, src.format, scan.options_key)
    if (scan.cached is not None and man.get("signals_key") == skey
            and (man.get("fingerprint") or {}).get("format") == src.format):
        try:
            old = _fill_counts(scan.cached.read_derived())
        except Exception as e:  # noqa: BLE001
            info.reason = f"cache unreadable ({type(e).__name__}): rebuilt"
        else:
            changed = cache.changed_files((man.get("fingerprint") or {}).get("files", {}), files)
            derived = _incremental(scan, src, old, changed, files)
    elif scan.cached is not None and not info.reason:
        info.reason = "signal code, low_prob or format changed"
    if derived is None:
        size = sum(v[0] for v in files.values() if isinstance(v, list) and v)
        derived = _derived_signals(src, None, scan.cfg, size, scan.progress)
        info.signals, info.steps_recomputed = "full", None
    if not scan.use_cache:
        info.signals = "off"
    return derived, changed


def _incremental(scan: _Scan, src: RunSource, old: pl.DataFrame, changed: list[str],
                 files: Mapping[str, Any]) -> pl.DataFrame | None:
    """The cached derived signals with the changed files' steps recomputed; None when a
    run-wide file changed or a step file holds other steps (recompute everything)."""
    from diagnose.adapters import step_of_file

    info = scan.info
    single_file = scan.root.is_file()
    roles = [step_of_file(src.format, rel, single_file) for rel in changed]
    mismatch = src.has_step_mismatch
    if "global" in roles or mismatch:
        info.reason = (info.reason + "; " if info.reason else "") + (
            "a file/step mismatch in the run" if mismatch else
            f"{sum(r == 'global' for r in roles)} run-wide file(s) changed")
        return None
    steps = sorted({r for r in roles if isinstance(r, int)})
    if not steps:
        info.signals = "cached"
        return old
    size = sum(files.get(rel, [0])[0] for rel in changed if rel in files)
    new = _derived_signals(src, steps, scan.cfg, size, scan.progress)
    keep = old.filter(~pl.col("step").is_in(pl.Series(steps, dtype=pl.Int64).implode()))
    info.signals, info.steps_recomputed = "incremental", steps
    return _fill_counts(merge_signals(keep, new))


def _detect(scan: _Scan, src: RunSource, signals: pl.DataFrame, changed: list[str] | None) -> RunScanResult:
    """Stage 4: episodes and pathologies; the cached ones when no file changed."""
    man, info = scan.man, scan.info
    same_detection = scan.cached is not None and man.get("result_key") == scan.rkey
    result: RunScanResult | None = None
    if same_detection and changed == []:
        try:
            result = scan.cached.read_result()
            result.signals = signals
            result.issues = list(src.issues)
            info.episodes = "cached"
        except Exception:  # noqa: BLE001
            result = None
    if result is None:
        scan.report("detect", 0, 1)
        prior = None
        if same_detection:  # same config and detection code
            try:
                old_result = scan.cached.read_result()
                prior = PriorScan(old_result.signals, old_result.episodes)
            except Exception:  # noqa: BLE001 - an unreadable cache: nothing to reuse
                prior = None
        result = wrap_result(scan_source(src, scan.cfg, signals=signals, prior=prior), src.issues, info)
        scan.report("detect", 1, 1)
        info.episodes = "computed"
    result.cache = info
    return result


def _store(scan: _Scan, src: RunSource, derived: pl.DataFrame, result: RunScanResult) -> None:
    """Stage 5: write the cache (where it was found, else the first writable place)."""
    info, tree = scan.info, scan.tree
    fp = src.fingerprint()
    files = fp.get("files", {})
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
        "cache_version": cache.CACHE_VERSION, "package_version": __version__,
        "written": datetime.now(timezone.utc).isoformat(), "root": str(scan.root), "arg": str(scan.arg),
        "format": src.format, "options": scan.options_key,
        "signals_key": cache.signals_key(scan.cfg, src.format, scan.options_key), "result_key": scan.rkey,
        "n_steps": int(result.signals.height), "fingerprint": fp, "tree": tree,
        "files": {"derived": cache.DERIVED, "signals": cache.SIGNALS, "result": cache.RESULT,
                  **({"file_checks": cache.FILE_CHECKS} if src.file_checks else {})},
    }
    dirs = cache.cache_dir_candidates(scan.root, scan.options.get("run"))
    if scan.cached is not None and scan.cached.dir in dirs:  # keep writing where it was found
        dirs.remove(scan.cached.dir)
        dirs.insert(0, scan.cached.dir)
    d, err = cache.write_cache(dirs, manifest, derived, result, src.file_checks)
    info.dir, info.written, info.write_error = d, d is not None, err


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
                  for c in df.columns if is_context_count(c)]
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
