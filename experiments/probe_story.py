"""What `diagnose probe` found on a run, in plain words (the end of scripts/demo.sh).

    python experiments/probe_story.py runs/collapse

Reads ``<run>/capability/`` (written by ``diagnose probe``) and prints, per probed checkpoint,
the verdict with the figures behind it and what it means (``diagnose.capability.reading``),
then which claim the evidence supports: the skill intact under a broken format (the paper's
claim), the calls still recognised but no longer generated, or the skill lost.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from diagnose.capability.reading import read_probe
from diagnose.capability.results import CapabilityReadError, read_capability


def story(run: Path) -> list[str]:
    cap = read_capability(run)
    if cap is None or cap.summary.is_empty():
        return [f"{run}: not probed yet (diagnose probe {run})"]
    reading = read_probe(cap)
    lines = [f"measures: {'; '.join(reading.measures)}."]
    for c in reading.checkpoints:
        lines.append(f"{c.title()}: {c.words}")
    lines.append(f"=> the evidence supports: {reading.claim}.")
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
        console.print(escape(line))


if __name__ == "__main__":
    main()
