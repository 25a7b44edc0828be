"""Which checkpoints of a run to probe.

Default (``around``): for every collapse episode that ``diagnose scan`` finds, the checkpoint
before the onset (the last one saved before the onset step; the first checkpoint if none), the
one nearest the trough, and the last checkpoint of the run. A run without episodes (or one that
cannot be scanned) gets its first and last checkpoint, and the selection says so. ``all``: every
complete checkpoint. ``names``: the given ones (``step-000120``, ``000120`` or ``120``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from diagnose.rundir import RunReader
from diagnose.rundir.schema import parse_step_dirname


@dataclass
class Selected:
    name: str  # "step-000120"
    step: int | None
    path: Path
    roles: list[str] = field(default_factory=list)  # "before onset (episode 1)", "trough (episode 1)", "last", ...


@dataclass
class Selection:
    checkpoints: list[Selected]
    notes: list[str] = field(default_factory=list)  # what was chosen and why (shown to the user)
    unknown: list[str] = field(default_factory=list)  # requested names with no checkpoint
    available: list[str] = field(default_factory=list)  # every complete checkpoint's name
    tokenizer_fallback: Path | None = None  # run.json's model path, for checkpoints saved without a tokenizer


def _parse_name(name: str) -> int | None:
    name = name.strip().rstrip("/")
    step = parse_step_dirname(name)
    if step is not None:
        return step
    return int(name) if name.isdigit() else None


def select_checkpoints(run_dir: str | os.PathLike[str], mode: str = "around",
                       names: list[str] | None = None) -> Selection:
    """Checkpoints of ``run_dir`` to probe, in step order. ``mode``: ``around`` | ``all`` | ``names``."""
    reader = RunReader(run_dir)
    ckpts = reader.checkpoints()
    by_step = {s: p for s, p in ckpts}
    notes: list[str] = [str(i) for i in reader.issues if "checkpoint" in i.message]
    fallback = _model_path(reader)
    if not ckpts:
        return Selection([], notes + [f"{run_dir}: no complete checkpoint under checkpoints/"],
                         tokenizer_fallback=fallback)
    chosen: dict[int, list[str]] = {}
    unknown: list[str] = []
    if mode == "all":
        for s, _ in ckpts:
            chosen[s] = []
        notes.append(f"all {len(ckpts)} checkpoints")
    elif mode == "names":
        for n in names or []:
            s = _parse_name(n)
            if s is None or s not in by_step:
                unknown.append(n)
            else:
                chosen.setdefault(s, []).append("requested")
    else:
        chosen, more = _around_episodes(run_dir, [s for s, _ in ckpts])
        notes += more
    sel = [Selected(by_step[s].name, s, by_step[s], roles)
           for s, roles in sorted(chosen.items())]
    return Selection(sel, notes, unknown, [p.name for _, p in ckpts], fallback)


def _model_path(reader: RunReader) -> Path | None:
    """The run's base model directory (run.json ``model.path``) if it exists."""
    try:
        path = (reader.info.get("model") or {}).get("path")
    except Exception:  # noqa: BLE001 - run.json unreadable: no fallback
        return None
    if isinstance(path, str) and path and Path(path).is_dir():
        return Path(path)
    return None


def _around_episodes(run_dir: str | os.PathLike[str], steps: list[int]) -> tuple[dict[int, list[str]], list[str]]:
    chosen: dict[int, list[str]] = {}

    def add(step: int, role: str) -> None:
        chosen.setdefault(step, [])
        if role not in chosen[step]:
            chosen[step].append(role)

    try:
        from diagnose.scan.run import scan_run

        episodes = scan_run(run_dir).episodes
    except Exception as e:  # noqa: BLE001 - a run that cannot be scanned still has checkpoints
        add(steps[0], "first")
        add(steps[-1], "last")
        return chosen, [f"scan failed ({type(e).__name__}: {e}): probing the first and last checkpoint"]
    if not episodes:
        add(steps[0], "first")
        add(steps[-1], "last")
        return chosen, ["scan found no collapse episode: probing the first and last checkpoint"]
    notes = []
    for k, ep in enumerate(episodes, 1):
        before = [s for s in steps if s < ep.onset_step]
        b = before[-1] if before else steps[0]
        t = min(steps, key=lambda s: (abs(s - ep.trough_step), -s))
        add(b, f"before onset (episode {k})")
        add(t, f"trough (episode {k})")
        notes.append(f"episode {k}: onset step {ep.onset_step}, trough step {ep.trough_step} -> "
                     f"checkpoints step {b} (before onset), step {t} (nearest the trough)")
    add(steps[-1], "last")
    return chosen, notes
