"""Collapse episodes, what moved before them, and training pathologies.

A **collapse episode** is a sustained drop of the primary signal (``reward``, else
``accuracy``): at least ``min_episode_len`` consecutive steps below
``peak - collapse_drop * |peak|`` (``peak``: running maximum of the trailing
``peak_window``-step median before the step), whose first ``min_episode_len`` values have a
median at least ``collapse_z`` robust sigmas below the trailing baseline. Its onset is that
first step, refined to the earliest change point of the drop (CUSUM / Page-Hinkley / z-score
change points, or the start of a run of values ``onset_z`` sigmas low, up to ``refine_window``
steps earlier). It recovers at the first step from which the signal stays above
``pre_level - (1 - recovery_frac) * |pre_level|`` for ``recovery_len`` steps.

For each episode: every other signal's own change point around the onset (its lead time over
the reward drop), the control tokens whose probability rose most (per key context), and
representative rollouts before and after. ``find_pathologies`` flags entropy collapse /
blow-up, NaN log-probs, non-finite metrics and growing train/inference mismatch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from diagnose.control_tokens import KEY_CONTEXT_ROLES
from diagnose.scan.detect import (
    Change,
    DetectConfig,
    _row_nanmedian,
    detect_changes,
    rank_drop_pvalue,
    robust_sigma,
    rolling_baseline,
)
from diagnose.scan.result import (
    CollapseEpisode,
    ContextRise,
    ImplicatedToken,
    Pathology,
    RolloutExample,
    ScanResult,
    SignalMove,
    issues_summary,
)
from diagnose.scan.signals import generic_signals, signal_direction, signal_kind, step_signals
from diagnose.source import RunSource

__all__ = [
    "PriorScan",
    "find_episodes",
    "find_pathologies",
    "primary_signal",
    "scan_source",
]

#: Signals never analysed for lead times (schedules, clocks, bookkeeping).
IGNORED_SIGNALS: tuple[str, ...] = (
    r"lr", r"learning_rate", r"time/.*", r".*_time", r"epoch", r"global_step", r"phase", r"n_rollouts",
    r"ctx/[^/]+/n", r"skipped_update", r"completions/truncated", r"sft_examples", r"sft_loss",
    r"timing_s/.*", r"timing_per_token_ms/.*", r"perf/.*", r"training/(global_step|epoch|rollout_probs_diff_valid)",
    r"turn_state/[^/]+/ci95",
)
_IGNORED = re.compile("|".join(f"(?:{p})" for p in IGNORED_SIGNALS) + r"\Z")


_MAX_SCORE = 1000.0  # shift scores are capped (a constant baseline has a floored, tiny sigma)


# ---------------------------------------------------------------------------------------------
# series helpers
# ---------------------------------------------------------------------------------------------


class _Table:
    """The signals as numpy columns (converted once), sorted by step."""

    def __init__(self, signals: pl.DataFrame):
        self.frame = signals.sort("step") if "step" in signals.columns else signals
        self.columns = list(self.frame.columns)
        self.steps = (self.frame.get_column("step").cast(pl.Int64).to_numpy() if "step" in self.columns
                      else np.empty(0, dtype=np.int64))
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Finite values of a signal and their steps."""
        if name not in self._cache:
            if name not in self.columns or name == "step":
                self._cache[name] = (np.empty(0), np.empty(0, dtype=np.int64))
            else:
                v = self.frame.get_column(name).cast(pl.Float64).to_numpy()
                ok = np.isfinite(v)
                self._cache[name] = (v[ok], self.steps[ok])
        return self._cache[name]


