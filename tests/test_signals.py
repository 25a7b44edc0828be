"""The signal layer: signal names (diagnose.scan.names), the on-policy filter
(diagnose.source.on_policy), the token table's signals on a hand-built table
(diagnose.scan.token_signals), the bookkeeping flag, and series in (steps, values) order
(diagnose.scan.series)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from diagnose.scan.detect import DetectConfig
from diagnose.scan.moves import signal_moves
from diagnose.scan.names import (
    SIGNAL_SPECS,
    TokenSignal,
    generic_signals,
    is_bookkeeping,
    is_context_count,
    rollout_twin,
    signal_direction,
    signal_spec,
    signal_token,
    token_signal_names,
)
from diagnose.scan.series import SignalTable, finite_series
from diagnose.scan.signals import rollout_signals
from diagnose.scan.token_signals import token_signals
from diagnose.source import on_policy

# ---------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,family,context,token", [
    ("probe/after_call_open/im_end", "probe", "after_call_open", "im_end"),
    ("ctx/turn_start/tool_call_open", "ctx", "turn_start", "tool_call_open"),
    ("ctrl/im_end/p", "ctrl", "all", "im_end"),
])
def test_token_signal_names_round_trip(name, family, context, token):
    sig = TokenSignal.parse(name)
    assert (sig.family, sig.context, sig.token) == (family, context, token)
    assert sig.name == name
    assert TokenSignal(family, context, token).name == name
    assert signal_token(name) == token


@pytest.mark.parametrize("name", ["ctx/after_call_open/n", "probe/turn_start/gold", "probe/mean_gold_logprob",
                                  "ctrl/im_end/sampled", "attribution/im_end/total", "reward", "a/b/c/d"])
def test_names_that_are_no_token_probability(name):
    assert TokenSignal.parse(name) is None


def test_token_signal_names_labels_and_twins():
    assert token_signal_names("im_end", "after_call_open") == ["probe/after_call_open/im_end",
                                                                "ctx/after_call_open/im_end"]
    assert token_signal_names("im_end", "all") == ["ctrl/im_end/p"]
    assert TokenSignal.parse("probe/after_call_open/im_end").label() == "probe: p(<|im_end|> | after_call_open)"
    assert TokenSignal.parse("ctx/after_call_open/im_end").label("END") == "rollouts: p(END | after_call_open)"
    assert TokenSignal.parse("ctrl/im_end/p").label() == "rollouts: p(<|im_end|>), all generated positions"
    assert TokenSignal.parse("ctx/turn_start/x").source == "tokens" and TokenSignal.parse("probe/a/x").source == "probe"
    assert rollout_twin("probe/after_call_open/im_end") == "ctx/after_call_open/im_end"
    assert rollout_twin("ctx/after_call_open/im_end") is None and rollout_twin("probe/mean_gold_logprob") is None
    assert signal_token("attribution/im_end/self") == "im_end" and signal_token("attribution/im_end/x") is None
    assert is_context_count("ctx/turn_start/n") and not is_context_count("ctx/turn_start/im_end")
    assert not is_context_count("probe/turn_start/n")


def test_direction_of_a_context_probability_follows_the_token_role():
    tokens = [{"name": "im_end", "role": "turn_end"}, {"name": "body", "role": "call_body_start"}]
    assert signal_direction("ctx/after_call_open/im_end", tokens) == "up"
    assert signal_direction("ctx/after_call_open/body", tokens) == "down"  # the context's expected token
    assert signal_direction("probe/after_call_close/im_end", tokens) == "down"
    assert signal_direction("ctrl/body/p", tokens) == "up"  # no key context: the family's direction
    assert signal_direction("ctx/after_call_open/body") == "up"  # no roles known


def test_bookkeeping_flag():
    for name in ("lr", "learning_rate", "time/step", "timing_s/gen", "perf/mfu", "step_time", "gen_time",
                 "n_rollouts", "ctx/turn_start/n", "skipped_update", "sft_loss", "training/global_step"):
        assert is_bookkeeping(name), name
    for name in ("reward", "kl", "entropy", "loss", "num_tokens", "ctx/turn_start/im_end", "eval/accuracy",
                 "training/rollout_probs_diff_mean"):
        assert not is_bookkeeping(name), name
    # any other metric falls to the catch-all: generic (listed in the scan's notes), analysed for moves
    assert signal_spec("my_metric") is SIGNAL_SPECS[-1] and SIGNAL_SPECS[-1].generic
    assert not SIGNAL_SPECS[-1].bookkeeping
    assert generic_signals(["step", "reward", "my_metric", "skipped_update", "lr"]) == ["my_metric", "skipped_update"]


def test_bookkeeping_signals_are_never_moves():
    """Two signals with the same jump before the onset: the one of a training family moves, the
    bookkeeping one (a learning-rate schedule) is not searched."""
    rng = np.random.default_rng(0)
    steps = np.arange(40)
    jump = np.r_[np.full(27, 0.01), np.full(13, 0.5)] + rng.normal(0, 0.001, 40)
    table = SignalTable(pl.DataFrame({"step": steps, "reward": np.r_[np.full(30, 0.8), np.full(10, 0.1)],
                                      "kl": jump, "lr": jump}))
    moved = [m.signal for m in signal_moves(table, "reward", 30, 39, DetectConfig(), [])]
    assert moved == ["kl"]


# ---------------------------------------------------------------------------------------------
# on-policy rollouts
# ---------------------------------------------------------------------------------------------


def test_rollout_signals_leave_out_hinted_and_off_policy_rows():
    rollouts = pl.LazyFrame({
        "step": [0, 0, 0, 0, 1], "sample_id": [0, 1, 2, 3, 0], "reward": [1.0, 0.0, 0.5, 0.0, 0.2],
        "is_hint": [False, True, None, False, False], "is_off_policy": [False, False, False, True, None],
    })
    sig = rollout_signals(rollouts).sort("step")
    assert sig["n_rollouts"].to_list() == [2.0, 1.0]  # a null flag counts as unset
    assert sig["reward"].to_list() == [0.75, 0.2]
    flags = rollouts.collect()
    assert flags.filter(on_policy(flags.columns))["sample_id"].to_list() == [0, 2, 0]
    assert flags.drop("is_hint", "is_off_policy").filter(on_policy(["step", "reward"])).height == 5


# ---------------------------------------------------------------------------------------------
# token signals on a hand-built table
# ---------------------------------------------------------------------------------------------

OPEN, NEWLINE, BODY, CLOSE, END, WORD = 10, 11, 12, 13, 14, 20
CONTROL_TOKENS = [
    {"name": "tool_call_open", "token_id": OPEN, "role": "call_open"},
    {"name": "call_open_newline", "token_id": NEWLINE, "role": "call_newline"},
    {"name": "body", "token_id": BODY, "role": "call_body_start", "lp_coverage": "sampled"},
    {"name": "tool_call_close", "token_id": CLOSE, "role": "call_close"},
    {"name": "im_end", "token_id": END, "role": "turn_end"},
]


def _tokens() -> pl.DataFrame:
    """Step 3: sample 0 a healthy call (<tool_call> \\n {" word </tool_call> <|im_end|>), sample 1
    a collapsed one (<tool_call> \\n <|im_end|>) followed by a tool-output row; step 4: one turn
    without a call. ``lp_ctrl_im_end``: p(<|im_end|>) at each row; ``lp_ctrl_body``: known only
    where the body token was sampled."""
    rows = [  # step, sample, position, token, p(im_end), generated, entropy, logprob
        (3, 0, 0, OPEN, 0.01, True, 1.0, math.log(0.5)),
        (3, 0, 1, NEWLINE, 0.02, True, 2.0, math.log(0.9)),
        (3, 0, 2, BODY, 0.05, True, float("nan"), math.log(0.001)),
        (3, 0, 3, WORD, 0.03, True, 1.0, float("nan")),
        (3, 0, 4, CLOSE, 0.10, True, 1.0, math.log(0.8)),
        (3, 0, 5, END, 0.90, True, 1.0, math.log(0.9)),
        (3, 1, 0, OPEN, 0.01, True, 1.0, math.log(0.5)),
        (3, 1, 1, NEWLINE, 0.02, True, 1.0, math.log(0.9)),
        (3, 1, 2, END, 0.80, True, 1.0, math.log(0.005)),
        (3, 1, 3, END, 0.50, False, 9.0, math.log(0.5)),
        (4, 0, 0, WORD, 0.20, True, 1.0, math.log(0.5)),
        (4, 0, 1, END, 0.60, True, 1.0, math.log(0.6)),
    ]
    df = pl.DataFrame(rows, orient="row", schema=["step", "sample_id", "position", "token_id", "_p_end",
                                                  "is_generated", "entropy", "logprob"])
    return df.with_columns(
        pl.lit(0).alias("turn"),
        pl.col("_p_end").log().alias("lp_ctrl_im_end"),
        pl.when(pl.col("token_id") == BODY).then(math.log(0.95)).alias("lp_ctrl_body"),
    ).drop("_p_end")


def test_token_signals_on_a_hand_built_table():
    sig = token_signals(_tokens().lazy(), CONTROL_TOKENS, low_prob=0.01)
    s3, s4 = (sig.filter(pl.col("step") == s).row(0, named=True) for s in (3, 4))
    # the tool-output row is not generated: 9 generated tokens over 2 samples at step 3
    assert s3["n_tokens"] == 9 and s3["completions/mean_length"] == 4.5
    assert s3["ctrl/im_end/p"] == pytest.approx((0.01 + 0.02 + 0.05 + 0.03 + 0.10 + 0.90 + 0.01 + 0.02 + 0.80) / 9)
    assert s3["ctrl/im_end/sampled"] == pytest.approx(2 / 9)
    assert s3["entropy"] == pytest.approx(9 / 8)  # the NaN entropy is left out
    assert s3["nonfinite_logprob"] == 1 and s3["nonfinite_logprob_share"] == pytest.approx(1 / 9)
    assert s3["low_prob_share"] == pytest.approx(2 / 8)  # p 0.001 and 0.005 of 8 finite log-probs
    # key contexts: after "<tool_call>\n" (both samples' position 2), after </tool_call>, turn starts
    assert s3["ctx/after_call_open/n"] == 2 and s3["ctx/after_call_open/im_end"] == pytest.approx((0.05 + 0.80) / 2)
    assert s3["ctx/after_call_close/n"] == 1 and s3["ctx/after_call_close/im_end"] == pytest.approx(0.90)
    assert s3["ctx/turn_start/n"] == 2 and s3["ctx/turn_start/im_end"] == pytest.approx(0.01)
    # a token whose log-prob is known only where it was sampled: its sampling rate, not ~0.95
    assert s3["ctrl/body/p"] == pytest.approx(1 / 9) and s3["ctx/after_call_open/body"] == pytest.approx(1 / 2)
    # step 4 has no call: no position after one, its probabilities unknown
    assert s4["ctx/after_call_open/n"] == 0 and s4["ctx/after_call_open/im_end"] is None
    assert s4["n_tokens"] == 2 and s4["ctrl/im_end/p"] == pytest.approx(0.4)


def test_a_row_at_two_key_contexts_counts_at_one():
    """A turn that starts right after </tool_call> (a turn column that splits there): its first
    row is at after_call_close, not also at turn_start (and no row is counted twice)."""
    ids = [OPEN, NEWLINE, BODY, CLOSE, END]
    tokens = pl.LazyFrame({"step": [5] * 5, "sample_id": [0] * 5, "turn": [0, 0, 0, 0, 1], "position": range(5),
                           "token_id": ids, "lp_ctrl_im_end": [math.log(0.1)] * 4 + [math.log(0.7)]})
    row = token_signals(tokens, CONTROL_TOKENS).row(0, named=True)
    assert (row["ctx/turn_start/n"], row["ctx/after_call_open/n"], row["ctx/after_call_close/n"]) == (1, 1, 1)
    assert row["ctx/after_call_close/im_end"] == pytest.approx(0.7) and row["ctx/turn_start/im_end"] == pytest.approx(0.1)


def test_token_signals_without_turns_or_control_tokens():
    bare = token_signals(_tokens().drop("turn").lazy(), [])
    assert "ctx/turn_start/n" not in bare.columns and "ctx/after_call_open/n" not in bare.columns
    assert bare.filter(pl.col("step") == 3)["n_tokens"].item() == 9
    # without the roles no call is found; the log-prob column still gives p overall
    assert bare.filter(pl.col("step") == 3)["ctrl/im_end/p"].item() == pytest.approx(1.94 / 9)


# ---------------------------------------------------------------------------------------------
# series
# ---------------------------------------------------------------------------------------------


def test_series_are_steps_then_finite_values_in_step_order():
    df = pl.DataFrame({"step": [5, 1, 3, 2, 4], "x": [5.0, 1.0, float("nan"), None, float("inf")]})
    steps, values = finite_series(df, "x")
    assert steps.tolist() == [1, 5] and values.tolist() == [1.0, 5.0]
    table = SignalTable(df)
    assert [a.tolist() for a in table.series("x")] == [[1, 5], [1.0, 5.0]]
    assert all(a.size == 0 for a in finite_series(df, "missing")) and all(a.size == 0 for a in table.series("step"))
