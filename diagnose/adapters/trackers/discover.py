"""Which trackers hold a run, found from the folder the user gives (cheap: names and first bytes).

A launch folder (the working directory of the training command) holds ``wandb/``, ``runs/``,
``tensorboard_log/`` and tee'd console logs beside the trainer's output (TRL's ``output_dir``,
verl's ``checkpoints/``); an ``output_dir`` holds ``runs/`` (transformers' TensorBoard); a W&B run
folder, an events folder or a log file is one tracker run itself. Each is a `TrackerRef` to read
on demand; several runs of one tracker are listed, never merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diagnose.adapters.trackers import console, tensorboard, wandb
from diagnose.adapters.trackers.run import KIND_NAMES, TrackerRun

__all__ = ["TrackerRef", "find_trackers", "is_tracker_path", "tracker_file_kind"]


@dataclass(frozen=True)
class TrackerRef:
    """A tracker run found on disk. ``name``: what ``--run`` picks it by (a W&B run id, an events
    folder relative to where it was found, a log file's name); ``aliases``: other names it
    answers to (W&B run folders, the events folder's last part)."""

    kind: str
    name: str
    path: Path
    aliases: tuple[str, ...] = ()
    wandb_ref: wandb.WandbRef | None = None
    root: Path | None = None

    def read(self) -> TrackerRun:
        if self.kind == "wandb":
            assert self.wandb_ref is not None
            return wandb.read_run(self.wandb_ref)
        if self.kind == "tensorboard":
            return tensorboard.read_run(self.path, self.root)
        return console.read_log(self.path, self.name)

    def answers_to(self, name: str) -> bool:
        return name == self.name or name in self.aliases

    @property
    def title(self) -> str:
        return f"{KIND_NAMES[self.kind]} {self.name}"


def find_trackers(p: Path) -> list[TrackerRef]:
    """Every tracker run at ``p``: W&B runs, TensorBoard event folders and console logs."""
    out: list[TrackerRef] = []
    for ref in wandb.find_runs(p):
        out.append(TrackerRef("wandb", ref.id, ref.path, tuple(d.name for d in ref.dirs), wandb_ref=ref))
    root = p if p.is_dir() else p.parent
    for d in tensorboard.find_runs(p):
        name = str(d.relative_to(root)) if d != root and d.is_relative_to(root) else d.name
        out.append(TrackerRef("tensorboard", name, d, (d.name,), root=root))
    for f in console.find_logs(p):
        out.append(TrackerRef("console", f.name, f))
    return out


def is_tracker_path(p: Path) -> bool:
    """Whether ``p`` itself is one tracker's output: a ``wandb/`` folder or W&B run folder / file,
    an events folder / file, or a console log."""
    if p.is_file():
        return bool(wandb.RUN_FILE.match(p.name) or tensorboard.EVENTS.match(p.name)) or console.looks_like_console(p)
    return p.name == "wandb" or wandb.is_run_dir(p) or tensorboard.is_events_dir(p)


def tracker_file_kind(rel: str) -> str | None:
    """For the scan cache: ``"metrics"`` for a tracker file that holds only metrics (a W&B
    ``run-<id>.wandb``, an events file, a console log), ``"global"`` for a W&B table file (rollouts
    of any step), None for anything else."""
    name = rel.rsplit("/", 1)[-1]
    if name.endswith(".table.json") and "/media/table/" in f"/{rel}":
        return "global"
    if wandb.RUN_FILE.match(name) or tensorboard.EVENTS.match(name) or name.endswith(console.SUFFIXES):
        return "metrics"
    return None
