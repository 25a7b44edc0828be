"""`diagnose scan` on verl, TRL and open-instruct runs of 10^6 rollouts, against the polars
decode floor and pandas, side by side in one run, with peak RSS.

    pip install -e '.[bench,qwen]'                               # pandas; the Qwen2.5 tokenizer
    python benchmarks/bench_foreign.py --data /work/scratch/i24/foreign       # 1,048,576 rollouts each
    python benchmarks/bench_foreign.py --quick                   # 16k rollouts each, smoke run
    python benchmarks/bench_foreign.py --layouts verl --repeats 2 --pandas-files 8

The runs are written once by `foreign_runs.py` (the synth writers' layout code, unique texts
of 2-8k characters; an existing run with the same parameters is reused). Per layout, each
contender runs in a fresh process started by `bench_scan.Launcher` (so its peak RSS is its
own), interleaved over ``--repeats`` rounds; the best wall time, least CPU time and highest peak
RSS are kept:

* ``scan``: ``scan_run(path, use_cache=False)`` (= ``diagnose scan --no-cache``; open-instruct
  with ``tokenizer=`` the Qwen2.5 folder): read, split turns, classify, signals, detection;
* ``floor``: polars reads the columns the scan reads and aggregates them per step (mean reward,
  mean completion length, distinct prompts; open-instruct: the id and log-prob lists, no
  decoding): what no reader of these files can go below;
* ``pandas``: per file, what users write -- ``pd.read_json(f, lines=True)`` (verl dumps,
  open-instruct shards) or ``pd.read_parquet(f)`` (TRL), then a ``groupby("step")`` of the
  same aggregates; on the first ``--pandas-files`` files, time scaled by rows.

Then the incremental re-scan on a linked copy: ``scan_run(path)`` builds the cache, one new step
is appended as the trainer writes it (verl: ``<step>.jsonl`` and its metrics line; TRL:
``completions_<step>.parquet``; open-instruct: the step's lines appended to the last shard),
and ``scan_run(path)`` again. Goals (issue 24): scan <= 3x the floor (verl, TRL), <= 5x
(open-instruct, with the tokenizer), peak RSS <= 2 GB, incremental < 5 % of a full scan.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scan import Clock, Launcher, vm_hwm  # noqa: E402  (launcher first: before heavy imports)

GOAL_FLOOR = {"verl": 3.0, "trl": 3.0, "open_instruct": 5.0}
GOAL_RSS = 2e9
GOAL_INCREMENTAL = 0.05


# ---------------------------------------------------------------------------------------------
# the files of each layout
# ---------------------------------------------------------------------------------------------


def data_files(layout: str, run: Path) -> list[Path]:
    if layout == "verl":
        return sorted((run / "rollout_data").glob("*.jsonl"), key=lambda f: int(f.stem))
    if layout == "trl":
        return sorted((run / "completions").glob("completions_*.parquet"))
    return sorted(run.glob("*_rollouts_*.jsonl"))


def load_options(layout: str, run: Path) -> dict[str, Any]:
    return {"tokenizer": str(run.parent / "qwen2.5-tokenizer")} if layout == "open_instruct" else {}


# ---------------------------------------------------------------------------------------------
# contenders (in a fresh process)
# ---------------------------------------------------------------------------------------------


def _children_peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def floor(layout: str, files: list[Path]):
    """The columns the scan reads, decoded by polars and aggregated per step, nothing else."""
    import polars as pl

    if layout == "verl":
        schema = {"input": pl.String, "output": pl.String, "score": pl.Float64, "step": pl.Int64}
        lf = pl.scan_ndjson(files, schema=schema)
        length = pl.col("output").str.len_chars()
        prompt = pl.col("input")
        reward = pl.col("score")
    elif layout == "trl":
        lf = pl.scan_parquet(files).select("step", "prompt", "completion", "accuracy_reward", "format_reward")
        # the message texts and calls decoded (a list length alone would skip the strings)
        msg = pl.element().struct
        length = (pl.col("completion").list.eval(msg.field("content").str.len_chars()).list.sum()
                  + pl.col("completion").list.eval(msg.field("tool_calls").list.len()).list.sum())
        prompt = pl.col("prompt").list.last().struct.field("content")
        reward = pl.col("accuracy_reward") + pl.col("format_reward")
    else:
        schema = {"step": pl.Int64, "prompt_tokens": pl.List(pl.Int64), "response_tokens": pl.List(pl.Int64),
                  "reward": pl.Float64, "logprobs": pl.List(pl.Float64)}
        lf = pl.scan_ndjson(files, schema=schema)
        length = pl.col("response_tokens").list.len()
        prompt = pl.col("prompt_tokens").list.len()
        reward = pl.col("reward") + pl.col("logprobs").list.sum() * 0
    return lf.group_by("step").agg(reward.mean().alias("reward"), length.mean().alias("length"),
                                   prompt.n_unique().alias("prompts"), pl.len().alias("n")) \
        .sort("step").collect(engine="streaming")


def pandas_per_file(layout: str, files: list[Path]):
    """What users write: each file read whole by pandas, the same aggregates per step."""
    import pandas as pd

    parts = []
    for f in files:
        df = pd.read_parquet(f) if layout == "trl" else pd.read_json(f, lines=True)
        if layout == "verl":
            df["length"] = df["output"].str.len()
            df["reward"] = df["score"]
            df["key"] = df["input"]
        elif layout == "trl":
            df["length"] = df["completion"].map(len)
            df["reward"] = df["accuracy_reward"] + df["format_reward"]
            df["key"] = df["prompt"].map(lambda m: m[-1]["content"])
        else:
            df["length"] = df["response_tokens"].map(len)
            df["key"] = df["prompt_tokens"].map(len)
        parts.append(df.groupby("step").agg(reward=("reward", "mean"), length=("length", "mean"),
                                            prompts=("key", "nunique"), n=("reward", "size")))
    return pd.concat(parts)


def worker(name: str, layout: str, run: Path, out: Path, opts: dict[str, Any]) -> None:
    res: dict[str, Any] = {"name": name}
    clock = Clock(children=True)
    files = data_files(layout, run)
    if name == "scan":
        from diagnose.scan.run import scan_run

        clock.start()
        r = scan_run(run, use_cache=False, **load_options(layout, run))
        res["seconds"], res["cpu"] = clock.lap()
        res["verdict"], res["steps"] = r.verdict, r.signals.height
        res["onset"] = r.episodes[0].onset_step if r.episodes else None
        res["issues"] = len(r.issues)
    elif name == "floor":
        clock.start()
        df = floor(layout, files)
        res["seconds"], res["cpu"] = clock.lap()
        res["rows"] = int(df.get_column("n").sum())
    elif name == "pandas":
        k = opts.get("pandas_files") or len(files)
        clock.start()
        df = pandas_per_file(layout, files[:k])
        res["seconds"], res["cpu"] = clock.lap()
        res["rows"] = int(df["n"].sum())
    elif name == "incremental":
        res.update(incremental(layout, run, Path(opts["tmp"])))
    res["vm_hwm"] = vm_hwm()
    res["children_peak"] = _children_peak()  # the largest pool worker (0: no pool)
    (out / "result.json").write_text(json.dumps(res, default=str))


# ---------------------------------------------------------------------------------------------
# incremental re-scan
# ---------------------------------------------------------------------------------------------


def linked_copy(src: Path, dst: Path) -> None:
    """Hard links of the run's files (a trainer never rewrites them), dot folders left out;
    files that get appended to (metrics, the last open-instruct shard) are copied."""
    for f in src.rglob("*"):
        rel = f.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or f.name == "bench_params.json":
            continue
        if f.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(f, dst / rel)


def add_step(layout: str, run: Path) -> int:
    """Append one step as the trainer writes it; returns the new step."""
    import polars as pl

    files = data_files(layout, run)
    if layout == "verl":
        last = files[-1]
        new = int(last.stem) + 1
        lines = last.read_text().splitlines()
        with open(run / "rollout_data" / f"{new}.jsonl", "w") as fh:  # _dump_generations: "w"
            for ln in lines:
                obj = json.loads(ln)
                obj["step"] = new
                fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
        metrics = next((run / "verl_grpo_tooluse").glob("*.jsonl"))
        entry = json.loads(metrics.read_text().splitlines()[-1])
        entry["step"] = new
        _append_copy(metrics, json.dumps(entry) + "\n")
        return new
    if layout == "trl":
        last = files[-1]
        new = int(last.stem.split("_")[-1]) + 1
        df = pl.read_parquet(last).with_columns(pl.lit(new, dtype=pl.Int64).alias("step"))
        df.write_parquet(last.with_name(f"completions_{new:05d}.parquet"))
        return new
    shard = files[-1]
    lines = [json.loads(ln) for ln in shard.read_text().splitlines()]
    new = max(r["step"] for r in lines) + 1
    step_rows = [r for r in lines if r["step"] == new - 1]
    text = "".join(json.dumps({**r, "step": new}) + "\n" for r in step_rows)
    _append_copy(shard, text)
    return new


def _append_copy(path: Path, text: str) -> None:
    """Append to a file that may be a hard link into the original run: break the link first."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.copy2(path, tmp)
    with open(tmp, "a") as fh:
        fh.write(text)
    os.replace(tmp, path)


