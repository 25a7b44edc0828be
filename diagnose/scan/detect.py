"""Change detectors on one per-step series (numpy): trailing robust z-scores, two-sided CUSUM
and Page-Hinkley.

All three are causal: an alarm raised at step t uses only values at steps <= t. Non-finite
values (NaN, ±inf, missing steps) are skipped: the detectors run on the finite points in step
order and report steps of the original axis. Scales are robust: the baseline of a point is the
median of the ``window`` finite points before it, its sigma ``1.4826 * MAD`` (floored, see
:func:`robust_sigma`), so one outlier neither fires an alarm by itself in CUSUM nor hides a
change. Short series (fewer than ``min_periods + 1`` finite points) give no alarm.

Defaults are documented on :class:`DetectConfig` and in ``docs/scan.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "Change",
    "DetectConfig",
    "METHODS",
    "cusum",
    "detect_changes",
    "page_hinkley",
    "robust_sigma",
    "rolling_baseline",
    "robust_zscores",
    "zscore_alarms",
]

METHODS: tuple[str, ...] = ("zscore", "cusum", "page_hinkley")


@dataclass(frozen=True)
class DetectConfig:
    """Detector and episode settings. Scales are in robust sigmas of the trailing baseline."""

    # --- baseline
    window: int = 20  #: trailing window (finite points) for the baseline median / MAD
    min_periods: int = 10  #: baseline points needed before any alarm
    min_sigma_rel: float = 0.01  #: sigma floor, relative to |baseline median|
    min_sigma_abs: float = 1e-9  #: absolute sigma floor
    # --- detectors
    z_threshold: float = 5.0  #: robust z-score alarm threshold
    cusum_k: float = 1.0  #: CUSUM slack per step (sigmas): tuned to shifts of >= 2 sigmas
    cusum_h: float = 8.0  #: CUSUM decision threshold (sigmas)
    ph_delta: float = 0.75  #: Page-Hinkley tolerated drift per step (sigmas)
    ph_lambda: float = 10.0  #: Page-Hinkley decision threshold (sigmas)
    clip: float = 4.0  #: CUSUM / Page-Hinkley clip each point's deviation at this many sigmas (one outlier cannot alarm)
    # --- collapse episodes (on reward, else accuracy)
    collapse_drop: float = 0.5  #: a collapse step is below (1 - collapse_drop) * running peak
    collapse_z: float = 3.0  #: ... and its first min_episode_len values are this many sigmas below baseline
    peak_window: int = 5  #: the running peak is taken over trailing medians of this many points
    min_episode_len: int = 3  #: consecutive collapse steps needed for an episode
    drop_rank_p: float = 0.005  #: ... or, a long low stretch after a short or noisy baseline: the rank
    #:   test (Mann-Whitney, one-sided) of the whole low stretch against the baseline below this
    drop_rank_p_long: float = 1e-4  #: ... the same test's level after a baseline of min_periods points or
    #:   more (a reward of few prompts is so noisy that its 3-sigma bar lies below zero)
    min_drop_baseline: int = 3  #: points of the primary signal before a drop for it to count (a short
    #:   RL phase can collapse within its first steps; with fewer than min_periods points the
    #:   significance bar is widened by sqrt(min_periods / n))
    recovery_frac: float = 0.8  #: recovered when back above recovery_frac * pre-onset level ...
    recovery_len: int = 3  #: ... with the median of this many steps from there above it too
    refine_window: int = 5  #: the onset is refined to change points up to this many steps earlier
    onset_z: float = 2.0  #: a refined onset must start a stretch this many sigmas below baseline
    # --- what moved around the onset
    lead_window: int = 10  #: other signals' change points this many steps before the onset ...
    lag_window: int = 5  #: ... or after it are reported (with their lead time)
    confirm_len: int = 3  #: a signal's change is confirmed by the median of this many points after it
    move_min_ratio: float = 1.5  #: a probability signal's move must change it by this factor ...
    move_min_abs: float = 0.01  #: ... or by this much (absolute): a noise-free probe makes tiny changes "significant"
    move_min_prob: float = 1e-4  #: ... and be at least this probable before or after (1e-7 -> 1e-6 is no move)
    implicate_min_ratio: float = 3.0  #: a control token is implicated if its probability rose this much ...
    implicate_min_abs: float = 0.005  #: ... and by at least this much (absolute)
    n_examples: int = 3  #: representative rollouts before / after
    excerpt_chars: int = 400  #: length of their text excerpts
    # --- pathologies
    min_steps: int = 8  #: fewer finite reward/accuracy steps: verdict insufficient_data
    entropy_collapse_frac: float = 0.2  #: entropy below this fraction of its early level
    entropy_blowup_factor: float = 3.0  #: entropy above this multiple of its early level
    mismatch_growth_factor: float = 3.0  #: train/inference mismatch above this multiple of its early level ...
    mismatch_min: float = 0.05  #: ... and above this many nats
    format_collapse_share: float = 0.5  #: turn_state/collapsed at or above this share, sustained, after
    #:   min_drop_baseline steps below it: a format collapse (caught when the reward is too sparse to drop)
    low_prob: float = 0.01  #: threshold of the low_prob_share signal

    def __post_init__(self) -> None:
        if self.window < 2 or self.min_periods < 2:
            raise ValueError("window and min_periods must be >= 2")
        if self.min_drop_baseline < 3:
            raise ValueError("min_drop_baseline must be >= 3")
        if self.min_episode_len < 1 or self.recovery_len < 1:
            raise ValueError("min_episode_len and recovery_len must be >= 1")
        if not 0 < self.collapse_drop < 1 or not 0 < self.recovery_frac <= 1:
            raise ValueError("collapse_drop must be in (0, 1) and recovery_frac in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Change:
    """A change point: ``step`` is the estimated first step of the new level, ``alarm_step``
    the step at which the detector fired (``alarm_step >= step``, the alarm uses values up to
    ``alarm_step`` only). ``score``: |z| for ``zscore``, the statistic over its threshold for
    ``cusum`` / ``page_hinkley`` (>= 1 at an alarm). ``baseline``: the level before."""

    step: int
    method: str
    direction: str  # "up" | "down"
    score: float
    alarm_step: int
    baseline: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "method": self.method, "direction": self.direction,
                "score": _json_float(self.score), "alarm_step": self.alarm_step, "baseline": _json_float(self.baseline)}


def _json_float(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


# ---------------------------------------------------------------------------------------------
# robust baselines
# ---------------------------------------------------------------------------------------------


def robust_sigma(x: np.ndarray, cfg: DetectConfig | None = None, center: float | None = None) -> float:
    """Scale of a baseline window, robust and efficient: the standard deviation around the
    median after winsorising at 3 MAD-sigmas (``1.4826 * MAD``), so a few outliers cannot
    inflate it while Gaussian noise is estimated almost as well as by the plain std. A zero MAD
    (a mostly constant series) falls back to ``1.2533 * mean absolute deviation``. Floored at
    ``max(min_sigma_abs, min_sigma_rel * |median|)``."""
    cfg = cfg or DetectConfig()
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        return float("nan")
    med = float(np.median(x)) if center is None else center
    return float(_sigma_rows(x[None, :], np.array([med]), cfg)[0])


def rank_drop_pvalue(before: np.ndarray, after: np.ndarray) -> float:
    """One-sided exact Mann-Whitney p-value that ``after`` is stochastically lower than ``before``:
    P(U <= U_obs) under exchangeability, U = #pairs with after > before (ties count 1/2, rounded
    down). No sigma to estimate, so it stays valid for a 3-point baseline: 3 baseline values
    above 9 low ones give p = 1/C(12, 3) = 0.0045. Exact counts by the recursion
    f(n, m, u) = f(n, m - 1, u - n) + f(n - 1, m, u)."""
    a = np.asarray(before, dtype=float)
    b = np.asarray(after, dtype=float)
    n, m = a.size, b.size
    if n == 0 or m == 0:
        return 1.0
    u_obs = int(np.floor(np.sum(b[:, None] > a[None, :]) + 0.5 * np.sum(b[:, None] == a[None, :])))
    # f[j]: counts of U for (i, j) as i goes 0..n; a polynomial in U of degree i * j
    f = [np.ones(1)] * (m + 1)
    for i in range(1, n + 1):
        g = [np.ones(1)]
        for j in range(1, m + 1):
            left = np.zeros(i * j + 1)
            left[: f[j].size] += f[j]  # the largest value is from `before`: U unchanged
            left[i: i + g[j - 1].size] += g[j - 1]  # ... from `after`: above all i `before` values
            g.append(left)
        f = g
    counts = f[m]
    return float(counts[: u_obs + 1].sum() / counts.sum())


def _row_nanmedian(a: np.ndarray) -> np.ndarray:
    """Median of each row ignoring NaN (rows with at least one value); faster than np.nanmedian."""
    srt = np.sort(a, axis=1)  # NaN last
    n = np.sum(np.isfinite(a), axis=1)
    r = np.arange(a.shape[0])
    lo = np.maximum((n - 1) // 2, 0)
    hi = np.maximum(n // 2, 0)
    return 0.5 * (srt[r, lo] + srt[r, hi])


def _sigma_rows(win: np.ndarray, med: np.ndarray, cfg: DetectConfig) -> np.ndarray:
    """robust_sigma of each row of ``win`` (rows: windows; NaN = absent), vectorised."""
    n = np.sum(np.isfinite(win), axis=1)
    dev = win - med[:, None]
    absdev = np.abs(dev)
    mad = 1.4826 * (_row_nanmedian(absdev) if np.isnan(win).any() else np.median(absdev, axis=1))
    lim = np.where(mad > 0, 3.0 * mad, np.inf)[:, None]
    clipped = np.clip(dev, -lim, lim)
    s = np.sqrt(np.nansum(clipped ** 2, axis=1) / np.maximum(n - 1, 1))
    s = np.where(mad > 0, s, 1.2533 * np.nansum(absdev, axis=1) / np.maximum(n, 1))
    return np.maximum(s, np.maximum(cfg.min_sigma_abs, cfg.min_sigma_rel * np.abs(med)))


def rolling_baseline(x: np.ndarray, cfg: DetectConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Trailing baseline of each point of a finite series: median and :func:`robust_sigma` of
    the ``window`` points before it (NaN while fewer than ``min_periods`` exist)."""
    cfg = cfg or DetectConfig()
    x = np.asarray(x, dtype=float)
    n = x.size
    med = np.full(n, np.nan)
    sig = np.full(n, np.nan)
    w = cfg.window
    lo, hi = cfg.min_periods, min(w, n)
    if hi > lo:  # expanding part: windows x[:i], NaN-padded to width w
        rows = np.arange(lo, hi)
        cols = np.arange(w)
        win = np.where(cols[None, :] < rows[:, None], np.resize(x, w)[None, :] if n >= w else
                       np.pad(x, (0, w - n))[None, :], np.nan)
        m = _row_nanmedian(win)
        med[lo:hi] = m
        sig[lo:hi] = _sigma_rows(win, m, cfg)
    if n > w:
        win = np.lib.stride_tricks.sliding_window_view(x[:-1], w)  # window ending at i-1, i >= w
        m = np.median(win, axis=1)
        med[w:] = m
        sig[w:] = _sigma_rows(win, m, cfg)
    return med, sig


