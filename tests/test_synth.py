"""Synthetic native runs (diagnose.synth.native): format, ground truth, realism of the collapse."""

from __future__ import annotations

import re
import time

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from diagnose.chat import IM_END, TOOL_CALL_OPEN
from diagnose.rundir import RunReader, ctrl_column
from diagnose.synth import write_synthetic_run
from diagnose.synth.native import QWEN_LIKE_CONTROL_TOKENS
from diagnose.turns import classify_turn

NAMES = [t["name"] for t in QWEN_LIKE_CONTROL_TOKENS]
IDS = {t["name"]: t["token_id"] for t in QWEN_LIKE_CONTROL_TOKENS}
TOOL_BLOCK = re.compile(r"\n<\|im_start\|>user\n<tool_response>\n.*?</tool_response><\|im_end\|>\n<\|im_start\|>assistant\n",
                        re.DOTALL)


@pytest.fixture(scope="module")
def collapse_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "run"
    truth = write_synthetic_run(path, steps=40, collapse_at=25, seed=3)
    return truth, RunReader(path)


def test_ground_truth_and_tables(collapse_run):
    truth, r = collapse_run
    assert truth.onset_step == 25 and truth.implicated_token == "im_end" and truth.context == "after_call_open"
    assert truth.lead_steps == 3 and truth.spike_rise_step == 22
    assert truth.collapsed_turn_state == "collapsed"
    assert r.issues == []
    assert r.ctrl_names == NAMES
    for kind in ("rollouts", "tokens", "probe", "metrics"):
        assert r.steps(kind) == list(range(40))
    tok = r.tokens().collect()
    assert truth.n_token_rows == tok.height
    assert all(ctrl_column(n) in tok.columns for n in NAMES)
    lp = tok.select(pl.col("logprob")).to_series()
    assert lp.is_finite().all() and (lp <= 0).all()
    for n in NAMES:
        assert (tok.get_column(ctrl_column(n)) <= 0).all()
    probe = r.probe().collect()
    assert set(probe.get_column("context").unique()) == {"", "turn_start", "after_call_open", "after_call_body",
                                                            "after_call_close"}


def test_turn_states_come_from_classify_turn(collapse_run):
    _, r = collapse_run
    ro = r.rollouts().select("completion", "turn_states", "error_types", "n_turns").collect()
    seen = set()
    for completion, states, errors, n_turns in ro.iter_rows():
        turns = TOOL_BLOCK.split(completion[:-1])  # the transcript ends with "\n" after the last turn
        cls = [classify_turn(t) for t in turns]
        assert [c.state.value for c in cls] == states
        assert [e.value for c in cls for e in c.errors] == errors
        assert n_turns == len(states)
        seen.update(states)
    assert seen == {"healthy_call", "healthy_response", "polluted", "collapsed"}
    # the collapsed turn is a bare <tool_call> ended by <|im_end|>
    collapsed = ro.filter(pl.col("turn_states").list.contains("collapsed")).get_column("completion")
    assert collapsed.len() > 0 and collapsed.str.contains(re.escape(TOOL_CALL_OPEN + "\n" + IM_END)).all()


def test_collapse_dynamics(collapse_run):
    _, r = collapse_run
    m = r.metrics()
    reward = dict(zip(m["step"].to_list(), m["reward"].to_list()))
    pre = np.mean([reward[s] for s in range(5, 21)])
    assert 0.5 < pre < 0.8
    peak = max(reward[s] for s in range(25))
    assert all(reward[s] < 0.3 * peak for s in range(26, 40))
    assert reward[25] < 0.5 * pre
    collapsed = dict(zip(m["step"].to_list(), m["turn_state/collapsed"].to_list()))
    assert all(collapsed[s] == 0 for s in range(23)) and all(collapsed[s] > 0.4 for s in range(26, 40))
    # the probe's p(im_end | after_call_open) rises from ~1e-3 three steps before the onset
    p = dict(zip(m["step"].to_list(), m["probe/after_call_open/im_end"].to_list()))
    base = np.median([p[s] for s in range(5, 20)])
    assert 5e-4 < base < 2e-3
    assert p[22] > 3 * base and p[23] > p[22] and p[24] > p[23] and p[25] > 0.3
    # group reward std and entropy fall during the lead, while the reward holds
    g = dict(zip(m["step"].to_list(), m["group_reward_std"].to_list()))
    assert np.mean([g[s] for s in (22, 23, 24)]) < np.mean([g[s] for s in range(5, 20)])
    e = dict(zip(m["step"].to_list(), m["entropy"].to_list()))
    assert e[24] < e[21] < e[10] * 1.1
    # shorter completions after the collapse
    L = dict(zip(m["step"].to_list(), m["completions/mean_length"].to_list()))
    assert L[30] < 0.6 * L[10]


