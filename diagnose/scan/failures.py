"""What broke in a collapse episode: the dominant failure modes, share before -> at the trough.

Why: "reward 0.47 -> 0, 11% turns collapsed" says that the run failed, not how. A collapse on
tool use fails in kinds a practitioner can act on: call bodies that stop being JSON, calls never
closed, the same call repeated, bare ``<tool_call>`` turns, right-looking calls with wrong
values. Each kind is a signal the scan already has (the format-error taxonomy per assistant
turn, docs/turn-states.md; the turn states; the trainer's share of gold calls matched); this
module compares each one's level before the onset with its level around the trough and keeps
those that grew, largest growth first.

Levels: *before* is the median over the ``window`` steps before the onset; *at the trough* the
median of the trough step and its neighbours inside the episode (one step is one batch of
rollouts: too noisy alone). A mode counts when it grew by at least ``min_rise`` (absolute, 0.05
= 5 points) and reaches ``min_level``.
"""

from __future__ import annotations

import math

import polars as pl

from diagnose.format_errors import SHORT, FormatError
from diagnose.scan.result import FailureMode
from diagnose.scan.series import SignalTable, window_median

__all__ = ["FailureMode", "failure_modes"]

#: signal -> (what it is, in words; the unit of its share)
TURN_STATES = {"turn_state/collapsed": "collapsed turns (nothing usable)",
               "turn_state/polluted": "polluted turns (a format error, content usable)"}
#: A "higher is healthier" share and what its complement means.
COMPLEMENTS = {"calls_right": "calls not matching the gold calls"}


def failure_modes(signals: pl.DataFrame | SignalTable, onset: int, trough: int, end_step: int, *, window: int = 20,
                  min_rise: float = 0.05, min_level: float = 0.05) -> list[FailureMode]:
    """The failure modes of the episode ``onset..end_step`` with its minimum at ``trough``, largest
    rise first (empty when none grew by ``min_rise``)."""
    table = signals if isinstance(signals, SignalTable) else SignalTable(signals)
    if "step" not in table.columns:
        return []
    candidates: list[tuple[str, str, str, bool]] = []  # signal, label, unit, complement
    for name in table.columns:
        if name.startswith("format_error/"):
            kind = name.removeprefix("format_error/")
            label = SHORT.get(FormatError(kind), kind) if kind in FormatError.__members__.values() else kind
            candidates.append((name, label, "of turns", False))
    candidates += [(n, label, "of turns", False) for n, label in TURN_STATES.items() if n in table.columns]
    candidates += [(n, label, "of calls", True) for n, label in COMPLEMENTS.items() if n in table.columns]
    lo, hi = max(onset, trough - 1), min(end_step, trough + 1)
    out = []
    for name, label, unit, complement in candidates:
        s, v = table.series(name)
        if complement:
            v = 1.0 - v
        before = window_median(s, v, onset - window, onset - 1)
        at = window_median(s, v, lo, hi)
        if math.isfinite(before) and math.isfinite(at) and at - before >= min_rise and at >= min_level:
            out.append(FailureMode(name, label, unit, before, at))
    out.sort(key=lambda f: (-round(f.rise, 9), f.signal))
    return out