def _finite(values: Any, steps: Any) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=float).reshape(-1)
    s = np.asarray(steps).reshape(-1)
    if v.shape != s.shape:
        raise ValueError(f"values and steps differ in length: {v.shape} vs {s.shape}")
    ok = np.isfinite(v)
    v, s = v[ok], s[ok].astype(np.int64)
    if s.size > 1 and np.any(np.diff(s) < 0):
        order = np.argsort(s, kind="stable")
        v, s = v[order], s[order]
    return v, s


def robust_zscores(values: Any, cfg: DetectConfig | None = None) -> np.ndarray:
    """Trailing robust z-score of each point, aligned with ``values`` (NaN where the value is
    non-finite or the history too short). Non-finite values are skipped in the baselines."""
    cfg = cfg or DetectConfig()
    v = np.asarray(values, dtype=float).reshape(-1)
    out = np.full(v.shape, np.nan)
    idx = np.nonzero(np.isfinite(v))[0]
    if idx.size == 0:
        return out
    x = v[idx]
    med, sig = rolling_baseline(x, cfg)
    out[idx] = (x - med) / sig
    return out


# ---------------------------------------------------------------------------------------------
# detectors (on finite, step-sorted series)
# ---------------------------------------------------------------------------------------------


def zscore_alarms(x: np.ndarray, s: np.ndarray, cfg: DetectConfig, direction: str = "both") -> list[Change]:
    """An alarm where the trailing robust z-score crosses ``z_threshold``; a run of alarms in the
    same direction is reported once, at its first step."""
    med, sig = rolling_baseline(x, cfg)
    with np.errstate(invalid="ignore"):
        z = (x - med) / sig
    out: list[Change] = []
    prev = None
    for i in range(x.size):
        zi = z[i]
        d = "up" if zi >= cfg.z_threshold else "down" if zi <= -cfg.z_threshold else None
        if d is not None and direction in ("both", d) and d != prev:
            out.append(Change(int(s[i]), "zscore", d, float(abs(zi)), int(s[i]), float(med[i])))
        prev = d
    return out