def test_tokens_encode_the_spike(collapse_run):
    _, r = collapse_run
    tok = r.tokens(steps=[10, 30]).collect().sort("step", "sample_id", "position")
    prev2 = pl.col("token_id").shift(2).over("step", "sample_id")
    prev1 = pl.col("token_id").shift(1).over("step", "sample_id")
    ctx = tok.filter(pl.col("is_generated") & (prev2 == IDS["tool_call_open"]) & (prev1 == IDS["call_open_newline"]))
    by_step = ctx.group_by("step").agg(pl.col(ctrl_column("im_end")).exp().mean().alias("p"),
                                       (pl.col("token_id") == IDS["im_end"]).mean().alias("sampled")).sort("step")
    p10, p30 = by_step["p"].to_list()
    s10, s30 = by_step["sampled"].to_list()
    assert p10 < 0.01 and p30 > 0.5
    assert s10 == 0 and s30 > 0.5


def test_stable_run_and_determinism(tmp_path):
    a = write_synthetic_run(tmp_path / "a", steps=20, collapse_at=None, seed=7, probe=False)
    b = write_synthetic_run(tmp_path / "b", steps=20, collapse_at=None, seed=7, probe=False)
    assert a.onset_step is None and a.implicated_token is None and a.recovery_step is None
    ma, mb = RunReader(tmp_path / "a").metrics(), RunReader(tmp_path / "b").metrics()
    assert_frame_equal(ma, mb)
    assert (ma["turn_state/collapsed"] == 0).all()
    assert not RunReader(tmp_path / "a").steps("probe")


def test_options(tmp_path):
    t = write_synthetic_run(tmp_path / "a", steps=12, collapse_at=8, tokens=False, probe=False, rollouts=True)
    r = RunReader(tmp_path / "a")
    assert r.steps("tokens") == [] and r.steps("rollouts") == list(range(12)) and t.n_token_rows == 0
    write_synthetic_run(tmp_path / "b", steps=12, collapse_at=None, nan_logprobs_at=[5], probe=False)
    tok = RunReader(tmp_path / "b").tokens().collect()
    nan_steps = tok.filter(pl.col("logprob").is_nan()).get_column("step").unique().to_list()
    assert nan_steps == [5]
    write_synthetic_run(tmp_path / "c", steps=12, collapse_at=6, probe_every=4, tokens=False)
    assert RunReader(tmp_path / "c").steps("probe") == [0, 4, 8]


@pytest.mark.parametrize("kwargs", [
    {"spike_token": "nope"}, {"spike_context": "nowhere"}, {"collapse_at": 99}, {"recover_at": 5},
    {"tokens_per_sample": 10}, {"steps": 0},
])
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_synthetic_run(tmp_path / "x", **{"steps": 20, **kwargs})


def test_turn_start_spike_gives_empty_turns(tmp_path):
    t = write_synthetic_run(tmp_path / "r", steps=14, collapse_at=8, spike_context="turn_start", probe=False,
                            tokens=False)
    assert t.collapsed_turn_state == "collapsed"
    ro = RunReader(tmp_path / "r").rollouts(steps=[12]).collect()
    errs = ro.filter(pl.col("turn_states").list.contains("collapsed")).get_column("error_types")
    assert errs.len() > 0 and all("empty_turn" in e for e in errs.to_list())


@pytest.mark.slow
def test_large_run_write_rate(tmp_path):
    t0 = time.perf_counter()
    t = write_synthetic_run(tmp_path / "big", steps=30, collapse_at=None, samples_per_step=1563, probe=False)
    rate = t.n_token_rows / (time.perf_counter() - t0)
    assert t.n_token_rows > 2_500_000
    assert rate > 1.0e6, f"{rate / 1e6:.2f}M rows/s"
