"""Sustained drops of the primary signal: where each began (its onset), when it was found, its
trough, and where the signal recovered.

A drop is at least ``min_episode_len`` consecutive values below
``peak - collapse_drop * |peak|`` (``peak``: running maximum of the trailing ``peak_window``-step
median), significant against the baseline before the decline began (`_significant_drop`). Its
onset is refined to the earliest change point of the drop (`_refine_onset`); it recovers at the
first value from which the signal stays above ``pre_level - (1 - recovery_frac) * |pre_level|``
for ``recovery_len`` steps. The next drop is searched after the recovery, with a fresh running
peak. docs/scan.md (Collapse episodes) gives the rule and its false-alarm measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diagnose.scan.detect import (
    Change,
    DetectConfig,
    _row_nanmedian,
    detect_changes,
    rank_drop_pvalue,
    robust_sigma,
    rolling_baseline,
)

__all__ = ["Drop", "find_drops"]


@dataclass
class Drop:
    """One sustained drop; positions are indices into the finite series searched."""

    onset: int
    detected: int  # where it was first sustained
    trough: int
    recovery: int | None
    end: int  # the last index before the recovery (or of the series)
    pre_level: float  # the baseline median at the onset
    peak: float  # the running peak the drop fell from
    changes: list[Change]  # the change points that support the onset


def find_drops(values: np.ndarray, steps: np.ndarray, cfg: DetectConfig, notes: list[str], name: str) -> list[Drop]:
    """The sustained drops of the finite series ``values`` (at ``steps``), in order. ``notes``
    receives what the run ends too early to tell (a drop not yet sustained, a recovery not yet
    held); ``name``: the signal, for those notes."""
    return _DropSearch(values, steps, cfg, notes, name).run()


def _trailing_median(x: np.ndarray, w: int) -> np.ndarray:
    """Median of the last ``w`` points up to and including each point (fewer at the start):
    sliding windows over the series NaN-padded in front, as `detect.rolling_baseline` does."""
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        return np.empty(0)
    padded = np.r_[np.full(w - 1, np.nan), x]
    return _row_nanmedian(np.lib.stride_tricks.sliding_window_view(padded, w))


class _DropSearch:
    """One pass over a series. ``segment`` is where the running peak starts: 0, then after
    each recovery."""

    def __init__(self, values: np.ndarray, steps: np.ndarray, cfg: DetectConfig, notes: list[str], name: str):
        self.x, self.steps, self.cfg, self.notes, self.name = values, steps, cfg, notes, name
        self.warmup = min(cfg.min_drop_baseline, cfg.min_periods)  # points before a drop can count

    def run(self) -> list[Drop]:
        x, cfg = self.x, self.cfg
        if x.size < self.warmup + cfg.min_episode_len:
            return []
        self.median, self.sigma = rolling_baseline(x, cfg)
        self.level = _trailing_median(x, cfg.peak_window)
        drops: list[Drop] = []
        segment = 0
        i = self.warmup
        while i < x.size:
            if i - segment < self.warmup:
                i += 1
                continue
            peak = float(np.max(self.level[segment:i]))
            threshold = peak - cfg.collapse_drop * abs(peak)
            if not (x[i] < threshold and self._stays_below(i, peak)):
                i += 1
                continue
            window_end = min(i + cfg.min_episode_len, x.size)
            if window_end - i < cfg.min_episode_len:  # the run ends before the drop could be sustained
                self._note_too_late(i, segment, threshold, window_end)
                break
            drop = self._confirmed_drop(i, segment, window_end, threshold, peak)
            if drop is None:
                i += 1
                continue
            drops.append(drop)
            if drop.recovery is None:
                break
            segment = drop.recovery
            i = drop.recovery + cfg.recovery_len
        return drops

    def _stays_below(self, i: int, peak: float) -> bool:
        """Every value of the window from ``i`` (``min_episode_len`` points, fewer at the end of
        the run) is under the bar of the running peak up to it."""
        end = min(i + self.cfg.min_episode_len, self.x.size)
        peaks = np.maximum.accumulate(np.r_[peak, self.level[i:end - 1]])
        return bool(np.all(self.x[i:end] < peaks - self.cfg.collapse_drop * np.abs(peaks)))

    def _note_too_late(self, i: int, segment: int, threshold: float, window_end: int) -> None:
        if i > segment and self.x[i - 1] < threshold:
            return  # low for longer already, without passing the significance bar: no new drop
        cfg, step = self.cfg, int(self.steps[i])
        self.notes.append(f"{self.name} fell below {cfg.collapse_drop:.0%} under its peak at step {step}, "
                          f"but the run ends after {window_end - i} step(s) (< min_episode_len={cfg.min_episode_len}): "
                          "not yet an episode")

    def _confirmed_drop(self, i: int, segment: int, window_end: int, threshold: float, peak: float) -> Drop | None:
        """The drop sustained at ``i``, if significant against the baseline from before its
        decline began (the trailing baseline at ``i`` would already hold the declining steps: a
        noisy, gradual collapse, or one whose first steps narrowly miss the bar, would never be
        found)."""
        x, cfg = self.x, self.cfg
        decline = _decline_start(x, max(segment, i - cfg.window), i, window_end, self.warmup)
        before = x[max(segment, decline - cfg.window):decline]  # up to `window` points, this segment
        base = _drop_baseline(before, cfg)
        if base is None or not _significant_drop(x, before, decline, i, window_end, threshold, base, cfg):
            return None
        onset, changes = _refine_onset(x, self.steps, i, self.median, self.sigma, cfg, floor=segment)
        onset = min(onset, decline)  # the decline began at its split point, if not earlier
        pre_level = float(self.median[onset]) if np.isfinite(self.median[onset]) else base[0]
        recovery = self._recovery(i, pre_level)
        end = (recovery - 1) if recovery is not None else x.size - 1
        trough = onset + int(np.argmin(x[onset:end + 1]))
        return Drop(onset, i, trough, recovery, end, pre_level, peak, changes)

    def _recovery(self, i: int, pre_level: float) -> int | None:
        """The first index after the drop's window from which the values are back above the
        recovery bar, with the median of ``recovery_len`` values from there above it too. A
        return too close to the end of the run to tell is noted."""
        x, cfg = self.x, self.cfg
        bar = pre_level - (1.0 - cfg.recovery_frac) * abs(pre_level)
        for k in range(i + cfg.min_episode_len, x.size):
            if x[k] < bar:
                continue
            held = x[k:k + cfg.recovery_len]
            if np.median(held) >= bar:
                if held.size == cfg.recovery_len:
                    return k
                self.notes.append(f"{self.name} is back above {cfg.recovery_frac:.0%} of its pre-onset level from "
                                  f"step {int(self.steps[k])}, for fewer than recovery_len={cfg.recovery_len} "
                                  "steps so far")
                return None
        return None


def _drop_baseline(before: np.ndarray, cfg: DetectConfig) -> tuple[float, float] | None:
    """Median and significance scale of the baseline points ``before`` a decline, or None with
    fewer than ``min_drop_baseline`` of them. With fewer than ``min_periods`` points the robust
    sigma is itself uncertain, so it is widened by sqrt(min_periods / n): a drop in a short
    series must be larger to count."""
    n = before.size
    if n < cfg.min_drop_baseline:
        return None
    mu = float(np.median(before))
    sd = robust_sigma(before, cfg, mu)
    if n < cfg.min_periods:
        sd *= float(np.sqrt(cfg.min_periods / n))
    return mu, sd


def _significant_drop(x: np.ndarray, before: np.ndarray, decline: int, i: int, window_end: int, threshold: float,
                      base: tuple[float, float], cfg: DetectConfig) -> bool:
    """The drop sustained at ``i`` (decline from ``decline``, baseline points ``before``) is
    significant: the median of its first ``min_episode_len`` values is ``collapse_z`` sigmas
    under the baseline; or, when the baseline is shorter than ``min_periods`` (its sigma
    unreliable), the whole low stretch (from ``decline`` while values stay under ``threshold``,
    at least 2 x ``min_episode_len`` of them under it) ranks below the baseline points
    (`rank_drop_pvalue` <= ``drop_rank_p``). The second test needs no sigma: a collapse after
    only 3 noisy points (whose sigma, widened for the small sample, puts the first bar below
    zero reward) is still found once its low stretch is long enough."""
    if float(np.median(x[i:window_end])) <= base[0] - cfg.collapse_z * base[1]:
        return True
    if before.size >= cfg.min_periods:
        return False  # a baseline long enough for its sigma: the first test is the test
    low_end = i
    while low_end < x.size and x[low_end] < threshold:
        low_end += 1
    if low_end - i < 2 * cfg.min_episode_len:
        return False
    return rank_drop_pvalue(before, x[decline:low_end]) <= cfg.drop_rank_p


def _decline_start(x: np.ndarray, lo: int, i: int, window_end: int, min_pre: int) -> int:
    """Where the decline that is sustained at ``i`` began: the split ``k`` of
    ``x[lo:window_end]`` (``lo + min_pre <= k <= i``) with the largest standardised fall in mean
    (the mean-shift change-point statistic ``(mean_before - mean_after) * sqrt(n_b * n_a / n)``)."""
    ks = np.arange(lo + min_pre, i + 1)
    if ks.size <= 1:
        return i if ks.size == 0 else int(ks[0])
    seg = x[lo:window_end]
    c = np.r_[0.0, np.cumsum(seg)]
    nb = ks - lo
    na = window_end - ks
    fall = c[nb] / nb - (c[-1] - c[nb]) / na
    return int(ks[np.argmax(fall * np.sqrt(nb * na / (window_end - lo)))])


def _refine_onset(x: np.ndarray, s: np.ndarray, i: int, med: np.ndarray, sig: np.ndarray,
                  cfg: DetectConfig, floor: int = 0) -> tuple[int, list[Change]]:
    """Earliest change point of the drop first sustained at index ``i``: the detectors'
    downward change points up to ``refine_window`` steps back count if every value from the
    candidate to ``i`` is ``onset_z`` sigmas below the baseline before the refine window
    (the drop is under way from there on); none: the onset is ``i``. ``floor``: the onset
    stays at or after this index (the previous episode's recovery)."""
    lo = max(floor, i - cfg.refine_window)
    b_lo = max(0, lo - cfg.window)
    if lo - b_lo >= 3:
        mu = float(np.median(x[b_lo:lo]))
        sd = robust_sigma(x[b_lo:lo], cfg, mu)
    else:
        mu, sd = float(med[i]), float(sig[i])
    cut = mu - cfg.onset_z * sd
    best = i
    end = min(x.size, i + cfg.min_episode_len)
    support: list[Change] = []
    for c in detect_changes(x[:end], s[:end], cfg, direction="down"):
        idx = int(np.searchsorted(s, c.step))
        if idx >= x.size or s[idx] != c.step or not lo <= idx <= i:
            continue
        if np.all(x[idx:i + 1] <= cut):  # the drop is under way from the candidate on
            support.append(c)
            best = min(best, idx)
    return best, support