def cusum(x: np.ndarray, s: np.ndarray, cfg: DetectConfig, direction: str = "both") -> list[Change]:
    """Two-sided CUSUM on robust z-scores. Each side measures a point against the trailing
    baseline (median / robust sigma of the ``window`` points) at the start of its current
    excursion, i.e. the baseline is frozen while an excursion is under way. An alarm reports the
    excursion's first step as the change point; the baseline then restarts there
    (``min_periods`` new points before the next alarm)."""
    out: list[Change] = []
    n = x.size
    ref = 0
    floor = 0.0  # after a restart: the previous segment's sigma, until `window` new points exist
    while ref < n:
        med, sig = rolling_baseline(x[ref:], cfg)
        if floor > 0:
            sig[: cfg.window] = np.maximum(sig[: cfg.window], floor)
        up = dn = 0.0
        up_start = dn_start = -1
        restart = None
        for j in range(med.size):
            if not np.isfinite(med[j]):
                continue
            bu = up_start if up > 0 else j
            bd = dn_start if dn > 0 else j
            z_up = min((x[ref + j] - med[bu]) / sig[bu], cfg.clip)
            z_dn = max((x[ref + j] - med[bd]) / sig[bd], -cfg.clip)
            new_up = max(0.0, up + z_up - cfg.cusum_k)
            new_dn = max(0.0, dn - z_dn - cfg.cusum_k)
            if up == 0.0 and new_up > 0:
                up_start = j
            if dn == 0.0 and new_dn > 0:
                dn_start = j
            up, dn = new_up, new_dn
            side = "up" if up >= cfg.cusum_h else "down" if dn >= cfg.cusum_h else None
            if side is None:
                continue
            start = up_start if side == "up" else dn_start
            if direction in ("both", side):
                stat = up if side == "up" else dn
                out.append(Change(int(s[ref + start]), "cusum", side, float(stat / cfg.cusum_h),
                                  int(s[ref + j]), float(med[start])))
            restart = ref + start
            floor = float(sig[start])
            break
        if restart is None:
            break
        ref = max(restart, ref + 1)
    return out


