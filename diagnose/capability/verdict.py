"""From per-measure results to one summary row per checkpoint: format score, capability score,
format gap, verdict. Pure functions on numbers, so the rule is testable on hand-made inputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diagnose.capability.config import (
    CONTENT_MEASURES,
    HEALTHY,
    INCONCLUSIVE,
    INTACT_FORMAT_BROKEN,
    LOST,
    ProbeConfig,
)


def likelihood_skill(accuracy: float | None, chance: float | None) -> float | None:
    """Chance-corrected likelihood accuracy: 0 at chance, 1 when the gold call always wins."""
    if accuracy is None or chance is None or chance >= 1:
        return None
    return max(0.0, (accuracy - chance) / (1.0 - chance))


def verdict(format_score: float | None, capability_score: float | None, *, skill: float | None = None,
            healthy_share: float | None = None, cfg: ProbeConfig | None = None) -> str:
    """The verdict rule of :class:`ProbeConfig` (documented there and in docs/probe.md).

    ``format_score``: native accuracy; ``capability_score``: best accuracy with the format out of
    the way; ``skill``: chance-corrected likelihood accuracy; ``healthy_share``: share of native
    turns in a healthy state."""
    cfg = cfg or ProbeConfig()
    if capability_score is None and skill is None:
        return INCONCLUSIVE
    if capability_score is not None and capability_score >= cfg.capable_min:
        if format_score is None:  # native not measured: the format cannot be judged
            return INCONCLUSIVE
        gap = capability_score - format_score
        if gap >= max(cfg.gap_abs_min, cfg.gap_rel_min * capability_score):
            return INTACT_FORMAT_BROKEN
        return HEALTHY
    if (skill is not None and skill >= cfg.likelihood_skill_min
            and healthy_share is not None and healthy_share < cfg.format_ok_min):
        return INTACT_FORMAT_BROKEN
    return LOST


def summarize(checkpoint: str, step: int | None, rows: list[Mapping[str, Any]], *, chance: float | None,
              cfg: ProbeConfig) -> dict[str, Any]:
    """The summary row of one checkpoint from its result rows (``RESULT_SCHEMA`` dicts)."""
    by = {r["measure"]: r for r in rows if r.get("accuracy") is not None}
    native = by.get("native")
    fmt = native["accuracy"] if native else None
    scores = [by[m]["accuracy"] for m in ("native", *CONTENT_MEASURES) if m in by]
    cap = max(scores) if scores else None
    lik = by.get("likelihood")
    skill = likelihood_skill(lik["accuracy"] if lik else None, chance)
    healthy = None
    if native and native.get("healthy_call") is not None:
        healthy = (native.get("healthy_call") or 0.0) + (native.get("healthy_response") or 0.0)
    gap = cap - fmt if cap is not None and fmt is not None else None
    return {
        "checkpoint": checkpoint,
        "step": step,
        "format_score": fmt,
        "capability_score": cap,
        "format_gap": gap,
        "verdict": verdict(fmt, cap, skill=skill, healthy_share=healthy, cfg=cfg),
    }
