"""`diagnose scan`: per-step signals, change detectors, collapse episodes and pathologies.

    from diagnose.scan import scan_source
    result = scan_source(src)            # src: diagnose.source.RunSource
    result.verdict                        # "collapse" | "healthy" | "pathology" | "insufficient_data"
    result.episodes[0].onset_step, result.episodes[0].implicated[0].token
    result.to_json()

The modules, in the order a scan runs through them:

- signals: `names` (what each signal is called and means), `signals` (the per-step table, from
  rollouts, probe and metrics; `frames`: its polars pieces), `token_signals` (the token table,
  key contexts included), `series` (a signal as numpy arrays);
- detection: `detect` (change detectors), `drops` (sustained drops of reward / accuracy),
  `moves`, `implicated` and `examples` (what moved, which control tokens, which rollouts),
  `episodes` (all of it per drop), `pathologies`, `verdict` (`scan_source`);
- results: `result` (the records and their JSON), `run` (`scan_run`: load, cache, scan) and
  `cache`, `compare` (two runs);
- output: `formatting` (numbers, labels, the verdict line), `report` (terminal), `html`; the
  figures are `diagnose.figures`.

See docs/scan.md.
"""

from diagnose.scan.detect import Change, DetectConfig, detect_changes, robust_zscores, rolling_baseline
from diagnose.scan.episodes import find_episodes, primary_signal
from diagnose.scan.names import SIGNAL_SPECS, signal_direction
from diagnose.scan.pathologies import find_pathologies
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
from diagnose.scan.signals import merge_signals, step_signals
from diagnose.scan.verdict import scan_source
from diagnose.scan.cache import load_cached_scan  # noqa: E402  (after the engine it builds on)
from diagnose.scan.run import scan_run  # noqa: E402

__all__ = [
    # signals
    "SIGNAL_SPECS", "signal_direction", "step_signals", "merge_signals",
    # detection
    "DetectConfig", "Change", "detect_changes", "robust_zscores", "rolling_baseline",
    "find_episodes", "primary_signal", "find_pathologies", "scan_source", "scan_run", "load_cached_scan",
    # results
    "SCHEMA_VERSION", "ScanResult", "RunScanResult", "CollapseEpisode", "SignalMove", "ContextRise",
    "ImplicatedToken", "RolloutExample", "Pathology", "result_from_json",
]
