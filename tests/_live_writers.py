"""Writers that grow a run step by step, the way each trainer writes it, for the live tests of
`diagnose watch` (tests/test_watch_live.py).

A whole run is first written by our writers of each trainer's layout (`diagnose.synth`: each
names the trainer function it follows), then replayed into the watched folder one step at a
time, each file written the way its trainer writes it:

* **TRL** (``trl/trainer/grpo_trainer.py`` ``GRPOTrainer.log``: ``pd.DataFrame(...).to_parquet(
  <output_dir>/completions/completions_{step:05d}.parquet)``): pyarrow writes the file in place,
  so a reader can meet it half-written (no footer yet): written here in two halves with a pause;
  ``checkpoint-<N>/trainer_state.json`` (``TrainerState.save_to_json``) after step N.
  ``rename=True``: written to a temp name and renamed into place instead (our RunWriter's way).
* **verl** (``RayPPOTrainer._dump_generations``: ``open(<step>.jsonl, "w")`` + one write;
  ``tracking.FileLogger``: opened ``"wb"``, one orjson line per step): the dump written in two
  halves, the metrics line appended in two halves (a half-written last line between them);
  `restart` truncates the metrics file as verl's resume does and re-logs from a step.
* **ours** (`diagnose.rundir.writer.RunWriter`): step Parquet files written to a temp name and
  renamed, then the metrics line appended.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from diagnose.atomic import temp_path_for

_STEP_FILE = re.compile(r"(?:step-0*|completions_0*|^)(\d+)\.(?:parquet|jsonl)$")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


def _step_of(rel: Path) -> int | None:
    m = _STEP_FILE.search(rel.name)
    if m and rel.parent.name in ("rollouts", "tokens", "probe", "completions", "rollout_data", "validation_data"):
        return int(m.group(1) or 0)
    for part in rel.parts:
        c = _CHECKPOINT.match(part)
        if c:
            return int(c.group(1))
    return None


@dataclass
class LiveWriter:
    """Replays the run at ``src`` into ``dst`` one step at a time (see the module docstring).
    ``style``: ``trl`` / ``verl`` / ``native``; ``pause``: how long a half-written file stays
    half-written."""

    src: Path
    dst: Path
    style: str
    pause: float = 0.1
    rename: bool = False
    files: dict[int, list[Path]] = field(default_factory=lambda: defaultdict(list))
    lines: dict[Path, dict[int, list[bytes]]] = field(default_factory=dict)  # multi-step JSONL: step -> lines
    start_files: list[Path] = field(default_factory=list)
    written: set[Path] = field(default_factory=set)

    def __post_init__(self) -> None:
        for f in sorted(p for p in self.src.rglob("*") if p.is_file()):
            rel = f.relative_to(self.src)
            if rel.parts[0].startswith("."):
                continue
            step = _step_of(rel)
            if step is not None:
                self.files[step].append(rel)
            elif f.suffix == ".jsonl":
                per: dict[int, list[bytes]] = defaultdict(list)
                for raw in f.read_bytes().splitlines(keepends=True):
                    if raw.strip():
                        per[int(json.loads(raw)["step"])].append(raw)
                self.lines[rel] = per
            else:
                self.start_files.append(rel)

    @property
    def steps(self) -> list[int]:
        return sorted(set(self.files) | {s for per in self.lines.values() for s in per})

    def start(self) -> None:
        """What the trainer writes when it starts: ``run.json``, an empty (truncated) log."""
        self.dst.mkdir(parents=True, exist_ok=True)
        for rel in self.start_files:
            self._copy(rel)
        for rel in self.lines:
            self._open_log(rel)

    def _open_log(self, rel: Path) -> None:
        (self.dst / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(self.dst / rel, "wb"):
            pass
        self.written.add(rel)

    def restart(self) -> None:
        """verl's resume: the file logger is opened ``"wb"`` again (truncated)."""
        for rel in self.lines:
            self._open_log(rel)

    def write_step(self, step: int) -> None:
        for rel in self.files.get(step, []):
            self._copy(rel)
        for rel, per in self.lines.items():
            for raw in per.get(step, []):
                self._append(rel, raw)

    def _copy(self, rel: Path) -> None:
        data = (self.src / rel).read_bytes()
        out = self.dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        self.written.add(rel)
        if self.style == "native" or self.rename:
            tmp = temp_path_for(out)
            tmp.write_bytes(data)
            os.replace(tmp, out)
            return
        with open(out, "wb") as fh:  # written in place: half of it visible for a while
            fh.write(data[: len(data) // 2])
            fh.flush()
            time.sleep(self.pause)
            fh.write(data[len(data) // 2:])

    def _append(self, rel: Path, raw: bytes) -> None:
        with open(self.dst / rel, "ab") as fh:
            if self.style == "verl":
                fh.write(raw[: len(raw) // 2])
                fh.flush()
                time.sleep(self.pause)
                fh.write(raw[len(raw) // 2:])
            else:
                fh.write(raw)


def copy_run(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*"))
