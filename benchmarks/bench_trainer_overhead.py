"""Trainer step time with instrumentation (token traces + control-token probe + attribution)
on vs off: same config, same seeds (so identical rollouts), same process, alternating runs.

    python benchmarks/bench_trainer_overhead.py [--steps 8] [--repeats 3] [--model tiny]

Prints the median GRPO step time of each arm and their ratio, and the median of the paired
ratios (the same step of the same round in both arms: identical rollouts and updates, so the
pairing removes the step-to-step variation). The arms alternate which one runs first in each
round (an arm always run first was measured up to 5 % slower: warm-up, not instrumentation).
Target: overhead <= 5 %.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from rich.console import Console

from diagnose.rundir import RunReader
from train_minimal.config import build_config
from train_minimal.trainer import train

ON = ["log.traces=true", "log.attribution=true", "log.probe_every=5"]
OFF = ["log.traces=false", "log.attribution=false", "log.probe_every=0"]


def step_times(model: str, steps: int, arm: list[str], out: Path) -> tuple[list[float], list[float]]:
    cfg = build_config(overrides=[
        f"model.path={model}", f"grpo.steps={steps}", "sft.steps=0", "rollout.prompts_per_step=4",
        "rollout.group_size=8", "rollout.max_turns=4", "rollout.max_new_tokens=48", "data.train_tasks=64",
        "log.eval_every=0", f"log.checkpoint_every={steps}", "log.probe_tasks=8", *arm])
    train(cfg, out, console=Console(file=open(os.devnull, "w")))
    m = RunReader(out).metrics()
    total = m["time/step"].to_numpy()[1:]  # drop the first (warm-up) step
    roll = m["time/rollout"].to_numpy()[1:]
    # whole step, and the part after rollouts (identical rollouts in both arms dilute the ratio)
    return list(total), list(total - roll)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=4, help="rounds (even: each arm runs first equally often)")
    ap.add_argument("--model", default="tiny")
    a = ap.parse_args()
    res: dict[str, tuple[list[float], list[float]]] = {"on": ([], []), "off": ([], [])}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            order = (("on", ON), ("off", OFF)) if r % 2 == 0 else (("off", OFF), ("on", ON))
            for name, arm in order:
                full, upd = step_times(a.model, a.steps, arm, Path(tmp) / f"{name}{r}")
                res[name][0].extend(full)
                res[name][1].extend(upd)
    for i, what in enumerate(("whole GRPO step", "step without rollouts")):
        on, off = statistics.median(res["on"][i]), statistics.median(res["off"][i])
        paired = statistics.median(x / y for x, y in zip(res["on"][i], res["off"][i]))
        print(f"{what:>22} (median of {len(res['on'][i])}): instrumented {on:.3f}s, plain {off:.3f}s, "
              f"ratio {on / off:.3f}, paired ratio {paired:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
