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

Targets (from the issue): full scan >= 10x faster than pandas, <= 1.25x DuckDB's time, peak RSS
<= 2 GB on a run whose token table is larger than 2 GiB in memory, incremental re-scan < 5 % of a
full scan (against the fastest full scan measured). Judged on wall-clock ratios of the same
script run; nothing absolute is asserted (shared machines are noisy: CPU seconds are printed too).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GIB = 1 << 30
LOW_PROB = 0.01
TARGET_VS_PANDAS = 10.0  # pandas time / our time >= this
TARGET_VS_DUCKDB = 1.25  # our time / duckdb time <= this
TARGET_PEAK = 2e9  # bytes (2 GB)
TARGET_TABLE = 2 * GIB  # the token table must be larger than this in memory
TARGET_INCREMENTAL = 0.05  # incremental / full < this

# columns the pandas/duckdb/polars-core contenders need
BASE_COLS = ["step", "is_generated", "token_id", "logprob", "sampler_logprob", "entropy"]


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def run_params(rows: int, quick: bool) -> dict[str, Any]:
    """Parameters of write_synthetic_run giving at least ``rows`` token rows (and a token table
    larger than TARGET_TABLE in memory unless ``quick``)."""
    from diagnose.rundir.schema import tokens_schema
    from diagnose.synth.native import QWEN_LIKE_CONTROL_TOKENS

    bpr = schema_bytes_per_row(tokens_schema([t["name"] for t in QWEN_LIKE_CONTROL_TOKENS]))
    if not quick and rows * bpr <= TARGET_TABLE:
        rows = math.ceil(TARGET_TABLE * 1.1 / bpr)
    samples, tps = (256, 256) if quick else (1024, 256)
    per_step = samples * tps  # token rows of a healthy step (collapsed rollouts are shorter)
    collapse_len = 6
    steps = math.ceil(rows / per_step) + collapse_len + 1
    collapse_at = steps - 14
    return {
        "steps": steps, "collapse_at": collapse_at, "recover_at": collapse_at + collapse_len,
        "samples_per_step": samples, "tokens_per_sample": tps, "nan_logprobs_at": [2], "seed": 0,
        "min_rows": rows,
    }


def schema_bytes_per_row(schema) -> float:
    """In-memory bytes per row of fixed-width columns (polars/Arrow: Boolean is one bit)."""
    import polars as pl

    sizes = {pl.Int64: 8, pl.Int32: 4, pl.Float32: 4, pl.Float64: 8, pl.Int16: 2, pl.Int8: 1, pl.Boolean: 0.125}
    total = 0.0
    for name, dtype in schema.items():
        if dtype.base_type() not in sizes:
            raise ValueError(f"column {name}: no fixed width for {dtype}")
        total += sizes[dtype.base_type()]
    return total


def token_files(data: Path) -> list[Path]:
    return sorted((data / "tokens").glob("step-*.parquet"))