def incremental(layout: str, run: Path, tmp: Path) -> dict[str, Any]:
    from diagnose.scan.run import scan_run

    copy = Path(tempfile.mkdtemp(prefix=f"inc-{layout}-", dir=tmp)) / run.name
    linked_copy(run, copy)
    opts = load_options(layout, run)
    clock = Clock(children=True)
    clock.start()
    scan_run(copy, **opts)
    build = clock.lap()
    new = add_step(layout, copy)
    clock.lap()
    r = scan_run(copy, **opts)
    again = clock.lap()
    shutil.rmtree(copy.parent, ignore_errors=True)
    return {"build_seconds": build[0], "seconds": again[0], "cpu": again[1], "new_step": new,
            "signals": r.cache.signals if r.cache else None,
            "steps_recomputed": r.cache.steps_recomputed if r.cache else None}


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def run_worker(launcher: Launcher, name: str, layout: str, run: Path, tmp: Path, opts: dict[str, Any]) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix=f"{layout}-{name}-", dir=tmp))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--layouts", layout, "--worker-run", str(run),
           "--worker-out", str(out), "--worker-opts", json.dumps({**opts, "tmp": str(tmp)})]
    r = launcher.run(cmd)
    if r["rc"] != 0:
        raise SystemExit(f"worker {layout}/{name} failed with exit code {r['rc']}")
    res = json.loads((out / "result.json").read_text())
    res["peak_rss"] = r["maxrss"]
    # with a pool: the parent's peak plus every worker at the largest worker's peak (an upper
    # bound of what the processes held at once)
    workers = min(8, len(os.sched_getaffinity(0))) if res.get("children_peak") else 0
    res["peak_rss_tree"] = r["maxrss"] + workers * res.get("children_peak", 0)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/bench_foreign"))
    ap.add_argument("--rollouts", type=int, default=1_048_576)
    ap.add_argument("--quick", action="store_true", help="16k rollouts per layout (smoke run)")
    ap.add_argument("--layouts", default="verl,trl,open_instruct")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--pandas-files", type=int, default=None,
                    help="pandas on the first N files only, time scaled by rows (default: all)")
    ap.add_argument("--no-incremental", action="store_true")
    ap.add_argument("--worker")
    ap.add_argument("--worker-run", type=Path)
    ap.add_argument("--worker-out", type=Path)
    ap.add_argument("--worker-opts", default="{}")
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.layouts, a.worker_run, a.worker_out, json.loads(a.worker_opts))
        return
    launcher = Launcher()
    import foreign_runs

    p = foreign_runs.params_for(16_384 if a.quick else a.rollouts, a.quick)
    print(f"load: {os.getloadavg()}  (uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()})")
    tmp = Path(tempfile.mkdtemp(prefix="bench_foreign-"))
    report: dict[str, Any] = {}
    try:
        for layout in a.layouts.split(","):
            run = foreign_runs.ensure(layout, a.data, p)
            files = data_files(layout, run)
            meta = json.loads((run / "bench_params.json").read_text())
            print(f"\n== {layout}: {meta['rollouts']:,} rollouts in {len(files)} files, {meta['bytes'] / 1e9:.2f} GB")
            best: dict[str, dict[str, Any]] = {}
            for _ in range(a.repeats):
                for name in ("floor", "scan", "pandas"):
                    r = run_worker(launcher, name, layout, run, tmp, {"pandas_files": a.pandas_files})
                    if name == "pandas" and a.pandas_files and a.pandas_files < len(files):
                        scale = meta["rollouts"] / r["rows"]
                        r["seconds"] *= scale
                        r["cpu"] *= scale
                        r["scaled"] = scale
                    b = best.setdefault(name, r)
                    b["seconds"] = min(b["seconds"], r["seconds"])
                    b["cpu"] = min(b["cpu"], r["cpu"])
                    b["peak_rss"] = max(b["peak_rss"], r["peak_rss"])
                    b["peak_rss_tree"] = max(b["peak_rss_tree"], r["peak_rss_tree"])
            if not a.no_incremental:
                best["incremental"] = run_worker(launcher, "incremental", layout, run, tmp, {})
            report[layout] = best
            show(layout, best, meta)
    finally:
        launcher.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nload: {os.getloadavg()}")
    print(json.dumps(report, default=str))


