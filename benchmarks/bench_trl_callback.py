"""Overhead of `DiagnoseCallback` on a real `trl.GRPOTrainer` run (examples/trl_grpo_tool_use.py).

Two arms on the same seed and data, run alternately in one process: TRL alone, and TRL with the
callback at ``--probe-every`` (default 10). Printed: the whole-run time ratio per pair and the
callback's own share of the run (the time spent inside its probe, measured by the callback),
which is the less noisy figure. Target: at most 3 % at probe_every=10.

    python benchmarks/bench_trl_callback.py --steps 20 --repeats 2
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # examples/ is not installed with the package
from examples.trl_grpo_tool_use import build_trainer  # noqa: E402




def _run(steps: int, probe_every: int | None, seed: int) -> tuple[float, float]:
    from diagnose.integrations.trl import DiagnoseCallback

    cb = DiagnoseCallback(probe_every=probe_every) if probe_every else None
    with tempfile.TemporaryDirectory() as d:
        trainer = build_trainer(Path(d) / "run", steps, seed=seed, callbacks=[cb] if cb else [])
        t0 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t0
    return total, (cb.probe_seconds if cb else 0.0)


def main(steps: int = typer.Option(20, min=2), repeats: int = typer.Option(2, min=1),
         probe_every: int = typer.Option(10, min=1), seed: int = 0) -> None:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    ratios, shares = [], []
    for r in range(repeats):
        order = [None, probe_every] if r % 2 == 0 else [probe_every, None]
        times = {}
        for arm in order:
            times[arm] = _run(steps, arm, seed)
        base, (with_cb, inside) = times[None][0], times[probe_every]
        ratios.append(with_cb / base)
        shares.append(inside / with_cb)
        print(f"pair {r}: TRL alone {base:.1f}s, with callback {with_cb:.1f}s (ratio {with_cb / base:.3f}); "
              f"inside the callback {inside:.2f}s = {100 * inside / with_cb:.2f} % of the run")
    print(f"median ratio {statistics.median(ratios):.3f}; median callback share {100 * statistics.median(shares):.2f} % "
          f"(target <= 3 % at probe_every={probe_every}; {steps} steps, {repeats} pairs)")


if __name__ == "__main__":
    typer.run(main)