def ensure_run(data: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Generate the run into ``data`` unless a complete one with these parameters is there."""
    marker = data / "bench_params.json"
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text())
        except ValueError:
            saved = {}
        if saved.get("params") == params and len(token_files(data)) == params["steps"]:
            print(f"reusing the run in {data} ({saved['n_token_rows']:,} token rows)")
            return saved
    if data.exists():
        run_json = data / "run.json"
        synthetic = False
        if run_json.is_file():
            try:
                synthetic = bool(json.loads(run_json.read_text()).get("config", {}).get("synthetic"))
            except ValueError:
                pass
        if not (marker.is_file() or synthetic or not any(data.iterdir())):
            raise SystemExit(f"{data} exists and is not a synthetic benchmark run; pass another --data")
        shutil.rmtree(data)
    from diagnose.synth import write_synthetic_run

    gen = {k: v for k, v in params.items() if k != "min_rows"}
    print(f"generating the run in {data}: {gen} ...", flush=True)
    truth = write_synthetic_run(data, fsync=False, **gen)
    if truth.n_token_rows < params["min_rows"]:
        raise SystemExit(f"generated {truth.n_token_rows:,} token rows < {params['min_rows']:,}; raise --rows")
    saved = {"params": params, "n_token_rows": truth.n_token_rows, "onset_step": truth.onset_step,
             "recovery_step": truth.recovery_step, "seconds": truth.seconds}
    marker.write_text(json.dumps(saved, indent=1))
    print(f"generated {truth.n_token_rows:,} token rows in {truth.seconds:.1f} s")
    return saved


def table_stats(data: Path) -> dict[str, Any]:
    """Token rows (Parquet metadata), bytes on disk and in memory (schema widths x rows, and a
    polars ``estimated_size`` of the first 100k rows scaled), without loading the table."""
    import polars as pl
    import pyarrow.parquet as pq

    files = token_files(data)
    rows_per_file = [pq.read_metadata(f).num_rows for f in files]
    rows = sum(rows_per_file)
    schema = pl.read_parquet_schema(files[0])
    bpr = schema_bytes_per_row(schema)
    sample = pl.read_parquet(files[0], n_rows=100_000)
    est_bpr = sample.estimated_size() / sample.height
    return {
        "files": len(files), "rows": rows, "rows_per_file": rows_per_file, "columns": len(schema),
        "bytes_per_row": bpr, "mem_bytes": rows * bpr, "est_mem_bytes": rows * est_bpr,
        "disk_bytes": sum(f.stat().st_size for f in files),
    }


def warm_page_cache(data: Path) -> float:
    t0 = time.perf_counter()
    n = 0
    for f in sorted(data.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    n += len(chunk)
    return n / max(time.perf_counter() - t0, 1e-9)


def ctrl_tokens(data: Path) -> list[tuple[str, int | None]]:
    info = json.loads((data / "run.json").read_text())
    return [(t["name"], t.get("token_id")) for t in info.get("control_tokens", [])]


# ---------------------------------------------------------------------------------------------
# contenders (the same aggregations)
# ---------------------------------------------------------------------------------------------


def pandas_signals(files: list[Path], ctrl: list[tuple[str, int | None]], low_prob: float = LOW_PROB):
    """Straightforward pandas: per step file, read the needed columns, keep generated tokens,
    derive the per-row quantities, group by step (sums and counts); combine at the end."""
    import numpy as np
    import pandas as pd

    cols = BASE_COLS + [f"lp_ctrl_{n}" for n, _ in ctrl]
    thr = math.log(low_prob)
    sums, counts = [], []
    for f in files:
        df = pd.read_parquet(f, columns=cols)
        df = df[df["is_generated"].fillna(False).astype(bool)]
        lp = df["logprob"].astype("float64")
        slp = df["sampler_logprob"].astype("float64")
        ent = df["entropy"].astype("float64")
        lp_ok = np.isfinite(lp)
        d = pd.DataFrame({"step": df["step"].to_numpy()}, index=df.index)
        d["n_tokens"] = 1.0
        d["entropy"] = ent.where(np.isfinite(ent))
        d["low_prob_share"] = (lp < thr).astype("float64").where(lp_ok)
        # pandas reads nulls as NaN: nulls count as non-finite here (the runs here have no null logprob)
        d["nonfinite_logprob"] = (~lp_ok).astype("float64")
        d["mismatch/abs_logprob_diff"] = (lp - slp).abs().where(lp_ok & np.isfinite(slp))
        for name, tid in ctrl:
            p = np.exp(df[f"lp_ctrl_{name}"].astype("float64"))
            d[f"ctrl/{name}/p"] = p.where(np.isfinite(p))
            if tid is not None:
                d[f"ctrl/{name}/sampled"] = (df["token_id"] == tid).astype("float64")
        g = d.groupby("step")
        sums.append(g.sum())
        counts.append(g.count())
    s = pd.concat(sums).groupby(level=0).sum()
    c = pd.concat(counts).groupby(level=0).sum()
    out = s / c.where(c > 0)
    out["n_tokens"] = s["n_tokens"]
    out["nonfinite_logprob"] = s["nonfinite_logprob"]
    return out.reset_index()


def _sql_files(files: str | list[str]) -> str:
    """A glob, or a list of files, as the argument of DuckDB's read_parquet."""
    quote = lambda f: "'" + str(f).replace("'", "''") + "'"  # noqa: E731
    return quote(files) if isinstance(files, str) else "[" + ", ".join(quote(f) for f in files) + "]"


def pandas_concat_signals(files: list[Path], ctrl: list[tuple[str, int | None]], low_prob: float = LOW_PROB):
    """The other straightforward pandas: read every file, ``pd.concat``, one ``groupby('step')``
    of means (memory grows with the table: run on a subset, see ``--pandas-concat-steps``)."""
    import numpy as np
    import pandas as pd

    cols = BASE_COLS + [f"lp_ctrl_{n}" for n, _ in ctrl]
    df = pd.concat([pd.read_parquet(f, columns=cols) for f in files], ignore_index=True)
    df = df[df["is_generated"].fillna(False).astype(bool)]
    lp = df["logprob"].astype("float64")
    slp = df["sampler_logprob"].astype("float64")
    ent = df["entropy"].astype("float64")
    lp_ok = np.isfinite(lp)
    d = pd.DataFrame({"step": df["step"]})
    d["entropy"] = ent.where(np.isfinite(ent))
    d["low_prob_share"] = (lp < math.log(low_prob)).astype("float64").where(lp_ok)
    d["mismatch/abs_logprob_diff"] = (lp - slp).abs().where(lp_ok & np.isfinite(slp))
    for name, tid in ctrl:
        p = np.exp(df[f"lp_ctrl_{name}"].astype("float64"))
        d[f"ctrl/{name}/p"] = p.where(np.isfinite(p))
        if tid is not None:
            d[f"ctrl/{name}/sampled"] = (df["token_id"] == tid).astype("float64")
    g = d.groupby("step")
    out = g.mean()
    out["n_tokens"] = g.size().astype("float64")
    out["nonfinite_logprob"] = (~lp_ok).groupby(df["step"]).sum().astype("float64")
    return out.reset_index()


def duckdb_sql(files: str | list[str], ctrl: list[tuple[str, int | None]], low_prob: float = LOW_PROB) -> str:
    thr = repr(math.log(low_prob))
    sel = [
        "step",
        'count(*)::DOUBLE AS "n_tokens"',
        'avg(CASE WHEN isfinite(entropy::DOUBLE) THEN entropy::DOUBLE END) AS "entropy"',
        f'avg(CASE WHEN isfinite(logprob::DOUBLE) THEN (logprob::DOUBLE < {thr})::DOUBLE END) AS "low_prob_share"',
        'sum(CASE WHEN logprob IS NOT NULL AND NOT isfinite(logprob::DOUBLE) THEN 1 ELSE 0 END)::DOUBLE '
        'AS "nonfinite_logprob"',
        'avg(CASE WHEN isfinite(logprob::DOUBLE) AND isfinite(sampler_logprob::DOUBLE) '
        'THEN abs(logprob::DOUBLE - sampler_logprob::DOUBLE) END) AS "mismatch/abs_logprob_diff"',
    ]
    for name, tid in ctrl:
        c = f"exp(lp_ctrl_{name}::DOUBLE)"
        sel.append(f'avg(CASE WHEN isfinite({c}) THEN {c} END) AS "ctrl/{name}/p"')
        if tid is not None:
            sel.append(f'avg((token_id = {int(tid)})::DOUBLE) AS "ctrl/{name}/sampled"')
    return (f"SELECT {', '.join(sel)} FROM read_parquet({_sql_files(files)}) "
            "WHERE coalesce(is_generated, false) GROUP BY step ORDER BY step")


CONTEXTS = ("after_call_open", "after_call_close", "turn_start")  # precedence, as token_signals


def roles_of(data: Path) -> dict[str, int]:
    info = json.loads((data / "run.json").read_text())
    out: dict[str, int] = {}
    for t in info.get("control_tokens", []):
        if t.get("role") and isinstance(t.get("token_id"), int):
            out.setdefault(t["role"], t["token_id"])
    return out


def duckdb_ctx_sql(files: str | list[str], ctrl: list[tuple[str, int | None]], roles: dict[str, int],
                   low_prob: float = LOW_PROB) -> str:
    """The same aggregations as `duckdb_sql` plus what the scan adds: each control token's mean
    probability at the key contexts (``ctx/<context>/<tok>``) and the positions found there
    (``ctx/<context>/n``), as token_signals defines them. The contexts' (step, sample, position)
    keys come from small tables (turn starts by GROUP BY, call-tag anchors by a filter and a
    self-join), and the token table is labelled by a LEFT JOIN on them; GROUPING SETS give the
    per-step and per-(step, context) aggregates in one pass; the small result is pivoted in
    polars. (Measured on 40 files, best of 2: 2.3 s against 3.1 s for the same with ``lag``
    window functions over each sample's positions, the other obvious formulation.)"""
    thr = repr(math.log(low_prob))
    o, c, nl = roles.get("call_open"), roles.get("call_close"), roles.get("call_newline")
    anchor_ids = ", ".join(str(i) for i in (o, c, nl) if i is not None) or "NULL"
    if nl is not None:
        after_open = (f"SELECT a.step, a.sample_id, a.position + 2 AS position, 1 AS ctx FROM an a JOIN an b "
                      f"ON a.step = b.step AND a.sample_id = b.sample_id AND b.position = a.position + 1 "
                      f"WHERE a.token_id = {o} AND b.token_id = {nl}")
    else:
        after_open = f"SELECT step, sample_id, position + 1 AS position, 1 AS ctx FROM an WHERE token_id = {o}"
    aggs = [
        'count(*)::DOUBLE AS "n"',
        'sum(CASE WHEN isfinite(entropy::DOUBLE) THEN entropy::DOUBLE END) AS "entropy_s"',
        'count(CASE WHEN isfinite(entropy::DOUBLE) THEN 1 END) AS "entropy_k"',
        f'sum(CASE WHEN isfinite(logprob::DOUBLE) THEN (logprob::DOUBLE < {thr})::DOUBLE END) AS "low_s"',
        'count(CASE WHEN isfinite(logprob::DOUBLE) THEN 1 END) AS "low_k"',
        'sum(CASE WHEN logprob IS NOT NULL AND NOT isfinite(logprob::DOUBLE) THEN 1 ELSE 0 END)::DOUBLE AS "nonfin"',
        'sum(CASE WHEN isfinite(logprob::DOUBLE) AND isfinite(sampler_logprob::DOUBLE) '
        'THEN abs(logprob::DOUBLE - sampler_logprob::DOUBLE) END) AS "mis_s"',
        'count(CASE WHEN isfinite(logprob::DOUBLE) AND isfinite(sampler_logprob::DOUBLE) THEN 1 END) AS "mis_k"',
    ]
    for name, tid in ctrl:
        e = f"exp(lp_ctrl_{name}::DOUBLE)"
        aggs.append(f'sum(CASE WHEN isfinite({e}) THEN {e} END) AS "p_{name}_s"')
        aggs.append(f'count(CASE WHEN isfinite({e}) THEN 1 END) AS "p_{name}_k"')
        if tid is not None:
            aggs.append(f'sum((token_id = {int(tid)})::DOUBLE) AS "smp_{name}"')
    return f"""
        WITH g AS (SELECT * FROM read_parquet({_sql_files(files)}) WHERE coalesce(is_generated, false)),
        ts AS (SELECT step, sample_id, min(position) AS position, 3 AS ctx FROM g GROUP BY step, sample_id, turn),
        an AS (SELECT step, sample_id, position, token_id FROM g WHERE token_id IN ({anchor_ids})),
        ao AS ({after_open}),
        ac AS (SELECT step, sample_id, position + 1 AS position, 2 AS ctx FROM an WHERE token_id = {c}),
        k AS (SELECT step, sample_id, position, min(ctx) AS ctx
              FROM (SELECT * FROM ao UNION ALL SELECT * FROM ac UNION ALL SELECT * FROM ts) GROUP BY ALL),
        t AS (SELECT g.*, coalesce(k.ctx, 0) AS ctx FROM g LEFT JOIN k USING (step, sample_id, position))
        SELECT step, ctx, grouping(ctx) AS all_ctx, {', '.join(aggs)}, count(DISTINCT sample_id) AS samples
        FROM t GROUP BY GROUPING SETS ((step), (step, ctx))"""


def duckdb_ctx_signals(files: str | list[str], ctrl: list[tuple[str, int | None]], roles: dict[str, int],
                       low_prob: float = LOW_PROB):
    import duckdb
    import polars as pl

    con = duckdb.connect()
    try:
        raw = con.sql(duckdb_ctx_sql(files, ctrl, roles, low_prob)).pl()
    finally:
        con.close()

    def ratio(s: str, k: str) -> pl.Expr:
        return pl.when(pl.col(k) > 0).then(pl.col(s) / pl.col(k).cast(pl.Float64))

    whole = raw.filter(pl.col("all_ctx") == 1).select(
        pl.col("step").cast(pl.Int64), pl.col("n").alias("n_tokens"), ratio("entropy_s", "entropy_k").alias("entropy"),
        ratio("low_s", "low_k").alias("low_prob_share"), pl.col("nonfin").alias("nonfinite_logprob"),
        ratio("mis_s", "mis_k").alias("mismatch/abs_logprob_diff"),
        *[ratio(f"p_{n}_s", f"p_{n}_k").alias(f"ctrl/{n}/p") for n, _ in ctrl],
        *[(pl.col(f"smp_{n}") / pl.col("n")).alias(f"ctrl/{n}/sampled") for n, tid in ctrl if tid is not None],
        (pl.col("n") / pl.col("samples").cast(pl.Float64)).alias("completions/mean_length"))
    out = whole
    for code, name in enumerate(CONTEXTS, start=1):
        sub = raw.filter((pl.col("all_ctx") == 0) & (pl.col("ctx") == code)).select(
            pl.col("step").cast(pl.Int64), pl.col("n").alias(f"ctx/{name}/n"),
            *[ratio(f"p_{n}_s", f"p_{n}_k").alias(f"ctx/{name}/{n}") for n, _ in ctrl])
        out = out.join(sub, on="step", how="left").with_columns(pl.col(f"ctx/{name}/n").fill_null(0.0))
    return out.sort("step")


def duckdb_signals(files: str | list[str], ctrl: list[tuple[str, int | None]], low_prob: float = LOW_PROB):
    import duckdb

    con = duckdb.connect()
    try:
        return con.sql(duckdb_sql(files, ctrl, low_prob)).pl()
    finally:
        con.close()


def polars_core_signals(source, ctrl: list[tuple[str, int | None]], low_prob: float = LOW_PROB):
    """The same aggregations as one lazy polars query (streaming), no key contexts."""
    import polars as pl

    lf = source if isinstance(source, pl.LazyFrame) else pl.scan_parquet(source)

    def fin(e: pl.Expr) -> pl.Expr:
        e = e.cast(pl.Float64)
        return pl.when(e.is_finite()).then(e)

    lp, slp = pl.col("logprob").cast(pl.Float64), pl.col("sampler_logprob").cast(pl.Float64)
    aggs = [
        pl.len().cast(pl.Float64).alias("n_tokens"),
        fin(pl.col("entropy")).mean().alias("entropy"),
        pl.when(lp.is_finite()).then((lp < math.log(low_prob)).cast(pl.Float64)).mean().alias("low_prob_share"),
        (pl.col("logprob").is_not_null() & ~lp.is_finite()).sum().cast(pl.Float64).alias("nonfinite_logprob"),
        pl.when(lp.is_finite() & slp.is_finite()).then((lp - slp).abs()).mean().alias("mismatch/abs_logprob_diff"),
    ]
    for name, tid in ctrl:
        aggs.append(fin(pl.col(f"lp_ctrl_{name}").cast(pl.Float64).exp()).mean().alias(f"ctrl/{name}/p"))
        if tid is not None:
            aggs.append((pl.col("token_id") == tid).cast(pl.Float64).mean().alias(f"ctrl/{name}/sampled"))
    return (lf.filter(pl.col("is_generated").fill_null(False)).group_by("step").agg(aggs)
            .sort("step").collect(engine="streaming"))


def to_polars(df):
    import polars as pl

    if isinstance(df, pl.DataFrame):
        out = df
    else:
        out = pl.from_pandas(df)
    return out.with_columns(pl.col("step").cast(pl.Int64)).sort("step")


def compare(a, b, label: str, rtol: float = 1e-9) -> list[str]:
    """Columns of ``a`` also in ``b`` that differ (rows joined on step, NaN == NaN)."""
    import numpy as np

    a, b = to_polars(a), to_polars(b)
    common = [c for c in a.columns if c != "step" and c in b.columns]
    j = a.select("step", *common).join(b.select("step", *common), on="step", how="inner", suffix="__b")
    bad = []
    if j.height == 0 or j.height != min(a.height, b.height):
        bad.append(f"{label}: {j.height} common steps (of {a.height} / {b.height})")
    for c in common:
        x = j.get_column(c).cast(float).to_numpy()
        y = j.get_column(c + "__b").cast(float).to_numpy()
        if not np.allclose(x, y, rtol=rtol, atol=1e-12, equal_nan=True):
            k = int(np.argmax(~np.isclose(x, y, rtol=rtol, atol=1e-12, equal_nan=True)))
            bad.append(f"{label}: {c} differs (step {j['step'][k]}: {x[k]!r} vs {y[k]!r})")
    return bad


# ---------------------------------------------------------------------------------------------
# workers (fresh processes)
# ---------------------------------------------------------------------------------------------


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
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    out = ru.ru_utime + ru.ru_stime
    if children:
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        out += ch.ru_utime + ch.ru_stime
    return out


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
