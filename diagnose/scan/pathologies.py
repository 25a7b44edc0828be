"""Training pathologies besides a collapse: non-finite log-probs and metrics, entropy collapse
or blow-up, growing train/inference mismatch, and a format collapse of the turns (`Pathology`;
thresholds in `DetectConfig`).

A departure (entropy, mismatch) is a run of ``min_episode_len`` or more steps past a bar set
from the series' early level (`_early_level`)."""

from __future__ import annotations

import numpy as np
import polars as pl

from diagnose.scan.detect import DetectConfig
from diagnose.scan.result import Pathology
from diagnose.scan.series import finite_series

__all__ = ["find_pathologies"]


def find_pathologies(signals: pl.DataFrame, cfg: DetectConfig | None = None) -> list[Pathology]:
    """Every pathology of the run, by first step (then kind)."""
    cfg = cfg or DetectConfig()
    out = (_nan_logprobs(signals) + _nonfinite_metrics(signals) + _entropy(signals, cfg) + _mismatch(signals, cfg)
           + _format_collapse(signals, cfg))
    out.sort(key=lambda p: (p.first_step, p.kind))
    return out


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of the runs of True."""
    if mask.size == 0:
        return []
    d = np.diff(np.r_[0, mask.astype(np.int8), 0])
    return list(zip(np.nonzero(d == 1)[0].tolist(), np.nonzero(d == -1)[0].tolist()))


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


def _nan_logprobs(signals: pl.DataFrame) -> list[Pathology]:
    if "nonfinite_logprob" not in signals.columns:
        return []
    s, v = finite_series(signals, "nonfinite_logprob")
    bad = v > 0
    if not bad.any():
        return []
    steps = s[bad]
    return [Pathology(
        "nan_logprobs", "nonfinite_logprob", int(steps[0]), int(steps[-1]), int(bad.sum()), 0.0, float(v.max()),
        f"non-finite log-probs of generated tokens at {int(bad.sum())} step(s), first at step {int(steps[0])} "
        f"(up to {int(v.max())} per step)")]


def _nonfinite_metrics(signals: pl.DataFrame) -> list[Pathology]:
    value_cols = [c for c in signals.columns if c != "step"]
    if not value_cols or not signals.height:
        return []

    def nonfinite(c: str) -> pl.Expr:
        return pl.col(c).cast(pl.Float64).is_not_null() & ~pl.col(c).cast(pl.Float64).is_finite()

    counts = signals.select([nonfinite(c).sum().alias(c) for c in value_cols]).row(0, named=True)
    out = []
    for name, k in counts.items():
        if not k:
            continue
        st = signals.filter(nonfinite(name)).get_column("step")
        out.append(Pathology("nonfinite_metrics", name, int(st.min()), int(st.max()), int(k), None, None,
                             f"{name} is NaN/inf at {int(k)} step(s), first at step {int(st.min())}"))
    return out


def _entropy(signals: pl.DataFrame, cfg: DetectConfig) -> list[Pathology]:
    """Entropy below ``entropy_collapse_frac`` of its early level, or above
    ``entropy_blowup_factor`` times it."""
    s, v = finite_series(signals, "entropy")
    if v.size < cfg.min_periods:
        return []
    early, start = _early_level(v, cfg)
    if early <= 0:
        return []
    out = []
    collapse, blowup = cfg.entropy_collapse_frac, cfg.entropy_blowup_factor
    for kind, past, what, extreme in (("entropy_collapse", v < collapse * early, f"fell below {collapse:.0%} of", "min"),
                                      ("entropy_blowup", v > blowup * early, f"rose above {blowup:g}x", "max")):
        run = _sustained(past, cfg.min_episode_len, start)
        if run:
            after = v[run[0]:]
            value = float(after.min() if extreme == "min" else after.max())
            out.append(Pathology(
                kind, "entropy", int(s[run[0]]), int(s[run[1] - 1]), run[1] - run[0], early, value,
                f"entropy {what} its early level {early:.3g} from step {int(s[run[0]])} ({extreme} {value:.3g})"))
    return out


def _mismatch(signals: pl.DataFrame, cfg: DetectConfig) -> list[Pathology]:
    """|logprob - sampler_logprob| (nats), or verl's |p - p_sampler| (a probability; |dp| <=
    |dlogp|), above ``mismatch_growth_factor`` times its early level and ``mismatch_min``."""
    out = []
    for name, what, unit in (("mismatch/abs_logprob_diff", "|logprob - sampler_logprob|", " nats"),
                             ("mismatch/abs_prob_diff", "|p - sampler_p|", "")):
        s, v = finite_series(signals, name)
        if v.size < cfg.min_periods:
            continue
        early, start = _early_level(v, cfg)
        limit = max(cfg.mismatch_growth_factor * early, cfg.mismatch_min)
        run = _sustained(v > limit, cfg.min_episode_len, start)
        if run:
            out.append(Pathology(
                "mismatch_growth", name, int(s[run[0]]), int(s[run[1] - 1]), run[1] - run[0],
                early, float(v[run[0]:].max()),
                f"train/inference mismatch {what} grew above {limit:.3g}{unit} (early level "
                f"{early:.3g}) from step {int(s[run[0]])}"))
    return out


def _format_collapse(signals: pl.DataFrame, cfg: DetectConfig) -> list[Pathology]:
    """``turn_state/collapsed`` (turns with nothing usable) sustained at or above
    ``format_collapse_share`` after ``min_drop_baseline`` or more steps whose median is below it. The reward detector
    needs a reward that was there to lose: a small group on a weak policy (a real model after a
    short warm start: most steps' reward is 0) has no peak to fall from, while its turns visibly
    break (tests/test_real_model_run.py)."""
    s, v = finite_series(signals, "turn_state/collapsed")
    if v.size < cfg.min_drop_baseline + cfg.min_episode_len:
        return []
    run = _sustained(v >= cfg.format_collapse_share, cfg.min_episode_len, cfg.min_drop_baseline)
    if run is None:
        return []
    early = float(np.median(v[: run[0]]))
    if early >= cfg.format_collapse_share:  # collapsed from the start: nothing broke here
        return []
    peak = float(v[run[0]: run[1]].max())
    return [Pathology(
        "format_collapse", "turn_state/collapsed", int(s[run[0]]), int(s[run[1] - 1]), run[1] - run[0], early, peak,
        f"format collapse: {peak:.0%} of the turns hold nothing usable (early level {early:.0%}) from step "
        f"{int(s[run[0]])} for {run[1] - run[0]} steps")]
