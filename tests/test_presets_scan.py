"""The trainer's experiment presets, scanned (slow: ~5 minutes each on one CPU core).

    bash scripts/test.sh -m slow -k presets

`collapse` must collapse and `diagnose scan` must say so within the RL phase; `stable`, the
same start with supervisory signals, must not be reported as collapsed. Seed 0, the preset's
own seed. The 3-seed figures are in docs/experiments.md (experiments/supervision_table.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from diagnose.scan.run import scan_run
from train_minimal.config import build_config
from train_minimal.presets import preset
from train_minimal.trainer import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def preset_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("presets")
    out = {}
    for name in ("collapse", "stable"):
        out[name] = train(build_config(preset(name)), root / name)
    return out


def test_collapse_preset_is_scanned_as_a_collapse(preset_runs):
    cfg = build_config(preset("collapse"))
    r = scan_run(preset_runs["collapse"], use_cache=False)
    assert r.verdict == "collapse", r.notes
    ep = r.episodes[0]
    assert ep.signal == "reward"
    assert cfg.sft.steps < ep.onset_step <= cfg.sft.steps + cfg.grpo.steps  # inside the RL phase
    assert ep.trough_value < 0.5 * ep.peak
    assert ep.collapsed_share_at_trough is not None and ep.collapsed_share_at_trough > 0.1


def test_stable_preset_is_not_scanned_as_a_collapse(preset_runs):
    r = scan_run(preset_runs["stable"], use_cache=False)
    assert r.verdict != "collapse", [e.to_dict()["onset_step"] for e in r.episodes]