def _series(signals: pl.DataFrame | _Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Finite values of a signal and their steps, sorted by step."""
    table = signals if isinstance(signals, _Table) else _Table(signals)
    return table.series(name)


def primary_signal(signals: pl.DataFrame | _Table, cfg: DetectConfig | None = None) -> str | None:
    """``reward`` if it has >= ``min_steps`` finite, non-constant values, else ``accuracy``,
    else None."""
    cfg = cfg or DetectConfig()
    for name in ("reward", "accuracy"):
        v, _ = _series(signals, name)
        if v.size >= cfg.min_steps and np.ptp(v) > 0:
            return name
    return None


def _trailing_median(x: np.ndarray, w: int) -> np.ndarray:
    """Median of the last ``w`` points up to and including each point (fewer at the start):
    sliding windows over the series NaN-padded in front, as `detect.rolling_baseline` does."""
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        return np.empty(0)
    padded = np.r_[np.full(w - 1, np.nan), x]
    return _row_nanmedian(np.lib.stride_tricks.sliding_window_view(padded, w))


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of the runs of True."""
    if mask.size == 0:
        return []
    d = np.diff(np.r_[0, mask.astype(np.int8), 0])
    return list(zip(np.nonzero(d == 1)[0].tolist(), np.nonzero(d == -1)[0].tolist()))


# ---------------------------------------------------------------------------------------------
# episodes
# ---------------------------------------------------------------------------------------------


@dataclass
class _Drop:
    onset: int  # indices into the finite series
    detected: int
    trough: int
    recovery: int | None
    end: int
    pre_level: float
    peak: float
    changes: list[Change]


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


def _significant_drop(x: np.ndarray, before: np.ndarray, r0: int, i: int, j_end: int, thr: float,
                      base: tuple[float, float], cfg: DetectConfig) -> bool:
    """The drop sustained at ``i`` (decline from ``r0``, baseline points ``before``) is
    significant: the median of its first ``min_episode_len`` values is ``collapse_z`` sigmas
    under the baseline; or, when the baseline is shorter than ``min_periods`` (its sigma
    unreliable), the whole low stretch (from ``r0`` while values stay under ``thr``, at least
    2 x ``min_episode_len`` of them under it) ranks below the baseline points
    (`rank_drop_pvalue` <= ``drop_rank_p``). The second test needs no sigma: a collapse after
    only 3 noisy points (whose sigma, widened for the small sample, puts the first bar below
    zero reward) is still found once its low stretch is long enough."""
    if float(np.median(x[i:j_end])) <= base[0] - cfg.collapse_z * base[1]:
        return True
    if before.size >= cfg.min_periods:
        return False  # a baseline long enough for its sigma: the first test is the test
    end = i
    while end < x.size and x[end] < thr:
        end += 1
    if end - i < 2 * cfg.min_episode_len:
        return False
    return rank_drop_pvalue(before, x[r0:end]) <= cfg.drop_rank_p


def _decline_start(x: np.ndarray, lo: int, i: int, j_end: int, min_pre: int) -> int:
    """Where the decline that is sustained at ``i`` began: the split ``k`` of ``x[lo:j_end]``
    (``lo + min_pre <= k <= i``) with the largest standardised fall in mean (the mean-shift
    change-point statistic ``(mean_before - mean_after) * sqrt(n_b * n_a / n)``)."""
    ks = np.arange(lo + min_pre, i + 1)
    if ks.size <= 1:
        return i if ks.size == 0 else int(ks[0])
    seg = x[lo:j_end]
    c = np.r_[0.0, np.cumsum(seg)]
    nb = ks - lo
    na = j_end - ks
    fall = c[nb] / nb - (c[-1] - c[nb]) / na
    return int(ks[np.argmax(fall * np.sqrt(nb * na / (j_end - lo)))])


def _find_drops(x: np.ndarray, s: np.ndarray, cfg: DetectConfig, notes: list[str], name: str) -> list[_Drop]:
    n = x.size
    start = min(cfg.min_drop_baseline, cfg.min_periods)
    if n < start + cfg.min_episode_len:
        return []
    med, sig = rolling_baseline(x, cfg)
    lvl = _trailing_median(x, cfg.peak_window)
    drops: list[_Drop] = []
    L, R = cfg.min_episode_len, cfg.recovery_len
    peak_from = 0  # the running peak restarts after a recovery
    i = start
    while i < n:
        if i - peak_from < start:
            i += 1
            continue
        peak = float(np.max(lvl[peak_from:i]))
        thr = peak - cfg.collapse_drop * abs(peak)
        if not x[i] < thr:
            i += 1
            continue
        # sustained?
        j_end = min(i + L, n)
        peaks = np.maximum.accumulate(np.r_[peak, lvl[i:j_end - 1]]) if j_end - i > 1 else np.array([peak])
        sustained = bool(np.all(x[i:j_end] < peaks - cfg.collapse_drop * np.abs(peaks)))
        if not sustained:
            i += 1
            continue
        if j_end - i < L:
            if i > peak_from and x[i - 1] < thr:
                break  # low for longer already, without passing the significance bar: no new drop
            notes.append(f"{name} fell below {cfg.collapse_drop:.0%} under its peak at step {int(s[i])}, "
                         f"but the run ends after {j_end - i} step(s) (< min_episode_len={L}): not yet an episode")
            break
        # significance against the baseline from before the decline began: the trailing
        # baseline at i would already hold the declining steps before it (a noisy, gradual
        # collapse, or one whose first steps narrowly miss the bar, would never be found)
        r0 = _decline_start(x, max(peak_from, i - cfg.window), i, j_end, start)
        before = x[max(peak_from, r0 - cfg.window):r0]  # the baseline: up to `window` points, this segment
        base = _drop_baseline(before, cfg)
        if base is None or not _significant_drop(x, before, r0, i, j_end, thr, base, cfg):
            i += 1
            continue
        onset, changes = _refine_onset(x, s, i, med, sig, cfg, floor=peak_from)
        onset = min(onset, r0)  # the decline began at r0 (its split point), if not earlier
        pre_level = float(med[onset]) if np.isfinite(med[onset]) else base[0]
        rec_thr = pre_level - (1.0 - cfg.recovery_frac) * abs(pre_level)
        recovery = None
        k = i + L
        while k < n:
            if x[k] >= rec_thr:
                tail = x[k:k + R]
                if tail.size == R and np.median(tail) >= rec_thr:
                    recovery = k
                    break
                if tail.size < R and np.median(tail) >= rec_thr:
                    notes.append(f"{name} is back above {cfg.recovery_frac:.0%} of its pre-onset level from step "
                                 f"{int(s[k])}, for fewer than recovery_len={R} steps so far")
                    break
            k += 1
        end = (recovery - 1) if recovery is not None else n - 1
        trough = onset + int(np.argmin(x[onset:end + 1]))
        drops.append(_Drop(onset, i, trough, recovery, end, pre_level, peak, changes))
        if recovery is None:
            break
        peak_from = recovery
        i = recovery + R
    return drops


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


def _window_median(v: np.ndarray, s: np.ndarray, lo: float, hi: float) -> float:
    m = (s >= lo) & (s <= hi)
    return float(np.median(v[m])) if m.any() else float("nan")


def _material(before: float, after: float, cfg: DetectConfig) -> bool:
    """A probability moved materially: by ``move_min_abs`` or by a factor ``move_min_ratio``, and
    it is ``move_min_prob`` or more on one side."""
    if max(before, after) < cfg.move_min_prob:
        return False
    if abs(after - before) >= cfg.move_min_abs:
        return True
    lo, hi = sorted((max(before, 1e-12), max(after, 1e-12)))
    return hi / lo >= cfg.move_min_ratio


def _moves(signals: _Table, primary: str, onset: int, end_step: int, cfg: DetectConfig,
           control_tokens: Sequence[Mapping[str, Any]]) -> list[SignalMove]:
    lo_step = onset - cfg.lead_window
    hi_step = onset + cfg.lag_window
    history = 2 * cfg.window + cfg.lead_window
    out: list[SignalMove] = []
    for name in signals.columns:
        if name in ("step", primary) or _IGNORED.match(name):
            continue
        v, s = _series(signals, name)
        keep = (s >= onset - history) & (s <= hi_step)
        v, s = v[keep], s[keep]
        if v.size <= cfg.min_periods or np.ptp(v) == 0:
            continue
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
            if sign * z >= cfg.collapse_z and sign * z0 >= cfg.onset_z:
                before = float(np.median(v[s < c.step][-cfg.window:]))
                after = _window_median(v, s, onset, min(hi_step, max(end_step, onset)))
                if not sign * (after - before) > 0:  # a blip that is gone by the onset is not a move
                    continue
                if logscale and not _material(before, after, cfg):
                    continue  # e.g. p(gold) 1.000 -> 0.999: many sigmas of a noise-free probe, no change
                want = signal_direction(name, control_tokens)
                out.append(SignalMove(name, int(c.step), int(onset - c.step), c.direction, c.method,
                                      float(min(abs(z), _MAX_SCORE)),
                                      int(c.alarm_step), before, after, want in ("both", c.direction)))
                break
    out.sort(key=lambda m: (m.step, -round(m.score, 9), m.signal))  # name breaks ties: stable output
    return out


def _implicated(signals: _Table, onset: int, end_step: int, moves: list[SignalMove], cfg: DetectConfig,
                control_tokens: Sequence[Mapping[str, Any]]) -> list[ImplicatedToken]:
    info = {t.get("name"): t for t in control_tokens}
    moved = {m.signal: m for m in moves}
    b_hi = onset - cfg.lead_window
    a_hi = min(onset + cfg.lag_window, max(end_step, onset))
    rises: dict[str, list[ContextRise]] = {}
    for name in signals.columns:
        parts = name.split("/")
        if len(parts) != 3:
            continue
        if parts[0] in ("probe", "ctx") and parts[2] not in ("gold", "n"):
            ctx, tok, source = parts[1], parts[2], "probe" if parts[0] == "probe" else "tokens"
        elif parts[0] == "ctrl" and parts[2] == "p":
            ctx, tok, source = "all", parts[1], "tokens"
        else:
            continue
        v, s = _series(signals, name)
        if v.size == 0:
            continue
        before = _window_median(v, s, b_hi - cfg.window, b_hi - 1)
        if not math.isfinite(before):
            before = _window_median(v, s, -math.inf, onset - 1)
        after = _window_median(v, s, onset, a_hi)
        if not (math.isfinite(before) and math.isfinite(after)):
            continue
        ratio = after / max(before, 1e-12)
        if ratio < cfg.implicate_min_ratio or after - before < cfg.implicate_min_abs:
            continue
        role = info.get(tok, {}).get("role")
        roles = KEY_CONTEXT_ROLES.get(ctx, {})
        m = moved.get(name)
        rises.setdefault(tok, []).append(ContextRise(
            ctx, source, name, before, after, ratio, m.step if m else None, m.lead if m else None,
            role is not None and roles.get("collapse") == role))
    out = []
    for tok, ctxs in rises.items():
        ctxs.sort(key=lambda c: (-round(c.ratio, 9), c.context == "all", c.context))
        t = info.get(tok, {})
        ab = aa = None
        v, s = _series(signals, f"attribution/{tok}/total")
        if v.size:
            ab = _window_median(v, s, b_hi - cfg.window, b_hi - 1)
            aa = _window_median(v, s, onset - cfg.lead_window, a_hi)
        out.append(ImplicatedToken(tok, t.get("role"), t.get("text"), math.log10(ctxs[0].ratio), ctxs, ab, aa))
    out.sort(key=lambda t: (-round(t.score, 9), t.token))
    return out


def _examples(rollouts: pl.LazyFrame | None, before_lt: int, after_step: int,
              cfg: DetectConfig) -> tuple[list[RolloutExample], list[RolloutExample]]:
    if rollouts is None or cfg.n_examples <= 0:
        return [], []
    schema = rollouts.collect_schema()
    if "step" not in schema or "sample_id" not in schema:
        return [], []
    steps = rollouts.select(pl.col("step").unique()).collect(engine="streaming").get_column("step").sort()
    b = steps.filter(steps < before_lt)
    a = steps.filter(steps >= after_step)
    if not len(a):
        a = steps.filter(steps >= before_lt)
    pick = ([int(b[-1])] if len(b) else []) + ([int(a[0])] if len(a) else [])
    if not pick:
        return [], []
    cols = [c for c in ("step", "sample_id", "group_id", "reward", "turn_states", "completion") if c in schema]
    cond = pl.col("step").is_in(pick)
    for flag in ("is_hint", "is_off_policy"):  # on-policy rollouts only
        if flag in schema:
            cond = cond & ~pl.col(flag).fill_null(False)
    df = rollouts.filter(cond).select(cols).collect()
    collapsed = (pl.col("turn_states").list.eval(pl.element() == "collapsed").list.any().fill_null(False)
                 if "turn_states" in df.columns else pl.lit(False))
    reward = pl.col("reward").fill_nan(None) if "reward" in df.columns else pl.lit(None, pl.Float64)
    df = df.with_columns(collapsed.alias("_c"), reward.alias("_r"))

    def rows(frame: pl.DataFrame) -> list[RolloutExample]:
        out = []
        for r in frame.head(cfg.n_examples).iter_rows(named=True):
            text = r.get("completion")
            out.append(RolloutExample(int(r["step"]), int(r["sample_id"]), r.get("group_id"), r.get("reward"),
                                      r.get("turn_states"), text[: cfg.excerpt_chars] if isinstance(text, str) else None))
        return out

    before = after = []
    if len(b):
        before = rows(df.filter(pl.col("step") == int(b[-1]))
                      .sort(["_c", "_r", "sample_id"], descending=[False, True, False], nulls_last=True))
    if len(a):
        after = rows(df.filter(pl.col("step") == int(a[0]))
                     .sort(["_c", "_r", "sample_id"], descending=[True, False, False], nulls_last=True))
    return before, after


@dataclass
class PriorScan:
    """An earlier scan of the same run with the same `DetectConfig` and detection code (the scan
    cache holds one): the signal table it saw and its episodes. An episode with the same onset
    whose window of signals is unchanged gets the earlier moves and example rollouts back
    instead of recomputing them, which is most of the detection time on a re-scan after new
    steps (the windows end ``lag_window`` steps after the onset)."""

    signals: pl.DataFrame
    episodes: list["CollapseEpisode"]

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
    control_tokens = list(getattr(src_meta, "control_tokens", None) or [])
    rollouts = getattr(src_meta, "rollouts", None)
    table = _Table(signals)
    name = primary_signal(table, cfg)
    if name is None:
        return []
    x, s = table.series(name)
    episodes = []
    for d in _find_drops(x, s, cfg, notes, name):
        onset, end_step = int(s[d.onset]), int(s[d.end])
        trough_step = int(s[d.trough])
        collapsed = None
        cv, cs = table.series("turn_state/collapsed")
        if cv.size:
            at = np.nonzero(cs == trough_step)[0]
            collapsed = float(cv[at[0]]) if at.size else _window_median(cv, cs, onset, end_step)
        moves = prior.moves(signals, name, onset, end_step, cfg) if prior is not None else None
        if moves is None:
            moves = _moves(table, name, onset, end_step, cfg, control_tokens)
        implicated = _implicated(table, onset, end_step, moves, cfg, control_tokens)
        examples = prior.examples(name, onset, trough_step) if prior is not None else None
        before, after = examples if examples is not None else _examples(rollouts, onset, trough_step, cfg)
        rel = (d.peak - float(x[d.trough])) / abs(d.peak) if d.peak != 0 else float("nan")
        episodes.append(CollapseEpisode(
            signal=name, onset_step=onset, detected_step=int(s[d.detected]), trough_step=trough_step,
            recovery_step=int(s[d.recovery]) if d.recovery is not None else None, end_step=end_step,
            pre_level=d.pre_level, peak=d.peak, trough_value=float(x[d.trough]), relative_drop=rel,
            collapsed_share_at_trough=collapsed, onset_changes=d.changes, moves=moves, implicated=implicated,
            examples_before=before, examples_after=after,
        ))
    return episodes


# ---------------------------------------------------------------------------------------------
# pathologies
# ---------------------------------------------------------------------------------------------


def _sustained(mask: np.ndarray, min_len: int, start: int = 0) -> tuple[int, int] | None:
    """The first run of ``min_len`` or more True values that begins at index ``start`` or later."""
    runs = [r for r in _runs(mask) if r[1] - r[0] >= min_len and r[0] >= start]
    return runs[0] if runs else None


def _early_level(v: np.ndarray, cfg: DetectConfig) -> tuple[float, int]:
    """Median of the first half of the series, between ``min_periods`` and ``window`` points (a
    short run's 'early' level must not already hold the change it is compared against), and
    the first index a departure from it may begin at: after at least half of that window, so
    the level was seen before the departure. Otherwise a series that starts late, e.g. a resumed verl
    run's metrics (its file logger truncates them), whose first points are healthy and the rest
    collapsed, would show its first points as a 'blow-up' from a level made of the later ones."""
    k = max(cfg.min_periods, min(cfg.window, v.size // 2))
    return float(np.median(v[:k])), (min(k, v.size) + 1) // 2


def find_pathologies(signals: pl.DataFrame, cfg: DetectConfig | None = None) -> list[Pathology]:
    """Entropy collapse / blow-up, NaN log-probs, non-finite metrics, growing train/inference
    mismatch (thresholds in :class:`DetectConfig`)."""
    cfg = cfg or DetectConfig()
    out: list[Pathology] = []
    L = cfg.min_episode_len
    if "nonfinite_logprob" in signals.columns:
        v, s = _series(signals, "nonfinite_logprob")
        bad = v > 0
        if bad.any():
            steps = s[bad]
            out.append(Pathology(
                "nan_logprobs", "nonfinite_logprob", int(steps[0]), int(steps[-1]), int(bad.sum()), 0.0, float(v.max()),
                f"non-finite log-probs of generated tokens at {int(bad.sum())} step(s), first at step {int(steps[0])} "
                f"(up to {int(v.max())} per step)"))
    value_cols = [c for c in signals.columns if c != "step"]
    if value_cols and signals.height:
        counts = signals.select([(pl.col(c).cast(pl.Float64).is_not_null() & ~pl.col(c).cast(pl.Float64).is_finite())
                                 .sum().alias(c) for c in value_cols]).row(0, named=True)
        for name, k in counts.items():
            if not k:
                continue
            st = signals.filter(pl.col(name).cast(pl.Float64).is_not_null()
                                & ~pl.col(name).cast(pl.Float64).is_finite()).get_column("step")
            out.append(Pathology("nonfinite_metrics", name, int(st.min()), int(st.max()), int(k), None, None,
                                 f"{name} is NaN/inf at {int(k)} step(s), first at step {int(st.min())}"))
    v, s = _series(signals, "entropy")
    if v.size >= cfg.min_periods:
        early, start = _early_level(v, cfg)
        if early > 0:
            run = _sustained(v < cfg.entropy_collapse_frac * early, L, start)
            if run:
                seg = v[run[0]:]
                out.append(Pathology(
                    "entropy_collapse", "entropy", int(s[run[0]]), int(s[run[1] - 1]), run[1] - run[0], early,
                    float(seg.min()), f"entropy fell below {cfg.entropy_collapse_frac:.0%} of its early level "
                    f"{early:.3g} from step {int(s[run[0]])} (min {seg.min():.3g})"))
            run = _sustained(v > cfg.entropy_blowup_factor * early, L, start)
            if run:
                seg = v[run[0]:]
                out.append(Pathology(
                    "entropy_blowup", "entropy", int(s[run[0]]), int(s[run[1] - 1]), run[1] - run[0], early,
                    float(seg.max()), f"entropy rose above {cfg.entropy_blowup_factor:g}x its early level "
                    f"{early:.3g} from step {int(s[run[0]])} (max {seg.max():.3g})"))
    # |logprob - sampler_logprob| (nats), or verl's |p - p_sampler| (a probability; |dp| <= |dlogp|)
    for name, what, unit in (("mismatch/abs_logprob_diff", "|logprob - sampler_logprob|", " nats"),
                             ("mismatch/abs_prob_diff", "|p - sampler_p|", "")):
        v, s = _series(signals, name)
        if v.size < cfg.min_periods:
            continue
        early, start = _early_level(v, cfg)
        limit = max(cfg.mismatch_growth_factor * early, cfg.mismatch_min)
        run = _sustained(v > limit, L, start)
        if run:
            out.append(Pathology(
                "mismatch_growth", name, int(s[run[0]]), int(s[run[1] - 1]), run[1] - run[0],
                early, float(v[run[0]:].max()),
                f"train/inference mismatch {what} grew above {limit:.3g}{unit} (early level "
                f"{early:.3g}) from step {int(s[run[0]])}"))
    out.sort(key=lambda p: (p.first_step, p.kind))
    return out


# ---------------------------------------------------------------------------------------------
# top level
# ---------------------------------------------------------------------------------------------


def scan_source(src: RunSource, cfg: DetectConfig | None = None, signals: pl.DataFrame | None = None,
                prior: PriorScan | None = None) -> ScanResult:
    """Signals, collapse episodes, pathologies and a verdict for one run.

    Verdict: ``collapse`` if any episode; else ``pathology`` if any pathology; else
    ``insufficient_data`` if neither reward nor accuracy has ``min_steps`` finite values; else
    ``healthy``. ``signals``: precomputed :func:`step_signals` output (e.g. from a cache);
    ``prior``: an earlier scan whose unchanged parts are reused (`PriorScan`).
    """
    cfg = cfg or DetectConfig()
    notes: list[str] = list(getattr(src, "notes", []) or [])
    issues = list(getattr(src, "issues", []) or [])
    if issues:
        notes.append(f"{issues_summary(len(issues))}; first: {issues[0]}")
    if signals is None:
        signals = step_signals(src, low_prob=cfg.low_prob)
    generic = generic_signals(signals.columns)
    if generic:
        shown = ", ".join(generic[:12]) + (f" and {len(generic) - 12} more" if len(generic) > 12 else "")
        notes.append(f"{len(generic)} metric(s) of no known meaning reach only the generic change detection "
                     f"(the episodes' moves), no dedicated detector: {shown}")
    primary = primary_signal(signals, cfg)
    if primary is None:
        notes.append(f"neither reward nor accuracy has {cfg.min_steps} finite, varying values: no collapse detection")
    elif primary == "accuracy":
        notes.append("no usable reward signal: collapse detection runs on accuracy")
    episodes = find_episodes(signals, src, cfg, notes, prior)
    pathologies = find_pathologies(signals, cfg)
    if episodes:
        verdict = "collapse"
    elif pathologies:
        verdict = "pathology"
    elif primary is None:
        verdict = "insufficient_data"
    else:
        verdict = "healthy"
    path = getattr(src, "path", None)
    return ScanResult(signals=signals, episodes=episodes, pathologies=pathologies, verdict=verdict, notes=notes,
                      primary_signal=primary, source_path=str(path) if isinstance(path, (str, Path)) else None,
                      source_format=getattr(src, "format", None), config=cfg)
