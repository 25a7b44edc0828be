"""`diagnose scan` on a large synthetic run against pandas and DuckDB, side by side in one run.

    pip install -e '.[bench]'                       # pandas, duckdb
    python benchmarks/bench_scan.py                  # >= 50M token rows in /tmp/bench_scan_run
    python benchmarks/bench_scan.py --quick          # ~2M token rows, smoke run (/tmp/bench_scan_run_quick)
    python benchmarks/bench_scan.py --repeats 3 --pandas-steps 40

The run is generated once with ``diagnose.synth.write_synthetic_run`` (a collapse near the end,
NaN log-probs at one step; at least ``--rows`` token rows and, unless ``--quick``, a token table
larger than 2 GiB in memory) and reused while its parameters match (``bench_params.json``).

Contenders, each in a fresh process started by a tiny launcher (so that no process inherits the
benchmark's own RSS), interleaved over ``--repeats`` rounds; the best wall time, the least CPU
time (all threads) and the highest peak RSS (``ru_maxrss`` of the child from ``os.wait4``, as
``getrusage(RUSAGE_CHILDREN)`` reports it; ``VmHWM`` printed as a cross-check) are kept.
Imports are not timed.

* ``ours_full``: ``scan_source(load_run(path))``: every table (rollouts, tokens, probe,
  metrics), change detectors, episodes, pathologies (timed as load_run / step_signals /
  detection, which is what scan_source does).
* ``ours_tokens``: ``load_run`` + ``token_signals(src.tokens, src.control_tokens)``, the part of
  ``step_signals`` that reads the token table (turn structure and key contexts included).
* ``polars_core``: one lazy polars query (streaming) with exactly the aggregations of the pandas
  and DuckDB contenders (no key contexts): what the engine alone costs.
* ``duckdb``: the same aggregations in SQL over ``read_parquet('tokens/step-*.parquet')``.
* ``duckdb_ctx``: those plus the key-context control-token probabilities that ``ours_tokens``
  computes (``ctx/<context>/<tok>``, ``ctx/<context>/n``, ``completions/mean_length``), in SQL:
  context keys from small tables (turn starts, call-tag anchors and a self-join), a LEFT JOIN
  labels the token table, GROUPING SETS aggregate by step and by (step, context) in one query
  (1.3x faster than ``lag`` window functions on 40 files). The like-for-like comparison for
  ``ours_tokens``; its output is compared with ours column by column.
* ``pandas``: the same aggregations, ``pd.read_parquet`` per step file (needed columns only),
  filter, derived columns, ``groupby('step')`` sums and counts, combined at the end.
  ``--pandas-steps N``: on the first N step files, time scaled linearly by token rows.
* ``pandas_concat``: ``pd.concat`` of every file, one ``groupby('step').mean()``; its memory
  grows with the table, so by default it runs on the first 40 files (``--pandas-concat-steps``),
  time scaled linearly.
* ``decode_floor``: polars reads the same columns and sums them (no math): a lower bound of any
  engine reading these files.

Aggregations (per step, generated tokens only, as ``step_signals``): ``n_tokens``, mean finite
``entropy``, ``low_prob_share`` (finite logprob < log 0.01), ``nonfinite_logprob`` (count),
``mismatch/abs_logprob_diff`` (mean |logprob - sampler_logprob| where both finite),
``ctrl/<tok>/p`` (mean exp(lp_ctrl_<tok>) where finite) and ``ctrl/<tok>/sampled`` (share of
token_id == the token's id) per control token. All contenders are compared (allclose) on the
first ``--check-steps`` steps in-process, and the subprocesses' full outputs against DuckDB's.

Incremental re-scan, on a hard-linked copy of the run: new steps are appended as a live
trainer would (a copy of the last step's tables with the step column rewritten, written to temp
files and renamed; its metrics line appended; ``run.json`` untouched). With
``diagnose.scan.run.scan_run``: ``scan_run(path, use_cache=False)``, ``scan_run(path)`` (builds
the cache), then per new step ``scan_run(path)``. Without it: ``load_run`` +
``step_signals(src, steps=[new])`` + ``merge_signals`` + ``scan_source(src, signals=merged)``.
Also printed: the "floor" of a re-scan that reads only the new step's files.

Targets: full scan >= 10x faster than pandas, <= 1.25x DuckDB's time, peak RSS
<= 2 GB on a run whose token table is larger than 2 GiB in memory, incremental re-scan < 5 % of a
full scan (against the fastest full scan measured). Judged on wall-clock ratios of the same
script run; nothing absolute is asserted (shared machines are noisy: CPU seconds are printed too).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# siblings in benchmarks/ (on the path when this file runs as a script, as its workers do)
from scan_contenders import (
    BASE_COLS,
    LOW_PROB,
    compare,
    duckdb_ctx_signals,
    duckdb_signals,
    pandas_concat_signals,
    pandas_signals,
    polars_core_signals,
    roles_of,
    to_polars,
)
from scan_data import (
    GIB,
    TARGET_TABLE,
    ctrl_tokens,
    ensure_run,
    run_params,
    table_stats,
    token_files,
    warm_page_cache,
)
from scan_incremental import Clock, incremental

TARGET_VS_PANDAS = 10.0  # pandas time / our time >= this
TARGET_VS_DUCKDB = 1.25  # our time / duckdb time <= this
TARGET_PEAK = 2e9  # bytes (2 GB)
TARGET_INCREMENTAL = 0.05  # incremental / full < this


# ---------------------------------------------------------------------------------------------
# workers (fresh processes)
# ---------------------------------------------------------------------------------------------



def worker(name: str, data: Path, out: Path, opts: dict[str, Any]) -> None:
    """Runs in a fresh process; writes ``out/result.json`` (+ ``out/result.parquet``): ``seconds``
    (wall) and ``cpu`` (CPU seconds) of the timed part, imports excluded."""
    res: dict[str, Any] = {"name": name}
    ctrl = ctrl_tokens(data)
    glob = str(data / "tokens" / "step-*.parquet")
    table = None
    clock = Clock()
    if name == "ours_full":
        from diagnose.adapters import load_run
        from diagnose.scan import DetectConfig, scan_source, step_signals

        cfg = DetectConfig()
        clock.start()
        # = scan_source(load_run(data)), whose first step is step_signals(src, low_prob=cfg.low_prob)
        src = load_run(data)
        t_load = clock.lap()
        sig = step_signals(src, low_prob=cfg.low_prob)
        t_sig = clock.lap()
        r = scan_source(src, cfg, signals=sig)
        t_det = clock.lap()
        res.update(seconds=t_load[0] + t_sig[0] + t_det[0], cpu=t_load[1] + t_sig[1] + t_det[1],
                   phases={"load_run": t_load[0], "step_signals": t_sig[0], "detection": t_det[0]},
                   verdict=r.verdict, onsets=[e.onset_step for e in r.episodes],
                   implicated=[(e.implicated[0].token, e.implicated[0].context) if e.implicated else None
                               for e in r.episodes],
                   pathologies=sorted({p.kind for p in r.pathologies}), n_signals=r.signals.width - 1)
        table = r.signals
    elif name == "ours_tokens":
        from diagnose.adapters import load_run
        from diagnose.scan.signals import token_signals

        clock.start()
        src = load_run(data)
        t_load = clock.lap()
        table = token_signals(src.tokens, src.control_tokens, low_prob=LOW_PROB)
        t_tok = clock.lap()
        res.update(seconds=t_load[0] + t_tok[0], cpu=t_load[1] + t_tok[1],
                   phases={"load_run": t_load[0], "token_signals": t_tok[0]})
    elif name == "polars_core":
        clock.start()
        table = polars_core_signals(glob, ctrl)
        res["seconds"], res["cpu"] = clock.lap()
    elif name == "decode_floor":
        import polars as pl

        cols = BASE_COLS + [f"lp_ctrl_{n}" for n, _ in ctrl]
        clock.start()
        pl.scan_parquet(glob).select(pl.col(c).cast(pl.Float64).sum() for c in cols).collect(engine="streaming")
        res["seconds"], res["cpu"] = clock.lap()
    elif name == "duckdb":
        import duckdb

        con = duckdb.connect()
        res["threads"] = con.execute("SELECT current_setting('threads')").fetchall()[0][0]
        con.close()
        clock.start()
        table = duckdb_signals(glob, ctrl)
        res["seconds"], res["cpu"] = clock.lap()
    elif name == "duckdb_ctx":
        roles = roles_of(data)
        clock.start()
        table = duckdb_ctx_signals(glob, ctrl, roles)
        res["seconds"], res["cpu"] = clock.lap()
    elif name in ("pandas", "pandas_concat"):
        files = token_files(data)
        k = opts.get("pandas_steps" if name == "pandas" else "pandas_concat_steps")
        if k:
            files = files[:k]
        import pandas  # noqa: F401  (import not timed)

        fn = pandas_signals if name == "pandas" else pandas_concat_signals
        clock.start()
        table = fn(files, ctrl)
        res["seconds"], res["cpu"] = clock.lap()
        res["files"] = len(files)
    elif name == "incremental":
        res.update(incremental(data, opts))
    else:
        raise SystemExit(f"unknown worker {name}")
    if table is not None:
        to_polars(table).write_parquet(out / "result.parquet")
    res["vm_hwm"] = vm_hwm()
    (out / "result.json").write_text(json.dumps(res, default=str))


def vm_hwm() -> int | None:
    """Peak RSS of this process's address space (/proc/self/status VmHWM), a cross-check."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# Linux keeps the peak RSS of the address space a process had before exec() in its ru_maxrss, so a
