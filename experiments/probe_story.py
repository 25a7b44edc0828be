"""What `diagnose probe` found on a run, in one paragraph (the end of scripts/demo.sh).

    python experiments/probe_story.py runs/collapse

Reads ``<run>/capability/`` (written by ``diagnose probe``) and says, per probed checkpoint, the
verdict with the figures behind it: native accuracy, the best format repair and its recovery of
the first probed checkpoint's native accuracy, the teacher-forced likelihood; then whether the
run shows the paper's claim (skill intact under a broken format, recovered by a repair).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl
from rich.console import Console
from rich.markup import escape

from diagnose.capability.results import CapabilityReadError, read_capability

REPAIRS = ("repair_forbid", "repair_prefill", "alt_pythonic", "alt_json")


def story(run: Path) -> list[str]:
    cap = read_capability(run)
    if cap is None or cap.summary.is_empty():
        return [f"{run}: not probed yet (diagnose probe {run})"]
    acc = cap.results.pivot(on="measure", index="step", values="accuracy", aggregate_function="first").sort("step")
    summary = cap.summary.sort("step").join(acc, on="step", how="left")
    first = summary.row(0, named=True)
    ref = first.get("native") or 0.0
    lines, claim = [], False
    for i, r in enumerate(summary.iter_rows(named=True)):
        native = r.get("native")
        repairs = {m: r[m] for m in REPAIRS if r.get(m) is not None}
        best = max(repairs, key=repairs.get) if repairs else None
        text = f"step {r['step']}: {r['verdict']} (native accuracy {native:.2f}" if native is not None else \
            f"step {r['step']}: {r['verdict']} ("
        if best is not None:
            rec = f" = {repairs[best] / ref:.0%} of step {first['step']}'s native" if ref > 0 and i > 0 else ""
            text += f"; best format repair / other syntax: {best} {repairs[best]:.2f}{rec}"
        if r.get("likelihood") is not None:
            text += f"; likelihood {r['likelihood']:.2f}"
        lines.append(text + ")")
        if ref > 0 and native is not None and best is not None and native < 0.5 * ref and repairs[best] >= 0.8 * ref:
            claim = True
    if claim:
        lines.append("=> the skill is intact under a broken format: a format repair restores most of the accuracy "
                     "(the paper's claim holds on this run).")
    else:
        lines.append("=> no checkpoint shows a repair restoring >= 80 % of the first checkpoint's accuracy while "
                     "native accuracy is below half of it: on this run the probe does NOT show the paper's "
                     "'capability intact, format broken' by repair.")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    a = ap.parse_args()
    console = Console()
    try:
        lines = story(a.run)
    except CapabilityReadError as e:
        Console(stderr=True).print(f"[red]error:[/] {escape(str(e))}")
        sys.exit(2)
    console.print("[bold]What the capability probe found[/]")
    for line in lines:
        console.print(escape(line), soft_wrap=True)


if __name__ == "__main__":
    main()
