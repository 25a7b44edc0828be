"""How many healthy RL steps come before the collapse, and what a run costs (issue 22).

    OMP_NUM_THREADS=1 python experiments/collapse_onset.py --seeds 0,1,2 --out runs/onset [--set key=value ...]

Trains the `collapse` preset (with any ``--set`` overrides) once per seed, one run at a time,
and prints per seed: the first RL step, the scan's onset, the healthy RL steps before it (onset
- first RL step), the trough, the wall time and the CPU time of the training process (user +
system over all its threads, from ``resource.getrusage``: on a machine shared with other jobs the
wall time says little, the CPU time is what the run costs). A run already complete under --out
is scanned, not retrained (its times are then read back from ``<run>/timing.json``).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import polars as pl
from rich.console import Console

from diagnose.rundir import RunReader
from diagnose.scan.run import scan_run
from train_minimal.config import build_config
from train_minimal.presets import preset
from train_minimal.trainer import train

console = Console(stderr=True)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def train_timed(cfg, path: Path) -> dict[str, float]:
    """Train ``cfg`` into ``path`` unless complete; the wall and CPU seconds, kept in timing.json."""
    timing = path / "timing.json"
    try:
        if int(RunReader(path).metrics()["step"].max()) >= cfg.sft.steps + cfg.grpo.steps and timing.exists():
            return json.loads(timing.read_text())
    except Exception:  # noqa: BLE001 - no run yet, or unreadable: (re)train it
        pass
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    train(cfg, path, console=console, resume=(path / "run.json").exists())
    out = {"wall_s": time.perf_counter() - wall0, "cpu_s": cpu_seconds() - cpu0}
    timing.write_text(json.dumps(out))
    return out


def onset_row(path: Path) -> dict[str, object]:
    m = RunReader(path).metrics()
    rl = m.filter(pl.col("phase") == "rl").sort("step")
    first_rl = int(rl["step"].min())
    r = scan_run(path)
    row: dict[str, object] = {"verdict": r.verdict, "first_rl_step": first_rl, "onset": None,
                              "healthy_rl_steps": None, "trough": None,
                              "reward_first_rl_steps": " ".join(f"{v:.2f}" for v in rl["reward"].head(12))}
    if r.episodes:
        ep = r.episodes[0]
        row.update(onset=ep.onset_step, healthy_rl_steps=ep.onset_step - first_rl, trough=ep.trough_step)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="runs/onset")
    ap.add_argument("--preset", default="collapse")
    ap.add_argument("--set", action="append", default=[], help="override for every run, e.g. grpo.lr=5e-4")
    a = ap.parse_args()
    rows = []
    for seed in (int(s) for s in a.seeds.split(",")):
        cfg = build_config(preset(a.preset), overrides=[f"seed={seed}", f"name={a.preset}-s{seed}", *a.set])
        path = Path(a.out) / f"{a.preset}-s{seed}"
        times = train_timed(cfg, path)
        rows.append({"seed": seed, **onset_row(path), **{k: round(v) for k, v in times.items()}})
        print(json.dumps(rows[-1]), flush=True)
    with pl.Config(tbl_cols=-1, tbl_width_chars=200, fmt_str_lengths=80, tbl_hide_dataframe_shape=True):
        print(pl.DataFrame(rows))


if __name__ == "__main__":
    main()
