"""How a scan's numbers and tokens are written for people, the same in the terminal report
(`diagnose.scan.report`), the HTML reports (`diagnose.scan.html`), the figures, the dashboard and
the notebooks: numbers, probabilities and rises, control-token labels, the highlighted control
strings of rollout excerpts, and the one-line verdict.

    verdict_line(result)      # "COLLAPSE at step 34 (reward 0.61 -> 0.08, 87% turns ...)"
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from diagnose.chat import CONTROL_STRINGS
from diagnose.control_tokens import STRUCTURAL_TOKENS
from diagnose.scan.result import CollapseEpisode, ScanResult
from diagnose.scan.series import level, smoothed_peak

__all__ = [
    "run_info_text",
    "control_pattern",
    "fmt_num",
    "fmt_pct",
    "fmt_prob",
    "fmt_rise",
    "highlight_strings",
    "implicated_texts",
    "token_label",
    "verdict_line",
]

_TEXT_OF = {name: text for name, text, _ in STRUCTURAL_TOKENS}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt_num(v: Any, digits: int = 2) -> str:
    """A number for people: ``—`` for missing / non-finite, 2 decimals, compact when large or tiny."""
    if not _finite(v):
        return "—"
    a = abs(float(v))
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{v:,.0f}"
    if a < 10 ** -digits:
        return f"{v:.2g}"
    return f"{v:.{digits}f}"


def fmt_prob(p: Any) -> str:
    """A probability: 0.83, 0.012, 0.001, 2.0e-05."""
    if not _finite(p):
        return "—"
    p = float(p)
    if p >= 0.095:
        return f"{p:.2f}"
    if p >= 0.00095:
        return f"{p:.3f}"
    return f"{p:.1e}" if p > 0 else "0"


def fmt_rise(before: Any, after: Any) -> str:
    """How much a probability rose: ``×830``, or ``from 0, +0.66`` when it was 0 before (a
    token never sampled before the onset): a ratio to 0 has no meaning, the absolute change has."""
    if not (_finite(before) and _finite(after)):
        return "—"
    if before <= 0:
        return f"from 0, +{fmt_prob(after - before)}"
    ratio = after / before
    return f"×{ratio:.1f}" if ratio < 10 else f"×{ratio:,.0f}" if ratio < 1e6 else f"×{ratio:.1e}"


def fmt_pct(v: Any) -> str:
    return f"{float(v):.0%}" if _finite(v) else "—"


def token_label(name: str, text: str | None = None) -> str:
    """How a control token is shown: its text (``<|im_end|>``, ``{"``), escaped when it is
    whitespace (``\\n``), else its registry name."""
    text = text if text is not None else _TEXT_OF.get(name)
    if not text:
        return name
    if not text.strip():
        return text.encode("unicode_escape").decode("ascii")
    return text


def highlight_strings(extra: Iterable[str] = ()) -> list[str]:
    """The strings highlighted in rollout excerpts: the format's control strings plus ``extra``
    (texts of implicated tokens), longest first so that a regex prefers the longest match."""
    strings = {s for s in (*CONTROL_STRINGS, *extra) if s and s.strip() and len(s) >= 2}
    return sorted(strings, key=len, reverse=True)


def control_pattern(extra: Iterable[str] = ()) -> re.Pattern[str]:
    """Regex of the control strings to highlight (longest first)."""
    return re.compile("|".join(re.escape(s) for s in highlight_strings(extra)))


def implicated_texts(result: ScanResult) -> list[str]:
    """Texts of the result's implicated tokens (highlighted in its rollout excerpts too)."""
    return [t.text for e in result.episodes for t in e.implicated if t.text]


# ---------------------------------------------------------------------------------------------
# the verdict
# ---------------------------------------------------------------------------------------------


def _episode_summary(e: CollapseEpisode) -> str:
    parts = [f"{e.signal} {fmt_num(e.pre_level)} -> {fmt_num(e.trough_value)}"]
    if e.collapsed_share_at_trough is not None and _finite(e.collapsed_share_at_trough):
        parts.append(f"{e.collapsed_share_at_trough:.0%} turns collapsed at trough")
    if e.recovery_step is not None:
        parts.append(f"recovered at step {e.recovery_step}")
    return ", ".join(parts)


def verdict_line(result: ScanResult, capability_hint: str | None = None) -> str:
    """One line: what happened to the run, the first thing a user reads."""
    v = result.verdict
    if v == "collapse" and result.episodes:
        e = result.episodes[0]
        n = len(result.episodes)
        head = f"COLLAPSE at step {e.onset_step}" if n == 1 else f"COLLAPSE ({n} episodes), first at step {e.onset_step}"
        line = f"{head} ({_episode_summary(e)})"
        if result.pathologies:
            kinds = sorted({p.kind for p in result.pathologies})
            line += f"; also {', '.join(k.replace('_', ' ') for k in kinds)}"
        if capability_hint:
            line += f"; capability check: {capability_hint}"
        return line
    if v == "pathology":
        first = {}
        for p in result.pathologies:
            first.setdefault(p.kind, p.first_step)
        what = ", ".join(f"{k.replace('_', ' ')} from step {s}" for k, s in first.items())
        return f"PATHOLOGY, no collapse: {what}"
    if v == "insufficient_data":
        return (f"INSUFFICIENT DATA: no reward or accuracy with {result.config.min_steps} finite, varying values "
                f"({result.signals.height} step(s) read); no collapse detection")
    name = result.primary_signal or "reward"
    start, end = level(result.signals, name, "start"), level(result.signals, name, "end")
    peak = smoothed_peak(result.signals, name)
    return (f"HEALTHY: no collapse in {result.signals.height} steps "
            f"({name} {fmt_num(start)} -> {fmt_num(end)}, peak {fmt_num(peak)})")


def run_info_text(info: dict[str, Any]) -> str:
    """``model Qwen/Qwen2.5-1.5B-Instruct, lr 1e-06, seed 3`` (what the run's config says)."""
    return ", ".join(f"{k} {info[k]}" for k in ("model", "lr", "seed") if k in info)
