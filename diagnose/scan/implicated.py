"""The control tokens implicated in a collapse: those whose probability rose around the onset,
at a key context or over all generated positions (`ImplicatedToken`, one `ContextRise` per
context where it rose).

For every control-token probability signal (`diagnose.scan.names.TokenSignal`), the median
before (``window`` steps ending ``lead_window`` steps before the onset, so a lead rise is inside
the comparison; when those are fewer than 3 points, all its points before the onset, so that a
series that starts late or rises from its first point is still judged against at least 3
points, never its first point alone) and after (onset to ``lag_window`` steps on, or the
episode's end); a rise of ``implicate_min_ratio`` times and ``implicate_min_abs`` implicates the
token there. A token's score is log10 of its largest rise. When none is implicated, a note says
the largest rise that fell short, and which series had too few points to be judged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from diagnose.control_tokens import KEY_CONTEXT_ROLES
from diagnose.scan.detect import DetectConfig
from diagnose.scan.names import TokenSignal, attribution_signal
from diagnose.scan.result import ContextRise, ImplicatedToken, SignalMove
from diagnose.scan.series import SignalTable, window_median

__all__ = ["MIN_BEFORE", "implicated_tokens"]

MIN_BEFORE = 3  # points a "before" level of a token signal is the median of


def _before_level(steps: np.ndarray, values: np.ndarray, onset: int, before_end: int,
                  cfg: DetectConfig) -> tuple[float, str | None]:
    """The level a token signal rose from: the median of its ``window`` points ending at
    ``before_end``; when those are fewer than `MIN_BEFORE` (a series that starts late, e.g.
    rollout tokens from the first RL step), the median of all its points before the onset; NaN
    with fewer than `MIN_BEFORE` of those either. The second value says which (None: the window)."""
    m = (steps >= before_end - cfg.window) & (steps <= before_end - 1)
    if m.sum() >= MIN_BEFORE:
        return float(np.median(values[m])), None
    pre = steps < onset
    if pre.sum() >= MIN_BEFORE:
        return float(np.median(values[pre])), f"its {int(pre.sum())} points before the onset (from step {int(steps[pre][0])})"
    return math.nan, None


def implicated_tokens(signals: SignalTable, onset: int, end_step: int, moves: list[SignalMove], cfg: DetectConfig,
                      control_tokens: Sequence[Mapping[str, Any]]) -> tuple[list[ImplicatedToken], str | None]:
    """The implicated tokens of an episode, strongest rise first, and a note when none is (the
    largest rise that fell short, the series that could not be judged); ``moves``: the
    episode's moves (a rise's change step and lead, where its signal moved)."""
    info = {t.get("name"): t for t in control_tokens}
    moved = {m.signal: m for m in moves}
    before_end = onset - cfg.lead_window
    after_end = min(onset + cfg.lag_window, max(end_step, onset))
    rises: dict[str, list[ContextRise]] = {}
    short: tuple[float, str] | None = None  # the largest rise short of the bar, for the note
    unjudged: list[str] = []
    for name in signals.columns:
        sig = TokenSignal.parse(name)
        if sig is None:
            continue
        s, v = signals.series(name)
        if v.size == 0:
            continue
        before, fallback = _before_level(s, v, onset, before_end, cfg)
        after = window_median(s, v, onset, after_end)
        if not math.isfinite(after):
            continue
        if not math.isfinite(before):
            unjudged.append(f"{name} ({int((s < onset).sum())} point(s) before the onset)")
            continue
        ratio = after / max(before, 1e-12)
        if ratio < cfg.implicate_min_ratio or after - before < cfg.implicate_min_abs:
            if after > before and (short is None or ratio > short[0]):
                short = (ratio, f"{name} {before:.3g} -> {after:.3g} (x{ratio:.1f}"
                                + (f"; before = {fallback}" if fallback else "") + ")")
            continue
        role = info.get(sig.token, {}).get("role")
        m = moved.get(name)
        signature = role is not None and KEY_CONTEXT_ROLES.get(sig.context, {}).get("collapse") == role
        rises.setdefault(sig.token, []).append(ContextRise(
            sig.context, sig.source, name, before, after, ratio, m.step if m else None, m.lead if m else None,
            signature))
    out = []
    for tok, ctxs in rises.items():
        ctxs.sort(key=lambda c: (-round(c.ratio, 9), c.context == "all", c.context))
        t = info.get(tok, {})
        push_before = push_after = None  # its logit attribution, where logged
        s, v = signals.series(attribution_signal(tok, "total"))
        if v.size:
            push_before = window_median(s, v, before_end - cfg.window, before_end - 1)
            push_after = window_median(s, v, onset - cfg.lead_window, after_end)
        out.append(ImplicatedToken(tok, t.get("role"), t.get("text"), math.log10(ctxs[0].ratio), ctxs,
                                   push_before, push_after))
    out.sort(key=lambda t: (-round(t.score, 9), t.token))
    return out, _note(out, short, unjudged, cfg)


def _note(out: list[ImplicatedToken], short: tuple[float, str] | None, unjudged: list[str],
          cfg: DetectConfig) -> str | None:
    note = None
    if not out and short is not None:
        note = (f"no control-token probability rose {cfg.implicate_min_ratio:g}x and by {cfg.implicate_min_abs:g} "
                f"from before the onset to after it; the largest rise: {short[1]}")
    if unjudged:
        note = ((note + "; ") if note else "") + (f"not judged, too few points before the onset: "
                                                   f"{', '.join(unjudged[:5])}" + (" ..." if len(unjudged) > 5 else ""))
    return note
