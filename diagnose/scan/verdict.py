"""``scan_source``: one run's scan, stage by stage, and the verdict it gives.

    signals (diagnose.scan.signals) -> collapse episodes (diagnose.scan.episodes)
        -> pathologies (diagnose.scan.pathologies) -> verdict -> ScanResult

Verdict: ``collapse`` if any episode; else ``pathology`` if any pathology; else
``insufficient_data`` if neither reward nor accuracy has ``min_steps`` finite, varying values;
else ``healthy``. `diagnose.scan.run.scan_run` adds loading and the cache around it.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from diagnose.scan.detect import DetectConfig
from diagnose.scan.episodes import PriorScan, find_episodes, primary_signal
from diagnose.scan.names import generic_signals
from diagnose.scan.pathologies import find_pathologies
from diagnose.scan.result import CollapseEpisode, Pathology, ScanResult, issues_summary
from diagnose.scan.signals import step_signals
from diagnose.source import RunSource

__all__ = ["scan_source", "verdict"]


def scan_source(src: RunSource, cfg: DetectConfig | None = None, signals: pl.DataFrame | None = None,
                prior: PriorScan | None = None) -> ScanResult:
    """Signals, collapse episodes, pathologies and a verdict for one run. ``signals``:
    precomputed :func:`step_signals` output (e.g. from a cache); ``prior``: an earlier scan
    whose unchanged parts are reused (`PriorScan`)."""
    cfg = cfg or DetectConfig()
    notes: list[str] = list(getattr(src, "notes", []) or [])
    issues = list(getattr(src, "issues", []) or [])
    if issues:
        notes.append(f"{issues_summary(len(issues))}; first: {issues[0]}")
    if signals is None:
        signals = step_signals(src, low_prob=cfg.low_prob)
    primary = primary_signal(signals, cfg)
    notes += _signal_notes(signals, primary, cfg)
    episodes = find_episodes(signals, src, cfg, notes, prior)
    pathologies = find_pathologies(signals, cfg)
    path = getattr(src, "path", None)
    return ScanResult(signals=signals, episodes=episodes, pathologies=pathologies,
                      verdict=verdict(episodes, pathologies, primary), notes=notes, primary_signal=primary,
                      source_path=str(path) if isinstance(path, (str, Path)) else None,
                      source_format=getattr(src, "format", None), config=cfg,
                      sources=list(getattr(src, "sources", []) or []), run_info=dict(getattr(src, "info", {}) or {}))


def verdict(episodes: list[CollapseEpisode], pathologies: list[Pathology], primary: str | None) -> str:
    """The verdict of a scan (module docstring)."""
    if episodes:
        return "collapse"
    if pathologies:
        return "pathology"
    return "insufficient_data" if primary is None else "healthy"


def _signal_notes(signals: pl.DataFrame, primary: str | None, cfg: DetectConfig) -> list[str]:
    """What the signals leave out: metrics of no known meaning, a missing primary signal."""
    notes = []
    generic = generic_signals(signals.columns)
    if generic:
        shown = ", ".join(generic[:12]) + (f" and {len(generic) - 12} more" if len(generic) > 12 else "")
        notes.append(f"{len(generic)} metric(s) of no known meaning reach only the generic change detection "
                     f"(the episodes' moves), no dedicated detector: {shown}")
    if primary is None:
        notes.append(f"neither reward nor accuracy has {cfg.min_steps} finite, varying values: no collapse detection")
    elif primary == "accuracy":
        notes.append("no usable reward signal: collapse detection runs on accuracy")
    return notes
