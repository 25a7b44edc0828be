"""What moved around a collapse onset: every other signal's first confirmed change point near
the onset, with its lead over the drop (`SignalMove`).

A signal's change counts when it lies within ``lead_window`` steps before to ``lag_window``
steps after the onset (and alarmed by then), the point at the change step is ``onset_z`` sigmas
and the median of ``confirm_len`` points from it ``collapse_z`` sigmas past the baseline
before it, the level after the onset is still on that side, and a probability moved
materially (`_material`). Probabilities are detected on a log10 scale. Bookkeeping signals
(`diagnose.scan.names.is_bookkeeping`) are not searched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from diagnose.scan.detect import DetectConfig, detect_changes, robust_sigma
from diagnose.scan.names import is_bookkeeping, signal_direction, signal_kind
from diagnose.scan.result import SignalMove
from diagnose.scan.series import SignalTable, window_median

__all__ = ["signal_moves"]

_MAX_SCORE = 1000.0  # shift scores are capped (a constant baseline has a floored, tiny sigma)


def signal_moves(signals: SignalTable, primary: str, onset: int, end_step: int, cfg: DetectConfig,
                 control_tokens: Sequence[Mapping[str, Any]]) -> list[SignalMove]:
    """Every signal but ``primary`` that moved around the onset, earliest first (ties: the
    stronger move, then the name). ``end_step``: the episode's last step (the level after the
    onset is measured up to it, at most ``lag_window`` steps on)."""
    history = 2 * cfg.window + cfg.lead_window
    out: list[SignalMove] = []
    for name in signals.columns:
        if name in ("step", primary) or is_bookkeeping(name):
            continue
        s, v = signals.series(name)
        keep = (s >= onset - history) & (s <= onset + cfg.lag_window)
        move = _first_move(name, s[keep], v[keep], onset, end_step, cfg, control_tokens)
        if move is not None:
            out.append(move)
    out.sort(key=lambda m: (m.step, -round(m.score, 9), m.signal))  # name breaks ties: stable output
    return out


def _first_move(name: str, s: np.ndarray, v: np.ndarray, onset: int, end_step: int, cfg: DetectConfig,
                control_tokens: Sequence[Mapping[str, Any]]) -> SignalMove | None:
    """The first confirmed change of one signal (steps ``s``, values ``v``) near the onset."""
    if v.size <= cfg.min_periods or np.ptp(v) == 0:
        return None
    lo_step, hi_step = onset - cfg.lead_window, onset + cfg.lag_window
    logscale = signal_kind(name) == "probability"
    t = np.log10(np.maximum(v, 1e-12)) if logscale else v
    for c in detect_changes(t, s, cfg, direction="both"):
        if not (lo_step <= c.step <= hi_step and c.alarm_step <= hi_step):
            continue
        pre = t[s < c.step][-cfg.window:]
        post = t[(s >= c.step)][: cfg.confirm_len]
        if pre.size < 3 or post.size == 0:
            continue
        mu = float(np.median(pre))
        sd = robust_sigma(pre, cfg, mu)
        sign = 1.0 if c.direction == "up" else -1.0
        z = (float(np.median(post)) - mu) / sd  # the new level holds ...
        z0 = (float(post[0]) - mu) / sd  # ... and has begun at the change step itself
        if not (sign * z >= cfg.collapse_z and sign * z0 >= cfg.onset_z):
            continue
        before = float(np.median(v[s < c.step][-cfg.window:]))
        after = window_median(s, v, onset, min(hi_step, max(end_step, onset)))
        if not sign * (after - before) > 0:  # a blip that is gone by the onset is not a move
            continue
        if logscale and not _material(before, after, cfg):
            continue  # e.g. p(gold) 1.000 -> 0.999: many sigmas of a noise-free probe, no change
        want = signal_direction(name, control_tokens)
        return SignalMove(name, int(c.step), int(onset - c.step), c.direction, c.method,
                          float(min(abs(z), _MAX_SCORE)), int(c.alarm_step), before, after,
                          want in ("both", c.direction))
    return None


def _material(before: float, after: float, cfg: DetectConfig) -> bool:
    """A probability moved materially: by ``move_min_abs`` or by a factor ``move_min_ratio``, and
    it is ``move_min_prob`` or more on one side."""
    if max(before, after) < cfg.move_min_prob:
        return False
    if abs(after - before) >= cfg.move_min_abs:
        return True
    lo, hi = sorted((max(before, 1e-12), max(after, 1e-12)))
    return hi / lo >= cfg.move_min_ratio
