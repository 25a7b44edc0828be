"""CPU time of `diagnose watch` per poll, and how it grows with the run's length.

For each run length N (steps already written), in one process: the first poll (a full scan
that builds the cache), idle polls (nothing changed: a stat walk of the run), and polls right
after one new step was appended the way the trainer writes it (an incremental re-scan: the new
step's files read, the metrics layer and detection redone). Formats: ``native`` (our run
format, rollouts + token + probe tables, a step appended as `scan_incremental.add_step_copy`
does: temp file + rename) and ``verl`` (a ``<step>.jsonl`` dump and one file-logger line).

Printed per format and N: CPU seconds (this process, all threads) of each poll kind, and the
watch's CPU share of one core for a trainer that logs one step per 10 s, polled every
``--interval`` s: ``(new_step + (10/interval - 1) * idle) / 10``. Target (issue 25): < 2 %.
The growth is the ratio of the per-new-step CPU at the longest and the shortest run. The last
column is what the watch's default ``--max-cpu 0.02`` does about it: a re-scan waits
``new_step / 0.02`` seconds after the last one, so where that exceeds the step period the
watch re-scans every k steps (and alerts up to k - 1 steps later) instead of using more CPU.

    python benchmarks/bench_watch.py                       # N = 50, 200, 800; ~2 min
    python benchmarks/bench_watch.py --lengths 100 400 --repeats 10
    python benchmarks/bench_watch.py --formats verl --lengths 100 --verl-samples 256   # a real batch size
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan_incremental import Clock, add_step_copy  # noqa: E402

STEP_PERIOD = 10.0  # seconds between a trainer's steps, for the CPU share
TARGET = 0.02


def _native(path: Path, n: int) -> None:
    from diagnose.synth.native import write_synthetic_run

    write_synthetic_run(path, steps=n, collapse_at=None, samples_per_step=16, tokens_per_sample=48)


class _Verl:
    """A verl run written whole with ``n + extra`` steps, shown first ``n`` steps at a time."""

    def __init__(self, path: Path, n: int, extra: int, samples: int = 16) -> None:
        from diagnose.synth.foreign import Sampling, write_verl_run

        self.src = path.with_name(path.name + "-src")
        sampling = Sampling(group_size=min(8, samples), prompts_per_step=max(1, samples // min(8, samples)))
        write_verl_run(self.src, steps=n + extra, validation=False, sampling=sampling)
        self.log = next(self.src.rglob("qwen2.5_grpo_tooluse.jsonl")).relative_to(self.src)
        self.lines = {json.loads(ln)["step"]: ln for ln in (self.src / self.log).read_bytes().splitlines(keepends=True)}
        (path / "rollout_data").mkdir(parents=True)
        (path / self.log).parent.mkdir(parents=True)
        (path / self.log).write_bytes(b"")
        self.path = path
        for s in range(n + 1):
            self.add(s)

    def add(self, step: int) -> None:
        dump = self.src / "rollout_data" / f"{step}.jsonl"
        if dump.exists():
            shutil.copyfile(dump, self.path / "rollout_data" / dump.name)
        if step in self.lines:
            with open(self.path / self.log, "ab") as fh:
                fh.write(self.lines[step])


def measure(fmt: str, n: int, repeats: int, idle: int, workdir: Path, verl_samples: int = 16) -> dict[str, float]:
    from diagnose.watch import Watcher, WatchTarget

    run = workdir / f"{fmt}-{n}"
    if fmt == "native":
        _native(run, n)
        last = n - 1

        def add(step: int) -> None:
            add_step_copy(run, step)
    else:
        v = _Verl(run, n, repeats, verl_samples)
        last, add = n, v.add
    watcher = Watcher(WatchTarget(run))
    clock = Clock(children=True)  # the scan's reader pool too (as --max-cpu counts it)
    clock.start()
    watcher.poll()
    first = clock.lap()[1]
    idle_cpu, step_cpu = [], []
    for i in range(repeats):
        add(last + 1 + i)
        clock.start()
        events = watcher.poll()
        step_cpu.append(clock.lap()[1])
        assert any(e.kind == "step" for e in events), f"step {last + 1 + i} not seen"
        assert watcher.result.cache.signals == "incremental", watcher.result.cache.describe()
        for _ in range(idle):
            clock.start()
            assert watcher.poll() == []
            idle_cpu.append(clock.lap()[1])
    return {"first": first, "idle": statistics.median(idle_cpu), "step": statistics.median(step_cpu),
            "files": len(watcher.tree or {})}


def share(r: dict[str, float], interval: float) -> float:
    polls = max(1.0, STEP_PERIOD / interval)
    return (r["step"] + (polls - 1) * r["idle"]) / STEP_PERIOD


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[50, 200, 800])
    ap.add_argument("--formats", nargs="+", default=["native", "verl"])
    ap.add_argument("--repeats", type=int, default=5, help="new steps appended per run length")
    ap.add_argument("--idle", type=int, default=10, help="idle polls after each new step")
    ap.add_argument("--interval", type=float, default=5.0, help="the watch's poll interval, for the CPU share")
    ap.add_argument("--verl-samples", type=int, default=16, help="dumped samples per verl step (a real GRPO batch: "
                    "256-1024)")
    args = ap.parse_args()
    os.environ.setdefault("DIAGNOSE_HOME", tempfile.mkdtemp(prefix="bench_watch_home"))
    print(f"CPU seconds per poll (median); share of one core at one step per {STEP_PERIOD:g} s, "
          f"--interval {args.interval:g}; target < {TARGET:.0%}")
    print(f"{'format':8} {'steps':>6} {'files':>6} {'first poll':>11} {'idle poll':>10} {'new-step poll':>14} "
          f"{'CPU share':>10} {'--max-cpu 0.02: re-scan every':>30}")
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench_watch") as d:
        for fmt in args.formats:
            rows = {}
            for n in args.lengths:
                r = rows[n] = measure(fmt, n, args.repeats, args.idle, Path(d), args.verl_samples)
                s = share(r, args.interval)
                ok &= s < TARGET
                k = max(1, math.ceil(r["step"] / TARGET / STEP_PERIOD))
                print(f"{fmt:8} {n:>6} {r['files']:>6} {r['first']:>10.3f}s {r['idle'] * 1e3:>8.2f}ms "
                      f"{r['step']:>13.3f}s {s:>9.2%} {k:>24} step(s)")
            lo, hi = min(rows), max(rows)
            print(f"{fmt:8} growth of the new-step poll, {lo} -> {hi} steps: x{rows[hi]['step'] / rows[lo]['step']:.2f}"
                  f" (run x{hi / lo:g}); idle poll x{rows[hi]['idle'] / rows[lo]['idle']:.2f}")
    print("PASS" if ok else "FAIL", f"(CPU share < {TARGET:.0%} at every length, re-scanning at every step)")


if __name__ == "__main__":
    main()
