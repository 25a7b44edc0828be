"""Change detectors (diagnose.scan.detect), per-step signals (diagnose.scan.signals) and the
absence of false collapse episodes on stable runs."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from diagnose.scan import DetectConfig, detect_changes, merge_signals, robust_zscores, scan_source, step_signals
from diagnose.scan.detect import METHODS, Change, cusum, page_hinkley, robust_sigma, rolling_baseline
from diagnose.scan.names import signal_direction, signal_kind
from diagnose.source import RunSource
from diagnose.synth import write_synthetic_run

from _scan_helpers import source

CFG = DetectConfig()


def noise(seed: int, n: int, sd: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, sd, n)


# ---------------------------------------------------------------------------------------------
# detectors on hand-made arrays
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction,shift", [("down", -6.0), ("up", 6.0)])
def test_step_change_found_by_every_method(direction, shift):
    x = noise(1, 60)
    x[35:] += shift
    changes = detect_changes(x, np.arange(60), CFG, direction=direction)
    for m in METHODS:
        found = [c for c in changes if c.method == m]
        assert found, m
        c = found[0]
        assert c.direction == direction and abs(c.step - 35) <= 2 and c.alarm_step >= c.step
        assert c.alarm_step <= 35 + 4
    assert all(c.direction == direction for c in changes)
    assert changes == sorted(changes, key=lambda c: (c.step, METHODS.index(c.method), c.alarm_step))


def test_ramp_is_detected_early_by_cusum():
    x = np.r_[noise(2, 30, 0.05), np.linspace(0.0, 3.0, 20) + noise(3, 20, 0.05)]
    up = [c for c in detect_changes(x, np.arange(50), CFG, direction="up") if c.method == "cusum"]
    assert up and 30 <= up[0].step <= 34


def test_pure_noise_rarely_alarms():
    """Gaussian noise: over 30 series of 100 steps, hardly any alarm (about 1 per 1000 steps)."""
    alarms = sum(len(detect_changes(noise(seed, 100), np.arange(100), CFG)) for seed in range(30))
    assert alarms <= 6
    quiet = sum(not detect_changes(noise(100 + seed, 100), np.arange(100), CFG) for seed in range(30))
    assert quiet >= 24


def test_constant_and_tiny_noise_series_do_not_alarm():
    assert detect_changes(np.full(50, 0.3), np.arange(50), CFG) == []
    assert detect_changes(0.6 + noise(4, 80, 1e-6), np.arange(80), CFG) == []


def test_one_outlier_is_a_zscore_spike_not_a_shift():
    x = noise(5, 60)
    x[40] = 12.0
    changes = detect_changes(x, np.arange(60), CFG)
    assert [c.method for c in changes] == ["zscore"] and changes[0].step == 40


def test_nan_and_inf_are_skipped():
    x = noise(6, 60)
    x[35:] -= 6.0
    clean = detect_changes(x, np.arange(60), CFG, direction="down")
    holes = x.copy()
    holes[[5, 20, 33, 50]] = np.nan
    holes[12] = np.inf
    changes = detect_changes(holes, np.arange(60), CFG, direction="down")
    assert {c.method for c in changes} == {c.method for c in clean}
    assert all(abs(c.step - 35) <= 2 for c in changes)
    assert all(np.isfinite(holes[c.step]) for c in changes)  # reported steps are real points


def test_sparse_and_unsorted_steps():
    steps = np.arange(0, 600, 10)  # e.g. tokens logged every 10 steps
    x = noise(7, 60)
    x[30:] += 8.0
    order = np.random.default_rng(0).permutation(60)
    changes = detect_changes(x[order], steps[order], CFG)
    assert changes and all(c.step % 10 == 0 for c in changes)
    assert abs(min(c.step for c in changes) - 300) <= 10  # within one logged point


@pytest.mark.parametrize("values", [[], [1.0], [np.nan], [1.0, 5.0], list(range(CFG.min_periods)),
                                    [np.nan] * 30, [1.0] + [np.nan] * 40])
def test_short_series_give_no_alarm(values):
    assert detect_changes(np.array(values, dtype=float), np.arange(len(values)), CFG) == []


def test_alarms_are_causal():
    """An alarm at step t is raised identically when the series ends at t."""
    x = noise(8, 80)
    x[50:] -= 5.0
    for c in detect_changes(x, np.arange(80), CFG):
        cut = detect_changes(x[: c.alarm_step + 1], np.arange(c.alarm_step + 1), CFG)
        assert any(d.method == c.method and d.step == c.step and d.alarm_step == c.alarm_step for d in cut)


def test_robust_zscores_align_with_input():
    x = np.r_[noise(9, 30, 0.1), [5.0], noise(10, 5, 0.1)]
    x[3] = np.nan
    z = robust_zscores(x, CFG)
    assert z.shape == x.shape and np.isnan(z[3]) and np.all(np.isnan(z[: CFG.min_periods]))
    assert z[30] > 20 and np.nanmax(np.abs(np.delete(z, 30))) < 5


def test_robust_sigma_resists_outliers_and_floors():
    x = noise(11, 40)
    s = robust_sigma(x, CFG)
    x2 = x.copy()
    x2[:4] = 100.0
    assert 0.7 < s < 1.3 and robust_sigma(x2, CFG) < 1.6
    assert robust_sigma(np.full(10, 2.0), CFG) == pytest.approx(0.02)  # min_sigma_rel * |median|
    med, sig = rolling_baseline(np.arange(30.0), CFG)
    assert np.isnan(med[CFG.min_periods - 1]) and med[CFG.min_periods] == np.median(np.arange(CFG.min_periods))


def test_direction_filter_and_validation():
    x = noise(12, 60)
    x[30:] += 6.0
    assert detect_changes(x, np.arange(60), CFG, direction="down") == []
    assert cusum(x, np.arange(60), CFG, "down") == [] and page_hinkley(x, np.arange(60), CFG, "down") == []
    with pytest.raises(ValueError):
        detect_changes(x, np.arange(60), CFG, direction="sideways")
    with pytest.raises(ValueError):
        detect_changes(x, np.arange(59), CFG)
    with pytest.raises(ValueError):
        detect_changes(x, np.arange(60), CFG, methods=("magic",))
    with pytest.raises(ValueError):
        DetectConfig(window=1)
    c = Change(3, "cusum", "up", float("nan"), 4)
    assert c.to_dict()["score"] is None


# ---------------------------------------------------------------------------------------------
# signals
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("scan") / "run"
    return write_synthetic_run(path, steps=36, collapse_at=22, seed=11), source(path)


def test_step_signals_match_trainer_metrics(run):
    _, src = run
    sig = step_signals(src)
    assert sig["step"].to_list() == list(range(36)) and sig.schema["step"] == pl.Int64
    assert all(t == pl.Float64 for c, t in sig.schema.items() if c != "step")
    m = src.metrics.collect()
    j = sig.join(m, on="step", suffix="_m")
    for name, tol in [("reward", 1e-9), ("accuracy", 1e-9), ("group_reward_std", 1e-9), ("turn_state/collapsed", 1e-9),
                      ("turn_state/healthy_call", 1e-9), ("entropy", 1e-5), ("mismatch/abs_logprob_diff", 1e-5),
                      ("completions/mean_length", 1e-9), ("probe/after_call_open/im_end", 1e-5),
                      ("format_error/open_tag_only", 1e-9)]:
        diff = (j[name] - j[name + "_m"]).abs().max()
        assert diff < tol, name
    # metric-only columns are passed through; strings dropped, booleans as floats
    assert {"kl", "clip_ratio", "grad_norm", "attribution/im_end/total", "skipped_update"} <= set(sig.columns)
    assert "phase" not in sig.columns
    # token-derived key contexts: p(im_end) after a generated '<tool_call>\n' rises at the collapse
    p = dict(zip(sig["step"].to_list(), sig["ctx/after_call_open/im_end"].to_list()))
    assert p[10] < 0.01 and p[30] > 0.5
    assert sig["ctx/after_call_open/n"].min() > 0 and sig["nonfinite_logprob"].sum() == 0
    assert 0 <= sig["low_prob_share"].min() and sig["low_prob_share"].max() < 0.05
    assert sig["completion_chars"].min() > 0 and sig["turns_per_episode"].min() >= 1


def test_step_signals_incremental_and_merge(run):
    _, src = run
    full = step_signals(src)
    part = step_signals(src, steps=[3, 4, 30])
    assert part["step"].to_list() == [3, 4, 30]
    cols = [c for c in part.columns if c in full.columns]
    want = full.filter(pl.col("step").is_in([3, 4, 30])).select(cols)
    diff = part.select(cols).select([(pl.col(c) - want[c]).abs().max() for c in cols if c != "step"]).row(0)
    assert max(d for d in diff if d is not None) < 1e-6
    merged = merge_signals(full.filter(pl.col("step") < 20), step_signals(src, steps=range(20, 36)))
    assert merged["step"].to_list() == list(range(36))
    assert (merged["reward"] - full["reward"]).abs().max() < 1e-12
    assert step_signals(src, steps=[999]).height == 0


def test_step_signals_from_partial_sources(run):
    _, src = run
    only_metrics = RunSource(src.path, "trl", src.metrics)
    sig = step_signals(only_metrics)
    assert sig.height == 36 and "reward" in sig.columns and "ctx/after_call_open/im_end" not in sig.columns
    # a derived column that is entirely null gives way to the metric of the same name
    ro = src.rollouts.with_columns(pl.lit(None, dtype=pl.Float64).alias("accuracy"))
    sig2 = step_signals(RunSource(src.path, "native", src.metrics, rollouts=ro))
    assert sig2["accuracy"].null_count() == 0
    empty = RunSource(src.path, "x", pl.LazyFrame(schema={"step": pl.Int64}))
    assert step_signals(empty).columns == ["step"]


def test_signal_directions():
    tokens = [{"name": "im_end", "role": "turn_end"}, {"name": "call_body_start", "role": "call_body_start"}]
    assert signal_direction("reward") == "down" and signal_direction("turn_state/collapsed") == "up"
    assert signal_direction("probe/after_call_open/im_end", tokens) == "up"
    assert signal_direction("probe/after_call_open/call_body_start", tokens) == "down"
    assert signal_direction("probe/after_call_open/gold") == "down" and signal_direction("some/metric") == "both"
    assert signal_kind("ctx/turn_start/im_end") == "probability" and signal_kind("ctx/turn_start/n") == "count"


# ---------------------------------------------------------------------------------------------
# stable runs: no false collapse
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
def test_stable_runs_give_no_episode(tmp_path, seed):
    write_synthetic_run(tmp_path / "r", steps=40, collapse_at=None, seed=100 + seed, probe=seed % 2 == 0)
    res = scan_source(source(tmp_path / "r"))
    assert res.episodes == []
    assert res.verdict == "healthy", [p.message for p in res.pathologies]
    assert res.to_json()["episodes"] == []


def test_too_little_data_is_insufficient(tmp_path):
    write_synthetic_run(tmp_path / "r", steps=5, collapse_at=None, probe=False)
    res = scan_source(source(tmp_path / "r"))
    assert res.verdict == "insufficient_data" and res.episodes == [] and res.notes
    assert not math.isnan(res.signals["reward"][0])
