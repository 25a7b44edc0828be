"""Adapters: runs written by other trainers (and by ours) as one `RunSource`, auto-detected.

    from diagnose.adapters import load_run, detect_format
    src = load_run("outputs/grpo-qwen")          # format auto-detected
    src = load_run("rollout_data", format="verl")
    src.metrics.collect(); src.rollouts.collect(); src.issues; src.notes

Formats (``FORMATS``, detection order): ``native`` (our run directory, ``run.json``), ``trl``
(GRPOTrainer ``completions/completions_<step>.parquet`` + ``trainer_state.json``),
``open_instruct`` (``*_rollouts_*.jsonl`` traces with token log-probs), ``verl``
(``trainer.rollout_data_dir`` ``<step>.jsonl`` dumps + file-logger metrics JSONL) and
``conversations`` (conversation JSONL). What each reads, the metric-name mapping and what each
format cannot give are in docs/adapters.md.

Bad input never raises: every unreadable file, line or value becomes a `SourceIssue` naming the
file (and line) and the rest is read. `UnknownRunLayout` is raised only when no layout matches
(or the path does not exist).

What the adapters share lives in private modules: ``_issues`` (IssueLog, NonFinite),
``_values`` (number/step coercion), ``_io`` (file listing, first JSONL object, parquet checks),
``_turns`` (split_assistant_turns, TurnClassifier), ``_rollouts`` (rollouts frames),
``_metrics`` (metrics frames, derived metrics) and ``_source`` (make_source, fingerprint).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diagnose.adapters._turns import TurnClassifier, split_assistant_turns
from diagnose.source import RunSource

__all__ = [
    "FORMATS",
    "LOOKED_FOR",
    "UnknownRunLayout",
    "detect_format",
    "load_run",
    "split_assistant_turns",
    "TurnClassifier",
]

#: Supported formats, in detection order.
FORMATS: tuple[str, ...] = ("native", "trl", "open_instruct", "verl", "conversations")

_MODULES = {
    "native": "diagnose.adapters.native",
    "trl": "diagnose.adapters.trl",
    "open_instruct": "diagnose.adapters.open_instruct",
    "verl": "diagnose.adapters.verl",
    "conversations": "diagnose.adapters.conversations",
}

#: What detection looks for, per format (quoted in `UnknownRunLayout`).
LOOKED_FOR: dict[str, str] = {
    "native": "run.json (our run directory, docs/run-format.md)",
    "trl": "completions/completions_<step>.parquet (TRL GRPOTrainer log_completions) or "
           "trainer_state.json with 'log_history' (also in checkpoint-*/)",
    "open_instruct": "*_rollouts_*.jsonl traces (open-instruct: step, prompt_idx, response_tokens, logprobs, reward)",
    "verl": "<step>.jsonl rollout dumps with input/output/score (verl trainer.rollout_data_dir, here or one "
            "folder down), or a *.jsonl of {\"step\": N, \"data\": {...}} metrics lines (verl file logger)",
    "conversations": "conversation JSONL with 'messages' (one file, or <step>.jsonl / step_<step>.jsonl / "
                     "step-NNNNNN.jsonl files in a folder)",
}

class UnknownRunLayout(ValueError):
    """No known run layout at ``path``; the message lists what was looked for."""

    def __init__(self, path: str | os.PathLike[str], detail: str = "", formats: Sequence[str] = FORMATS) -> None:
        self.path = Path(path)
        self.looked_for = [f"{f}: {LOOKED_FOR[f]}" for f in formats]
        head = f"{self.path}: {detail or 'no known run layout found'}."
        super().__init__(head + " Looked for:\n" + "\n".join(f"  - {x}" for x in self.looked_for))


def _module(fmt: str):
    return importlib.import_module(_MODULES[fmt])


def detect_format(path: str | os.PathLike[str]) -> str | None:
    """The format of the run at ``path`` (a directory, or a single file), or None."""
    p = Path(path)
    try:
        if not p.exists():
            return None
    except OSError:
        return None
    for fmt in FORMATS:
        try:
            if _module(fmt).detect(p):
                return fmt
        except OSError:
            continue
    return None


def load_run(path: str | os.PathLike[str], format: str | None = None, *,  # noqa: A002
             file_checks: Any = None) -> RunSource:
    """Load the run at ``path`` as a `RunSource`, auto-detecting its format unless ``format``
    (one of `FORMATS`) is given. Raises `UnknownRunLayout` when nothing matches.

    ``file_checks``: ``RunSource.file_checks`` of an earlier load of the same run (the scan
    cache keeps it): files it lists as validated, unchanged since, are not validated again.
    Formats that validate nothing up front ignore it."""
    p = Path(path)
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown run format {format!r}; expected one of {', '.join(FORMATS)}")
    try:
        exists = p.exists()
    except OSError as e:
        raise UnknownRunLayout(p, f"cannot access ({e})") from None
    if not exists:
        raise UnknownRunLayout(p, "no such file or directory", [format] if format else FORMATS)
    fmt = format or detect_format(p)
    if fmt is None:
        raise UnknownRunLayout(p)
    mod = _module(fmt)
    if format is not None and not mod.detect(p) and not mod.has_candidates(p):
        raise UnknownRunLayout(p, f"nothing in the {fmt} layout found", [fmt])
    if fmt == "native" and file_checks:
        return mod.load(p, file_checks=file_checks)
    return mod.load(p)
