"""Tracker ingest: our readers against the raw reader alone, on a W&B history and a TensorBoard run of
the same size (default 100,000 steps x 10 metrics).

* **W&B**: an offline run written by the wandb SDK as transformers' ``WandbCallback`` logs
  (``define_metric("*", step_metric="train/global_step")``, ``train/*`` keys). Raw: the wandb CLI's
  ``wandb leet inspect --json`` output read by polars (``pl.read_ndjson`` of every record; and,
  stricter, of its history records only: ``raw_wandb_history``). Ours:
  `diagnose.adapters.trackers.wandb.read_run` (the same CLI, the history by trainer step, config,
  summary, tables) + `signal_names`.
* **TensorBoard**: the same metrics written with torch's ``SummaryWriter.add_scalar`` (as
  ``TensorBoardCallback`` writes them). Raw: tensorboard's ``EventAccumulator`` with every scalar
  point kept (``size_guidance={SCALARS: 0}``), ``Reload()`` and ``Scalars(tag)`` of every tag.
  Ours: `diagnose.adapters.trackers.tensorboard.read_run` + `signal_names`.

Rounds alternate the order of the two contenders; the best time of each is kept and the ratio
ours / raw printed. Target: at most 1.5. The data is written once into ``--data`` and reused while
its parameters match (writing 100,000 W&B steps takes minutes).

    python benchmarks/bench_trackers.py --quick          # 10,000 steps
    python benchmarks/bench_trackers.py --repeats 3      # 100,000 steps
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diagnose.adapters.trackers import tensorboard as tb_reader  # noqa: E402
from diagnose.adapters.trackers import wandb as wb_reader  # noqa: E402
from diagnose.adapters.trackers.names import signal_names  # noqa: E402

KEYS = ("reward", "reward_std", "entropy", "kl", "grad_norm", "loss", "learning_rate", "clip_ratio/region_mean",
        "completions/mean_length", "epoch")


def _values(step: int, steps: int, keys: list[str]) -> dict[str, float]:
    rng = random.Random(step)
    return {f"train/{k}": rng.random() + (1.0 if step < steps // 2 else 0.0) for k in keys}


def _write_wandb(d: Path, steps: int, keys: list[str]) -> None:
    code = f"""
import random, sys, wandb
sys.path.insert(0, {str(ROOT)!r})
from benchmarks.bench_trackers import _values
run = wandb.init(project="bench", name="bench", dir={str(d)!r}, mode="offline")
run.define_metric("train/global_step")
run.define_metric("*", step_metric="train/global_step", step_sync=True)
keys = {keys!r}
for s in range(1, {steps} + 1):
    run.log({{**_values(s, {steps}, keys), "train/global_step": s}})
run.finish()
"""
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "WANDB_SILENT": "true"})


def _write_tensorboard(d: Path, steps: int, keys: list[str]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(d))
    for s in range(1, steps + 1):
        for k, v in _values(s, steps, keys).items():
            w.add_scalar(k, v, s)
    w.close()


def _data(root: Path, steps: int, keys: list[str]) -> tuple[Path, Path]:
    params = {"steps": steps, "keys": keys, "version": 1}
    marker = root / "bench_params.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == params):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        t = time.perf_counter()
        _write_wandb(root, steps, keys)
        _write_tensorboard(root / "runs" / "bench", steps, keys)
        marker.write_text(json.dumps(params))
        print(f"data written in {time.perf_counter() - t:.0f}s to {root}")
    (ref,) = wb_reader.find_runs(root)
    return wb_reader.run_file(ref.path), root / "runs" / "bench"


def raw_wandb(f: Path) -> int:
    out = subprocess.run(wb_reader.inspect_command(f), capture_output=True, check=True, env=wb_reader._env()).stdout
    return pl.read_ndjson(io.BytesIO(out), infer_schema_length=None).height


def raw_wandb_history(f: Path) -> int:
    """The stricter baseline: the CLI's history records only, read by polars (no summaries)."""
    out = subprocess.run(wb_reader.inspect_command(f), capture_output=True, check=True, env=wb_reader._env()).stdout
    lines = b"\n".join(x for x in out.split(b"\n") if x[:40].find(b'"type":"history"') >= 0)
    return pl.read_ndjson(io.BytesIO(lines), infer_schema_length=None).height


def ours_wandb(f: Path) -> int:
    (ref,) = wb_reader.find_runs(f)
    run = wb_reader.read_run(ref)
    return signal_names(run.metrics, "trl", run.config).height


def raw_tensorboard(d: Path) -> int:
    acc = tb_reader.accumulator(d)
    acc.Reload()
    return sum(len(acc.Scalars(t)) for t in acc.Tags()["scalars"])


def ours_tensorboard(d: Path) -> int:
    return signal_names(tb_reader.read_run(d).metrics, "trl").height


def _time(fn, arg) -> tuple[float, int]:  # noqa: ANN001
    t = time.perf_counter()
    n = fn(arg)
    return time.perf_counter() - t, n


def main(steps: int = typer.Option(100_000, min=10), metrics: int = typer.Option(len(KEYS), min=1, max=len(KEYS)),
         repeats: int = typer.Option(3, min=1), quick: bool = typer.Option(False, help="10,000 steps"),
         data: Path = typer.Option(Path("/tmp/bench_trackers"))) -> None:
    if quick:
        steps = 10_000
        data = data.with_name(data.name + "_quick")
    keys = list(KEYS[:metrics])
    wfile, tdir = _data(data, steps, keys)
    best: dict[str, float] = {}
    for r in range(repeats):
        pairs = [("raw_wandb", raw_wandb, wfile), ("raw_wandb_history", raw_wandb_history, wfile),
                 ("ours_wandb", ours_wandb, wfile),
                 ("raw_tensorboard", raw_tensorboard, tdir), ("ours_tensorboard", ours_tensorboard, tdir)]
        if r % 2:
            pairs = [pairs[2], pairs[1], pairs[0], pairs[4], pairs[3]]
        for name, fn, arg in pairs:
            t, n = _time(fn, arg)
            best[name] = min(best.get(name, t), t)
            print(f"round {r}: {name:<17} {t:7.2f}s  ({n:,} {'steps' if name.startswith('ours') else 'rows/points'})")
    for kind, raw in (("wandb", "raw_wandb"), ("wandb", "raw_wandb_history"), ("tensorboard", "raw_tensorboard")):
        ratio = best[f"ours_{kind}"] / best[raw]
        print(f"{kind}: ours {best[f'ours_{kind}']:.2f}s, {raw} {best[raw]:.2f}s, ratio {ratio:.2f} "
              f"(target <= 1.5; {steps:,} steps x {len(keys)} metrics, best of {repeats})")


if __name__ == "__main__":
    typer.run(main)
