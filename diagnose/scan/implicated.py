"""The control tokens implicated in a collapse: those whose probability rose around the onset,
at a key context or over all generated positions (`ImplicatedToken`, one `ContextRise` per
context where it rose).

For every control-token probability signal (`diagnose.scan.names.TokenSignal`), the median
before (``window`` steps ending ``lead_window`` steps before the onset, so a lead rise is inside
the comparison; failing that, everything before the onset) and after (onset to ``lag_window``
steps on, or the episode's end); a rise of ``implicate_min_ratio`` times and
``implicate_min_abs`` implicates the token there. A token's score is log10 of its largest rise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from diagnose.control_tokens import KEY_CONTEXT_ROLES
from diagnose.scan.detect import DetectConfig
from diagnose.scan.names import TokenSignal, attribution_signal
from diagnose.scan.result import ContextRise, ImplicatedToken, SignalMove
from diagnose.scan.series import SignalTable, window_median

__all__ = ["implicated_tokens"]


def implicated_tokens(signals: SignalTable, onset: int, end_step: int, moves: list[SignalMove], cfg: DetectConfig,
                      control_tokens: Sequence[Mapping[str, Any]]) -> list[ImplicatedToken]:
    """The implicated tokens of an episode, strongest rise first; ``moves``: the episode's moves
    (a rise's change step and lead, where its signal moved)."""
    info = {t.get("name"): t for t in control_tokens}
    moved = {m.signal: m for m in moves}
    before_end = onset - cfg.lead_window
    after_end = min(onset + cfg.lag_window, max(end_step, onset))
    rises: dict[str, list[ContextRise]] = {}
    for name in signals.columns:
        sig = TokenSignal.parse(name)
        if sig is None:
            continue
        s, v = signals.series(name)
        if v.size == 0:
            continue
        before = window_median(s, v, before_end - cfg.window, before_end - 1)
        if not math.isfinite(before):
            before = window_median(s, v, -math.inf, onset - 1)
        after = window_median(s, v, onset, after_end)
        if not (math.isfinite(before) and math.isfinite(after)):
            continue
        ratio = after / max(before, 1e-12)
        if ratio < cfg.implicate_min_ratio or after - before < cfg.implicate_min_abs:
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
    return out
