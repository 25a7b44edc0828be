"""The incremental re-scan of benchmarks/bench_scan.py: new steps appended to a hard-linked copy
of the run as a live trainer would, re-scanned one at a time (``incremental``), and the floor of
a re-scan that reads only the new step's files (``incremental_floor``); with the wall/CPU clock
every timed part of the benchmark uses (``Clock``)."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any


class Clock:
    """Wall and CPU seconds (all threads of this process; with ``children``, also of the child
    processes it waited for, e.g. a pool) of the code between start() and lap()."""

    def __init__(self, children: bool = False) -> None:
        self.children = children

    def start(self) -> None:
        self.t, self.c = time.perf_counter(), _cpu(self.children)

    def lap(self) -> tuple[float, float]:
        t, c = time.perf_counter(), _cpu(self.children)
        out = (t - self.t, c - self.c)
        self.t, self.c = t, c
        return out


def _cpu(children: bool = False) -> float:
    from diagnose.watch.watcher import cpu_seconds

    return cpu_seconds() if children else time.process_time()


def add_step_copy(run: Path, new_step: int) -> None:
    """Append step ``new_step`` to ``run`` as a live trainer's RunWriter would: the last step's
    tables with the step column rewritten, each written to a temp file and renamed (with the
    writer's Parquet options and metadata), then its metrics line appended. ``run.json`` is left
    alone (``RunWriter(resume=True)`` would rewrite it, which a cache rightly treats as a
    run-wide change)."""
    import polars as pl

    from diagnose.atomic import atomic_path
    from diagnose.rundir.schema import RUN_FORMAT, RUN_FORMAT_VERSION, step_filename

    for kind in ("rollouts", "tokens", "probe"):
        files = sorted((run / kind).glob("step-*.parquet"))
        if not files:
            continue
        df = pl.read_parquet(files[-1]).with_columns(pl.lit(new_step, dtype=pl.Int64).alias("step"))
        meta = {"collapse-diagnostics/format": RUN_FORMAT,
                "collapse-diagnostics/format_version": str(RUN_FORMAT_VERSION),
                "collapse-diagnostics/kind": kind, "collapse-diagnostics/step": str(new_step)}
        with atomic_path(run / kind / step_filename(new_step), fsync=False) as tmp:
            df.write_parquet(tmp, compression="zstd", compression_level=1, statistics=True, metadata=meta)
    lines = [ln for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    last = json.loads(lines[-1])
    last["step"] = new_step
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(last, allow_nan=False, ensure_ascii=False, separators=(",", ":")) + "\n")


def linked_copy(src: Path, dst: Path) -> None:
    """Copy of a run dir (dot folders such as a scan cache left out): Parquet files hard-linked
    (they are never modified), the rest copied."""
    for f in src.rglob("*"):
        rel = f.relative_to(src)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if f.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".parquet":
            try:
                os.link(f, dst / rel)
                continue
            except OSError:
                pass
        shutil.copy2(f, dst / rel)


def incremental(data: Path, opts: dict[str, Any]) -> dict[str, Any]:
    """Incremental re-scans of a hard-linked copy of the run, one new step at a time
    (``opts["repeats"]`` times); see the module docstring."""
    import polars as pl

    from diagnose.adapters import load_run
    from diagnose.scan import merge_signals, scan_source, step_signals

    try:
        from diagnose.scan.run import scan_run
    except ImportError:
        scan_run = None
    run = Path(opts["workdir"]) / "run"
    linked_copy(data, run)
    last = max(int(f.stem.split("-")[1]) for f in (run / "tokens").glob("step-*.parquet"))
    repeats = max(1, int(opts.get("repeats", 1)))
    res: dict[str, Any] = {"times": []}
    clock = Clock()
    if scan_run is not None:
        res["method"] = "diagnose.scan.run.scan_run(path, use_cache=True)"
        clock.start()
        scan_run(run, use_cache=False)
        res["full"] = clock.lap()[0]
        scan_run(run, use_cache=True)
        res["build_cache"] = clock.lap()[0]
        for i in range(repeats):
            add_step_copy(run, last + 1 + i)
            clock.start()
            r = scan_run(run, use_cache=True)
            res["times"].append(clock.lap()[0])
        cache_info = getattr(r, "cache", None)
        res["cache"] = cache_info.describe() if hasattr(cache_info, "describe") else str(cache_info)
        sig = r.signals
        clock.start()
        scan_run(run, use_cache=True)
        res["unchanged"] = clock.lap()[0]
    else:
        res["method"] = ("no diagnose.scan.run.scan_run: load_run + step_signals(src, steps=[new]) + "
                         "merge_signals(cached full-scan signals) + scan_source(src, signals=merged)")
        sig = pl.read_parquet(opts["cached_signals"])
        for i in range(repeats):
            add_step_copy(run, last + 1 + i)
            clock.start()
            src = load_run(run)
            sig = merge_signals(sig, step_signals(src, steps=[last + 1 + i]))
            r = scan_source(src, signals=sig)
            res["times"].append(clock.lap()[0])
    res["seconds"] = min(res["times"])
    res["verdict"] = r.verdict
    # what every re-scan pays whatever changed: loading the run (file checks) and detection
    clock.start()
    src = load_run(run)
    res["load_run"] = clock.lap()[0]
    scan_source(src, signals=sig)
    res["detection"] = clock.lap()[0]
    # what an incremental re-scan could cost: only the new step's files read (the unchanged ones
    # not re-validated), its signals merged, detection re-run; same result expected
    res["floor_phases"] = floor = incremental_floor(run, sig, last + repeats, clock)
    res["floor"] = sum(floor.values())
    # the new steps are copies of the last one: their token signals must equal its own
    new = last + repeats
    tok = [c for c in sig.columns if c.startswith(("ctrl/", "ctx/")) or c in ("entropy", "n_tokens", "low_prob_share")]
    rows = sig.filter(pl.col("step").is_in([last, new])).sort("step").select(tok)
    res["new_steps"] = [last + 1, new]
    res["new_step_equals_copied_step"] = rows.height == 2 and all(
        math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15) or (a != a and b != b)
        for a, b in zip(rows.row(0), rows.row(1)) if a is not None and b is not None)
    return res


def incremental_floor(run: Path, signals, step: int, clock: Clock) -> dict[str, float]:
    """Re-scan of ``step`` (already in ``signals``) reading only that step's files: a RunSource
    whose tokens/probe are the step's files and whose rollouts are a lazy scan of all rollout
    files (detection reads example rollouts from other steps), no file validation; then
    merge_signals and scan_source(signals=...). Returns its phases (seconds)."""
    import polars as pl

    from diagnose.rundir import RunReader
    from diagnose.rundir.schema import step_filename
    from diagnose.scan import merge_signals, scan_source, step_signals
    from diagnose.source import RunSource

    old = signals.filter(pl.col("step") != step)
    clock.start()
    info = json.loads((run / "run.json").read_text())
    metrics = RunReader(run).metrics()
    name = step_filename(step)
    src = RunSource(path=run, format="native", metrics=metrics.lazy(),
                    rollouts=pl.scan_parquet(sorted(str(f) for f in (run / "rollouts").glob("step-*.parquet"))),
                    tokens=pl.scan_parquet(run / "tokens" / name), probe=pl.scan_parquet(run / "probe" / name),
                    control_tokens=info.get("control_tokens", []))
    t_src = clock.lap()[0]
    merged = merge_signals(old, step_signals(src, steps=[step]))
    t_sig = clock.lap()[0]
    scan_source(src, signals=merged)
    t_det = clock.lap()[0]
    return {"source (metrics.jsonl, lazy scans)": t_src, "step_signals(new) + merge": t_sig, "detection": t_det}
