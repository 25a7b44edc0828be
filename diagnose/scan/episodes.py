"""Collapse episodes: the sustained drops of the primary signal (``reward``, else ``accuracy``),
each with what moved around its onset, the control tokens implicated and rollouts before and
after.

    find_episodes(signals, src)    # -> [CollapseEpisode]

The stages of one episode, each in its own module: the drop, its onset and recovery
(`diagnose.scan.drops`); every other signal's change point around the onset with its lead
(`diagnose.scan.moves`); the control tokens whose probability rose (`diagnose.scan.implicated`);
representative rollouts (`diagnose.scan.examples`). A re-scan reuses an unchanged episode's
moves and rollouts from the earlier scan (`PriorScan`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from diagnose.scan.detect import DetectConfig
from diagnose.scan.drops import Drop, find_drops
from diagnose.scan.examples import example_rollouts
from diagnose.scan.implicated import implicated_tokens
from diagnose.scan.moves import signal_moves
from diagnose.scan.result import CollapseEpisode, RolloutExample, SignalMove
from diagnose.scan.series import SignalTable, window_median
from diagnose.source import RunSource

__all__ = ["PriorScan", "find_episodes", "primary_signal"]


def primary_signal(signals: pl.DataFrame | SignalTable, cfg: DetectConfig | None = None) -> str | None:
    """``reward`` if it has >= ``min_steps`` finite, non-constant values, else ``accuracy``,
    else None."""
    cfg = cfg or DetectConfig()
    table = signals if isinstance(signals, SignalTable) else SignalTable(signals)
    for name in ("reward", "accuracy"):
        _, v = table.series(name)
        if v.size >= cfg.min_steps and np.ptp(v) > 0:
            return name
    return None


@dataclass
class PriorScan:
    """An earlier scan of the same run with the same `DetectConfig` and detection code (the scan
    cache holds one): the signal table it saw and its episodes. An episode with the same onset
    whose window of signals is unchanged gets the earlier moves and example rollouts back
    instead of recomputing them, which is most of the detection time on a re-scan after new
    steps (the windows end ``lag_window`` steps after the onset)."""

    signals: pl.DataFrame
    episodes: list[CollapseEpisode]

    def _same_up_to(self, signals: pl.DataFrame, step: int) -> bool:
        a, b = self.signals, signals
        if sorted(a.columns) != sorted(b.columns):
            return False
        cols = sorted(a.columns)
        return a.filter(pl.col("step") <= step).select(cols).equals(b.filter(pl.col("step") <= step).select(cols))

    def moves(self, signals: pl.DataFrame, name: str, onset: int, end_step: int,
              cfg: DetectConfig) -> list[SignalMove] | None:
        hi = onset + cfg.lag_window
        for e in self.episodes:
            if (e.signal == name and e.onset_step == onset and min(e.end_step, hi) == min(end_step, hi)
                    and self._same_up_to(signals, hi)):
                return list(e.moves)
        return None

    def examples(self, name: str, onset: int, trough: int) -> tuple[list[RolloutExample], list[RolloutExample]] | None:
        for e in self.episodes:  # the same rollouts are picked from the same (immutable) step files
            if e.signal == name and e.onset_step == onset and e.trough_step == trough:
                return list(e.examples_before), list(e.examples_after)
        return None


def find_episodes(signals: pl.DataFrame, src_meta: RunSource | Any | None = None, cfg: DetectConfig | None = None,
                  notes: list[str] | None = None, prior: PriorScan | None = None) -> list[CollapseEpisode]:
    """Collapse episodes of the primary signal (:func:`primary_signal`).

    ``src_meta``: the :class:`RunSource` the signals came from (or any object with
    ``control_tokens`` and ``rollouts`` attributes), used for control-token roles and for
    representative rollouts; None skips both. ``notes``: a list that receives remarks (e.g. a
    drop at the end of the run that is not yet sustained). ``prior``: see `PriorScan`.
    """
    cfg = cfg or DetectConfig()
    notes = notes if notes is not None else []
    table = SignalTable(signals)
    name = primary_signal(table, cfg)
    if name is None:
        return []
    steps, values = table.series(name)
    return [_episode(d, name, steps, values, signals, table, src_meta, cfg, prior)
            for d in find_drops(values, steps, cfg, notes, name)]


def _episode(drop: Drop, name: str, steps: np.ndarray, values: np.ndarray, signals: pl.DataFrame,
             table: SignalTable, src_meta: RunSource | Any | None, cfg: DetectConfig,
             prior: PriorScan | None) -> CollapseEpisode:
    """One drop of signal ``name`` (its finite ``steps`` and ``values``; ``table``: the
    ``signals`` converted) as an episode."""
    control_tokens = list(getattr(src_meta, "control_tokens", None) or [])
    onset, end_step, trough_step = int(steps[drop.onset]), int(steps[drop.end]), int(steps[drop.trough])
    moves = prior.moves(signals, name, onset, end_step, cfg) if prior is not None else None
    if moves is None:
        moves = signal_moves(table, name, onset, end_step, cfg, control_tokens)
    examples = prior.examples(name, onset, trough_step) if prior is not None else None
    if examples is None:
        examples = example_rollouts(getattr(src_meta, "rollouts", None), onset, trough_step, cfg)
    trough_value = float(values[drop.trough])
    return CollapseEpisode(
        signal=name, onset_step=onset, detected_step=int(steps[drop.detected]), trough_step=trough_step,
        recovery_step=int(steps[drop.recovery]) if drop.recovery is not None else None, end_step=end_step,
        pre_level=drop.pre_level, peak=drop.peak, trough_value=trough_value,
        relative_drop=(drop.peak - trough_value) / abs(drop.peak) if drop.peak != 0 else float("nan"),
        collapsed_share_at_trough=_collapsed_share(table, trough_step, onset, end_step),
        onset_changes=drop.changes, moves=moves,
        implicated=implicated_tokens(table, onset, end_step, moves, cfg, control_tokens),
        examples_before=examples[0], examples_after=examples[1],
    )


def _collapsed_share(table: SignalTable, trough_step: int, onset: int, end_step: int) -> float | None:
    """``turn_state/collapsed`` at the trough (the episode's median where the trough has none)."""
    s, v = table.series("turn_state/collapsed")
    if not v.size:
        return None
    at = np.nonzero(s == trough_step)[0]
    return float(v[at[0]]) if at.size else window_median(s, v, onset, end_step)