def show(layout: str, best: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
    print(f"{'contender':<12} {'wall':>9} {'CPU':>9} {'peak RSS':>10} {'with pool':>10}")
    for name in ("scan", "floor", "pandas", "incremental"):
        r = best.get(name)
        if r:
            extra = f"  (x{r['scaled']:.1f} scaled)" if r.get("scaled") else ""
            print(f"{name:<12} {r['seconds']:>8.2f}s {r['cpu']:>8.2f}s {r['peak_rss'] / 1e9:>8.2f}GB "
                  f"{r['peak_rss_tree'] / 1e9:>8.2f}GB{extra}")
    s, f = best["scan"], best["floor"]
    print(f"scan: verdict {s.get('verdict')}, onset {s.get('onset')}, {s.get('steps')} steps, {s.get('issues')} issues")
    ratio = s["seconds"] / f["seconds"]
    goal = GOAL_FLOOR[layout]
    print(f"  scan / decode floor   {ratio:6.2f}   goal <= {goal}   {'PASS' if ratio <= goal else 'FAIL'}"
          f"   (CPU seconds: {s['cpu'] / f['cpu']:.2f})")
    print(f"  pandas / scan         {best['pandas']['seconds'] / s['seconds']:6.2f}")
    rss = s["peak_rss_tree"]
    print(f"  scan peak RSS         {rss / 1e9:6.2f} GB  goal <= 2 GB  {'PASS' if rss <= GOAL_RSS else 'FAIL'}"
          "   (parent + pool workers)")
    inc = best.get("incremental")
    if inc:
        q = inc["seconds"] / s["seconds"]
        print(f"  incremental / full    {q:6.3f}   goal < {GOAL_INCREMENTAL}   {'PASS' if q < GOAL_INCREMENTAL else 'FAIL'}"
              f"   ({inc['seconds']:.2f} s; signals {inc.get('signals')}, steps {inc.get('steps_recomputed')})")


if __name__ == "__main__":
    main()
