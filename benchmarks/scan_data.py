"""The run benchmarks/bench_scan.py scans: a large synthetic run (``write_synthetic_run``, a
collapse near the end) generated once and reused while its parameters match
(``bench_params.json``), and what is measured about it (rows, bytes on disk and in memory)."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

GIB = 1 << 30
TARGET_TABLE = 2 * GIB  # the token table must be larger than this in memory


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