def page_hinkley(x: np.ndarray, s: np.ndarray, cfg: DetectConfig, direction: str = "both") -> list[Change]:
    """Two-sided Page-Hinkley test: cumulative deviations from the running mean of the current
    segment, with tolerance ``ph_delta`` and threshold ``ph_lambda`` (in robust sigmas of the
    segment's first ``min_periods`` points, floored like the baselines). The change point is
    the step after the cumulative sum's extremum; the segment restarts there."""
    out: list[Change] = []
    n = x.size
    seg = 0
    floor = 0.0
    while seg < n:
        if n - seg <= cfg.min_periods:
            break
        head = x[seg:seg + cfg.min_periods]
        sd = max(robust_sigma(head, cfg), floor)
        delta, lam = cfg.ph_delta * sd, cfg.ph_lambda * sd
        total = float(head.sum())
        count = cfg.min_periods
        m_up = m_dn = 0.0
        min_up, argmin_up = 0.0, seg + cfg.min_periods
        max_dn, argmax_dn = 0.0, seg + cfg.min_periods
        restart = None
        for i in range(seg + cfg.min_periods, n):
            total += x[i]
            count += 1
            mean = total / count
            dev = min(max(x[i] - mean, -cfg.clip * sd), cfg.clip * sd)
            m_up += dev - delta
            m_dn += dev + delta
            if m_up < min_up:
                min_up, argmin_up = m_up, i + 1
            if m_dn > max_dn:
                max_dn, argmax_dn = m_dn, i + 1
            hit = None
            if m_up - min_up > lam:
                hit = ("up", min(argmin_up, i), (m_up - min_up) / lam)
            elif max_dn - m_dn > lam:
                hit = ("down", min(argmax_dn, i), (max_dn - m_dn) / lam)
            if hit is not None:
                d, start, score = hit
                if direction in ("both", d):
                    base = float(np.median(x[max(seg, start - cfg.window):start])) if start > seg else float("nan")
                    out.append(Change(int(s[start]), "page_hinkley", d, float(score), int(s[i]), base))
                restart = start
                break
        if restart is None:
            break
        seg = max(restart, seg + 1)
        floor = sd
    return out


def detect_changes(values: Any, steps: Any, cfg: DetectConfig | None = None, direction: str = "both",
                   methods: tuple[str, ...] = METHODS) -> list[Change]:
    """Change points of one per-step series by each of ``methods`` (``zscore``, ``cusum``,
    ``page_hinkley``), sorted by step then method. ``direction``: ``up``, ``down`` or ``both``.
    Non-finite values are skipped; a series with fewer than ``min_periods + 1`` finite points
    gives ``[]``."""
    cfg = cfg or DetectConfig()
    if direction not in ("up", "down", "both"):
        raise ValueError(f"direction must be 'up', 'down' or 'both', got {direction!r}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown detector(s) {unknown}; expected {METHODS}")
    x, s = _finite(values, steps)
    if x.size <= cfg.min_periods:
        return []
    fns = {"zscore": zscore_alarms, "cusum": cusum, "page_hinkley": page_hinkley}
    out: list[Change] = []
    for m in methods:
        out.extend(fns[m](x, s, cfg, direction))
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(out, key=lambda c: (c.step, order[c.method], c.alarm_step))
