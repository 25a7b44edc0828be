"""`diagnose scan`: per-step signals, change detectors, collapse episodes and pathologies.

    from diagnose.scan import scan_source
    result = scan_source(src)            # src: diagnose.source.RunSource
    result.verdict                        # "collapse" | "healthy" | "pathology" | "insufficient_data"
    result.episodes[0].onset_step, result.episodes[0].implicated[0].token
    result.to_json()

See docs/scan.md.
"""

from diagnose.scan.detect import Change, DetectConfig, detect_changes, robust_zscores, rolling_baseline
from diagnose.scan.episodes import find_episodes, find_pathologies, primary_signal, scan_source
from diagnose.scan.result import (
    SCHEMA_VERSION,
    CollapseEpisode,
    ContextRise,
    ImplicatedToken,
    Pathology,
    RolloutExample,
    RunScanResult,
    ScanResult,
    SignalMove,
    result_from_json,
)
from diagnose.scan.signals import SIGNAL_SPECS, merge_signals, signal_direction, step_signals
from diagnose.scan.cache import load_cached_scan  # noqa: E402  (after the engine it builds on)
from diagnose.scan.run import scan_run  # noqa: E402

__all__ = [
    "SCHEMA_VERSION",
    "SIGNAL_SPECS",
    "Change",
    "CollapseEpisode",
    "ContextRise",
    "DetectConfig",
    "ImplicatedToken",
    "Pathology",
    "RolloutExample",
    "RunScanResult",
    "ScanResult",
    "SignalMove",
    "detect_changes",
    "find_episodes",
    "find_pathologies",
    "load_cached_scan",
    "merge_signals",
    "primary_signal",
    "result_from_json",
    "robust_zscores",
    "rolling_baseline",
    "scan_run",
    "scan_source",
    "signal_direction",
    "step_signals",
]