# worker started by this (large) process would report at least our own RSS. Workers are started
# by a tiny launcher process instead, itself started before anything heavy is imported; it reads
# one JSON argv per line, runs it and answers {"rc", "maxrss"} from os.wait4 (the child's own
# rusage, as getrusage(RUSAGE_CHILDREN) would report for a single child).
_LAUNCHER = r"""
import json, os, subprocess, sys
for line in sys.stdin:
    p = subprocess.Popen(json.loads(line))
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    print(json.dumps({"rc": p.returncode, "maxrss": usage.ru_maxrss * 1024}), flush=True)
"""


class Launcher:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, argv: list[str]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def run_worker(launcher: Launcher, name: str, data: Path, tmp: Path, opts: dict[str, Any]) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix=name + "-", dir=tmp))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--data", str(data), "--worker-out", str(out),
           "--worker-opts", json.dumps(opts)]
    r = launcher.run(cmd)
    if r["rc"] != 0:
        raise SystemExit(f"worker {name} failed with exit code {r['rc']}")
    res = json.loads((out / "result.json").read_text())
    res["peak_rss"] = r["maxrss"]
    res["out"] = str(out)
    return res


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB ({n / GIB:.2f} GiB)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None,
                    help="run directory, generated once and reused (default /tmp/bench_scan_run, quick: ..._quick)")
    ap.add_argument("--rows", type=int, default=None, help="minimum token rows (default 50M; --quick: 2M)")
    ap.add_argument("--quick", action="store_true", help="~2M token rows: a smoke run")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds of timings (best time kept)")
    ap.add_argument("--pandas-steps", type=int, default=None,
                    help="per-file pandas on the first N step files only, time scaled linearly by token rows")
    ap.add_argument("--pandas-concat-steps", type=int, default=None,
                    help="concat pandas on the first N step files (default: 40, all with --quick), scaled linearly")
    ap.add_argument("--check-steps", type=int, default=6, help="steps compared in-process (allclose)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-opts", default="{}", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.data, a.worker_out, json.loads(a.worker_opts))
        return

    launcher = Launcher()  # before anything heavy is imported (see _LAUNCHER)
    data = a.data or Path("/tmp/bench_scan_run_quick" if a.quick else "/tmp/bench_scan_run")
    rows_min = a.rows or (2_000_000 if a.quick else 50_000_000)
    if a.pandas_concat_steps is None and not a.quick:
        a.pandas_concat_steps = 40
    params = run_params(rows_min, a.quick)
    ensure_run(data, params)
    st = table_stats(data)
    print(f"\ntoken table: {st['rows']:,} rows in {st['files']} step files, {st['columns']} columns; "
          f"{fmt_bytes(st['disk_bytes'])} on disk")
    print(f"  in memory: {st['bytes_per_row']:.3f} B/row from the schema -> {fmt_bytes(st['mem_bytes'])}; "
          f"polars estimated_size of 100k rows scaled -> {fmt_bytes(st['est_mem_bytes'])}")
    table_mem = min(st["mem_bytes"], st["est_mem_bytes"])
    table_big = table_mem > TARGET_TABLE
    if not table_big:
        print(f"  (not larger than {TARGET_TABLE / GIB:.0f} GiB in memory: the peak-memory target cannot pass"
              f"{' (--quick)' if a.quick else ''})")
    print(f"page cache warmed ({warm_page_cache(data) / 1e9:.2f} GB/s read)")

    ctrl = ctrl_tokens(data)
    tmp = Path(tempfile.mkdtemp(prefix="bench_scan_", dir=data.parent))
    try:
        # ---- correctness on a subset, in-process
        import polars as pl

        from diagnose.rundir import RunReader
        from diagnose.scan.signals import token_signals

        files = token_files(data)[: a.check_steps]
        steps = [int(f.stem.split("-")[1]) for f in files]
        reader = RunReader(data)
        sub = {
            "ours token part": token_signals(reader.tokens(steps), reader.control_tokens, low_prob=LOW_PROB),
            "polars same aggs": polars_core_signals([str(f) for f in files], ctrl),
            "pandas concat": pandas_concat_signals(files, ctrl),
            "duckdb": duckdb_signals([str(f) for f in files], ctrl),
        }
        problems = []
        ref = to_polars(pandas_signals(files, ctrl))
        for k, v in sub.items():
            problems += compare(ref, v, f"pandas vs {k}")
        # key contexts too: ours against the same in DuckDB SQL (window functions)
        problems += compare(to_polars(sub["ours token part"]),
                            duckdb_ctx_signals([str(f) for f in files], ctrl, roles_of(data)), "ours vs duckdb_ctx")
        nonfinite = ref.get_column("nonfinite_logprob").sum()
        print(f"\ncheck on steps {steps[0]}..{steps[-1]} ({ref.width - 1} columns, {int(nonfinite)} NaN log-probs): "
              + ("all contenders agree (allclose, rtol 1e-9)" if not problems else "MISMATCH"))
        for p in problems:
            print("  " + p)

        # ---- timings, fresh processes, interleaved rounds
        names = ["ours_full", "ours_tokens", "polars_core", "duckdb", "duckdb_ctx", "pandas", "pandas_concat",
                 "decode_floor"]
        opts = {"pandas_steps": a.pandas_steps, "pandas_concat_steps": a.pandas_concat_steps}
        results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        print(f"\ntimings ({a.repeats} interleaved rounds, each contender in a fresh process):")
        for r in range(a.repeats):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                res = run_worker(launcher, n, data, tmp, opts)
                results[n].append(res)
                print(f"  round {r + 1}: {n:<14} {res['seconds']:8.2f} s (CPU {res['cpu']:7.2f} s)  "
                      f"peak RSS {res['peak_rss'] / 1e9:.2f} GB (VmHWM {(res.get('vm_hwm') or 0) / 1e9:.2f} GB)",
                      flush=True)
        best = {n: min(results[n], key=lambda x: x["seconds"]) for n in names}
        peak = {n: max(x["peak_rss"] for x in results[n]) for n in names}
        secs = {n: best[n]["seconds"] for n in names}
        cpu = {n: min(x["cpu"] for x in results[n]) for n in names}
        scale = {}
        for n, k in (("pandas", a.pandas_steps), ("pandas_concat", a.pandas_concat_steps)):
            scale[n] = st["rows"] / sum(st["rows_per_file"][:k]) if k else 1.0
            secs[n] *= scale[n]
            cpu[n] *= scale[n]

        # ---- full outputs agree
        outs = {n: pl.read_parquet(Path(best[n]["out"]) / "result.parquet") for n in names if n != "decode_floor"}
        full_problems = []
        for n in names:
            if n not in ("duckdb", "decode_floor"):
                # inner join on steps: the pandas subsets are compared on their steps
                full_problems += compare(outs[n], outs["duckdb"], f"{n} vs duckdb", rtol=1e-7)
        full_problems += compare(outs["ours_tokens"], outs["duckdb_ctx"], "ours_tokens vs duckdb_ctx", rtol=1e-7)
        o = best["ours_full"]
        print("\nfull outputs vs duckdb (all steps; pandas subsets on their steps): "
              + ("agree (allclose, rtol 1e-7)" if not full_problems else "MISMATCH"))
        for p in full_problems:
            print("  " + p)
        print(f"our scan: verdict {o['verdict']}, episodes at {o['onsets']} (truth: onset "
              f"{params['collapse_at']}), implicated {o['implicated']}, pathologies {o['pathologies']}, "
              f"{o['n_signals']} signals")

        # ---- incremental
        print("\nincremental re-scans ...", flush=True)
        inc = run_worker(launcher, "incremental", data, tmp, {
            "workdir": str(tmp / "inc"), "repeats": a.repeats,
            "cached_signals": str(Path(best["ours_full"]["out"]) / "result.parquet")})
        # judged against the fastest full scan seen (scan_run without cache, or scan_source(load_run))
        inc_full = min([secs["ours_full"]] + ([inc["full"]] if "full" in inc else []))
        inc_ratio = inc["seconds"] / inc_full

        # ---- report
        def sub_label(n: str, k: int | None) -> str:
            return f" (first {k} files, x{scale[n]:.2f})" if k else ""

        labels = {
            "ours_full": "ours: full scan, scan_source(load_run(path))",
            "ours_tokens": "ours: token part, load_run + token_signals",
            "polars_core": "polars: same aggregations as pandas/duckdb, 1 query",
            "duckdb": f"duckdb SQL ({best['duckdb'].get('threads')} threads)",
            "duckdb_ctx": "duckdb SQL + key contexts (like for like with ours)",
            "pandas": "pandas, per step file" + sub_label("pandas", a.pandas_steps),
            "pandas_concat": "pandas, concat" + sub_label("pandas_concat", a.pandas_concat_steps),
            "decode_floor": "floor: polars reads + sums the same columns, no math",
        }
        print(f"\n{st['rows']:,} token rows ({table_mem / GIB:.2f} GiB in memory), {st['files']} steps, "
              f"{os.cpu_count()} CPUs; best of {a.repeats} rounds, fresh process each, imports not timed")
        print(f"{'contender':<56} {'wall':>8} {'CPU':>8} {'peak RSS':>9}")
        for n in names:
            print(f"{labels[n]:<56} {secs[n]:7.2f}s {cpu[n]:7.2f}s {peak[n] / 1e9:7.2f}GB")
        ph = best["ours_full"]["phases"]
        print("  ours, full scan phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in ph.items()))
        ph = best["ours_tokens"]["phases"]
        print("  ours, token part phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in ph.items()))
        if a.pandas_steps or a.pandas_concat_steps:
            print("  pandas on a subset: times scaled linearly by token rows; peak RSS is the subset's")
        print(f"\nincremental re-scan, one new step each time ({len(inc['times'])}x), measured with: {inc['method']}")
        print(f"  best {inc['seconds']:.3f} s (all: {', '.join(f'{t:.3f}' for t in inc['times'])}) vs full scan "
              f"{inc_full:.2f} s")
        for k in ("full", "build_cache", "unchanged", "load_run", "detection"):
            if k in inc:
                print(f"  {k}: {inc[k]:.3f} s")
        print(f"  floor (only the new step's files read, nothing re-validated): {inc['floor']:.3f} s = "
              f"{inc['floor'] / inc_full:.3f} of the full scan; "
              + ", ".join(f"{k} {v:.3f} s" for k, v in inc["floor_phases"].items()))
        for k in ("cache", "new_steps", "new_step_equals_copied_step", "verdict"):
            if k in inc:
                print(f"  {k}: {inc[k]}")

        rows = []

        def target(name: str, value: float, ok: bool, goal: str) -> None:
            rows.append((name, value, goal, "PASS" if ok else "FAIL"))

        for n in ("pandas", "pandas_concat"):
            for ours in ("ours_full", "ours_tokens"):
                ratio = secs[n] / secs[ours]
                target(f"{n} / {ours}", ratio, ratio >= TARGET_VS_PANDAS, f">= {TARGET_VS_PANDAS:g}")
        for ours in ("ours_full", "ours_tokens"):
            for db in ("duckdb", "duckdb_ctx"):
                ratio = secs[ours] / secs[db]
                target(f"{ours} / {db}", ratio, ratio <= TARGET_VS_DUCKDB, f"<= {TARGET_VS_DUCKDB:g}")
        target("ours_full peak RSS (GB)", peak["ours_full"] / 1e9, peak["ours_full"] <= TARGET_PEAK and table_big,
               f"<= {TARGET_PEAK / 1e9:g} (table {table_mem / GIB:.2f} GiB > {TARGET_TABLE / GIB:g})")
        target("incremental / full scan", inc_ratio, inc_ratio < TARGET_INCREMENTAL, f"< {TARGET_INCREMENTAL:g}")
        info = [
            ("pandas / decode floor (wall; no engine beats this)", secs["pandas"] / secs["decode_floor"]),
            ("pandas / decode floor (CPU s)", cpu["pandas"] / cpu["decode_floor"]),
            ("polars_core / duckdb (wall)", secs["polars_core"] / secs["duckdb"]),
            ("pandas / polars_core (wall)", secs["pandas"] / secs["polars_core"]),
            ("pandas / ours_full (CPU s)", cpu["pandas"] / cpu["ours_full"]),
            ("ours_full / duckdb (CPU s)", cpu["ours_full"] / cpu["duckdb"]),
            ("ours_tokens / duckdb (CPU s)", cpu["ours_tokens"] / cpu["duckdb"]),
            ("ours_tokens / duckdb_ctx (CPU s)", cpu["ours_tokens"] / cpu["duckdb_ctx"]),
            ("duckdb_ctx peak RSS (GB)", peak["duckdb_ctx"] / 1e9),
            ("ours_full / ours_tokens (wall)", secs["ours_full"] / secs["ours_tokens"]),
            ("ours_tokens peak RSS (GB)", peak["ours_tokens"] / 1e9),
            ("incremental floor: (load_run + detection) / full",
             (inc["load_run"] + inc["detection"]) / inc_full),
        ]
        print(f"\n{'target (wall-clock ratios)':<30} {'measured':>9}  {'goal':<36} result")
        for name, value, goal, verdict in rows:
            print(f"{name:<30} {value:9.3f}  {goal:<36} {verdict}")
        print("informational:")
        for name, value in info:
            print(f"  {name:<48} {value:7.3f}")
        if problems or full_problems or not inc.get("new_step_equals_copied_step", True):
            print("\nWARNING: results disagree (see above)")
    finally:
        launcher.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

