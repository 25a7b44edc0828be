"""Adapters: auto-detection, each foreign layout on generated runs (steps, groups, rewards,
turn-state rates around an injected collapse), and bad input of every kind for every format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import diagnose.adapters._common.turns as adapter_turns
from diagnose.adapters import (
    FORMATS,
    TurnClassifier,
    UnknownRunLayout,
    detect_format,
    load_run,
)
from diagnose.source import RunSource, SourceIssue
from diagnose.synth.foreign import (
    ForeignRun,
    write_conversation_run,
    write_open_instruct_run,
    write_trl_run,
    write_verl_run,
)
from diagnose.transcripts import split_turns

CONTRACT = ("step", "sample_id", "group_id", "prompt", "completion", "reward", "turn_states", "error_types")
STEPS = 8
COLLAPSE = 5


def issues_text(src: RunSource) -> str:
    return "\n".join(str(i) for i in src.issues)


def check_contract(src: RunSource) -> pl.DataFrame:
    ro = src.rollouts.collect()
    for c in CONTRACT:
        assert c in ro.columns, c
    assert ro.schema["step"] == pl.Int64 and ro.schema["sample_id"] == pl.Int64
    assert ro.schema["group_id"] == pl.Int64 and ro.schema["reward"] == pl.Float64
    assert ro.schema["turn_states"] == pl.List(pl.String) and ro.schema["error_types"] == pl.List(pl.String)
    m = src.metrics.collect()
    assert m.columns[0] == "step" and m.schema["step"] == pl.Int64
    assert all(isinstance(i, SourceIssue) for i in src.issues)
    return ro


def check_truth(src: RunSource, run: ForeignRun, *, exact_reward: bool = True) -> pl.DataFrame:
    """Steps, sample/group ids, rewards and turn states against what the writer wrote."""
    ro = check_contract(src)
    assert sorted(ro.get_column("step").unique().to_list()) == run.steps
    per_step = ro.group_by("step").len()
    assert per_step.get_column("len").to_list() == [run.samples_per_step] * len(run.steps)
    # sample ids 0..n-1 per step; each prompt's group of group_size samples is one group
    for step in run.steps:
        part = ro.filter(pl.col("step") == step).sort("sample_id")
        assert part.get_column("sample_id").to_list() == list(range(run.samples_per_step))
        assert part.get_column("group_id").to_list() == [i // run.group_size for i in range(run.samples_per_step)]
    # rewards
    means = dict(ro.group_by("step").agg(pl.col("reward").mean()).iter_rows())
    for step in run.steps:
        assert means[step] == pytest.approx(run.reward[step]) if exact_reward else True
    # turn states: counts equal what was written, collapse only from collapse_at on
    states = dict(
        ro.select("step", pl.col("turn_states")).explode("turn_states")
        .group_by("step").agg(pl.col("turn_states").value_counts()).iter_rows()
    )
    for step in run.steps:
        got = {d["turn_states"]: d["count"] for d in states[step]}
        assert got == dict(run.turn_states[step]), step
    m = src.metrics.collect()
    rate = dict(m.select("step", "turn_state/collapsed").iter_rows())
    for step in run.steps:
        assert rate[step] == pytest.approx(run.collapsed_share(step))
        if run.collapse_at is None or step < run.collapse_at:
            assert rate[step] == 0.0
    if run.collapse_at is not None:
        after = [rate[s] for s in run.steps if s >= run.collapse_at]
        assert min(after) > 0.3
    return ro


def cut_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path, n: int = 4096, seed: int = 0) -> None:
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())


# ---- turn classification (turn splitting: tests/test_transcripts.py) ----------------------------------------------


def test_classifier_classifies_each_unique_turn_once(tmp_path, monkeypatch):
    calls = []
    real = adapter_turns.classify_turn

    def counting(text, tools=None, syntax=None):
        # memoised per (turn text, tool names): verl turns are checked against their prompt's tools
        calls.append((text, None if tools is None else tuple(sorted(t["name"] for t in tools))))
        return real(text, tools, syntax)

    monkeypatch.setattr(adapter_turns, "classify_turn", counting)
    run = write_verl_run(tmp_path / "v", STEPS, collapse_at=2, seed=3)
    src = load_run(run.path)
    ro = src.rollouts.collect()
    n_turns = int(ro.get_column("n_turns").sum())
    assert len(calls) == len(set(calls)) < n_turns
    c = TurnClassifier()
    assert c.completion("<tool_call>") == (["collapsed"], ["open_tag_only"])
    assert c.completion("<tool_call>") is c.completion("<tool_call>")


# ---- detection and errors -----------------------------------------------------------


def test_detect_each_format(tmp_path):
    runs = {
        "trl": write_trl_run(tmp_path / "trl", 3),
        "verl": write_verl_run(tmp_path / "verl", 3),
        "open_instruct": write_open_instruct_run(tmp_path / "oi", 3),
        "conversations": write_conversation_run(tmp_path / "conv", 3),
    }
    for fmt, run in runs.items():
        assert detect_format(run.path) == fmt
        assert load_run(run.path).format == fmt
        assert load_run(run.path, format=fmt).format == fmt
    # single files and sub-folders
    assert detect_format(tmp_path / "trl" / "completions") == "trl"
    assert detect_format(tmp_path / "trl" / "completions" / "completions_00001.parquet") == "trl"
    assert detect_format(tmp_path / "verl" / "rollout_data") == "verl"
    assert detect_format(tmp_path / "verl" / "rollout_data" / "2.jsonl") == "verl"
    assert detect_format(tmp_path / "conv" / "step-000001.jsonl") == "conversations"
    assert detect_format(runs["open_instruct"].files[0]) == "open_instruct"
    assert set(FORMATS) == {"native", "trl", "verl", "open_instruct", "conversations"}


def test_unknown_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownRunLayout) as e:
        load_run(tmp_path / "empty")
    msg = str(e.value)
    assert str(tmp_path / "empty") in msg
    for needle in ("run.json", "completions_<step>.parquet", "_rollouts_", "<step>.jsonl", "messages"):
        assert needle in msg
    assert isinstance(e.value, ValueError)
    assert detect_format(tmp_path / "empty") is None

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    garbage(junk / "blob.bin")
    garbage(junk / "data.jsonl", seed=1)
    (junk / "other.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(UnknownRunLayout):
        load_run(junk)
    with pytest.raises(UnknownRunLayout, match="no such file"):
        load_run(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown run format"):
        load_run(tmp_path / "empty", format="wandb")
    # a forced format with nothing of it at all
    with pytest.raises(UnknownRunLayout, match="trl"):
        load_run(tmp_path / "empty", format="trl")


def test_fingerprint_tracks_files(tmp_path):
    run = write_verl_run(tmp_path / "v", 3)
    fp = load_run(run.path).fingerprint()
    assert fp["format"] == "verl"
    assert "rollout_data/1.jsonl" in fp["files"] and "verl_grpo_tooluse/qwen2.5_grpo_tooluse.jsonl" in fp["files"]
    with (run.path / "rollout_data" / "2.jsonl").open("a") as fh:
        fh.write("\n")
    assert load_run(run.path).fingerprint() != fp


# ---- TRL: tests/test_adapter_trl.py ----------------------------------------------------


# ---- verl: tests/test_adapter_verl.py ------------------------------------------------


# ---- open-instruct: tests/test_adapter_open_instruct.py --------------------------------


# ---- conversations ------------------------------------------------------------------


@pytest.mark.parametrize("naming", ["step-{step:06d}.jsonl", "{step}.jsonl", "step_{step}.jsonl"])
def test_conversation_dir_with_collapse(tmp_path, naming):
    run = write_conversation_run(tmp_path / "conv", STEPS, collapse_at=COLLAPSE, seed=5, naming=naming)
    assert detect_format(run.path) == "conversations"
    src = load_run(run.path)
    assert src.format == "conversations" and not src.issues, issues_text(src)
    ro = check_truth(src, run)
    assert "conversation_id" in ro.columns and src.tokens is None
    # completion = assistant turns joined with ChatML turn boundaries (re-splittable)
    row = ro.filter(pl.col("n_turns") > 2).row(0, named=True)
    assert len(split_turns(row["completion"], src.dialect)) == row["n_turns"]


def test_conversation_single_file(tmp_path):
    run = write_conversation_run(tmp_path / "c.jsonl", STEPS, collapse_at=COLLAPSE, layout="file")
    src = load_run(run.path)
    assert src.format == "conversations"
    check_truth(src, run)
    # no step field at all: step 0
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"messages": [{"role": "user", "content": "x"},
                                              {"role": "assistant", "content": "hello"}]}) + "\n")
    src = load_run(plain)
    assert src.rollouts.collect().get_column("step").to_list() == [0]
    assert any("step 0" in n for n in src.notes)


def test_conversation_bad_inputs(tmp_path):
    run = write_conversation_run(tmp_path / "conv", STEPS, collapse_at=COLLAPSE)
    files = run.files
    lines = files[1].read_text().splitlines()
    a = json.loads(lines[0])
    a["messages"][1]["role"] = "robot"
    b = json.loads(lines[1])
    b["reward"] = "good"
    c = json.loads(lines[2])
    c["reward"] = float("nan")
    lines[:3] = [json.dumps(a), json.dumps(b), json.dumps(c)]
    files[1].write_text("\n".join(lines) + "\n")
    files[2].write_bytes(files[2].read_bytes()[:-25])
    garbage(files[3])
    files[4].write_bytes(b"")
    files[5].unlink()
    src = load_run(run.path)
    text = issues_text(src)
    assert f"{files[1]}:1: messages[1] has role 'robot'" in text
    assert f"{files[1]}:2: 'reward' is not a number" in text
    assert "non-finite" in text
    assert f"{files[2]}:{run.samples_per_step}: truncated JSON" in text
    assert str(files[3]) in text
    assert f"{files[4]}: no readable conversation" in text
    ro = src.rollouts.collect()
    assert sorted(ro.get_column("step").unique().to_list()) == [0, 1, 2, 6, 7]
    assert ro.filter(pl.col("step") == 1).height == run.samples_per_step - 1


# ---- native -------------------------------------------------------------------------


def _native_run(path: Path) -> None:
    from diagnose.rundir import RunWriter

    ctrl = [{"name": "im_end", "text": "<|im_end|>", "token_id": 151645, "role": "turn_end"}]
    w = RunWriter(path, config={}, model={}, tokenizer={}, control_tokens=ctrl, seeds={"seed": 0}, fsync=False)
    for step in range(4):
        w.log_metrics(step, {"reward": 0.5 - 0.1 * step, "turn_state/collapsed": 0.1 * step})
        w.write_rollouts(step, [{
            "step": step, "sample_id": i, "group_id": i // 2, "task_id": "t", "split": "train",
            "prompt": "p", "completion": "<tool_call>", "reward": 0.0, "accuracy": 0.0, "n_turns": 1,
            "turn_states": ["collapsed"], "error_types": ["open_tag_only"],
        } for i in range(4)])
        w.write_tokens(step, {
            "step": np.full(3, step), "sample_id": np.zeros(3, dtype=np.int64), "turn": np.zeros(3, dtype=np.int32),
            "position": np.arange(3, dtype=np.int32), "token_id": np.array([1, 2, 151645], dtype=np.int32),
            "logprob": np.full(3, -0.1, dtype=np.float32), "entropy": np.full(3, 0.5, dtype=np.float32),
            "is_generated": np.ones(3, dtype=bool), "lp_ctrl_im_end": np.full(3, -3.0, dtype=np.float32),
        })
    w.close()


def test_native_run(tmp_path):
    run = tmp_path / "native"
    _native_run(run)
    assert detect_format(run) == "native"
    src = load_run(run)
    assert src.format == "native"
    assert src.control_tokens[0]["name"] == "im_end"
    assert src.rollouts.collect().height == 16
    assert src.tokens.collect().get_column("lp_ctrl_im_end").to_list()[0] == -3.0
    assert src.probe is None and any("probe" in n for n in src.notes)
    assert src.metrics.collect().height == 4
    assert "run.json" in src.fingerprint()["files"]
    # corrupt inputs are reported by the reader and skipped
    cut_half(run / "tokens" / "step-000002.parquet")
    with (run / "metrics.jsonl").open("ab") as fh:
        fh.write(b'{"step": 9, "rew')
    src = load_run(run)
    text = issues_text(src)
    assert "step-000002.parquet" in text and "metrics.jsonl:5" in text
    assert sorted(src.tokens.collect().get_column("step").unique().to_list()) == [0, 1, 3]


def test_native_unreadable(tmp_path):
    run = tmp_path / "native"
    run.mkdir()
    garbage(run / "run.json")
    assert detect_format(run) == "native"
    src = load_run(run)
    assert src.format == "native" and src.issues and src.metrics.collect().height == 0


# ---- single files, empty runs, odd values --------------------------------------------


def test_single_files(tmp_path):
    verl = write_verl_run(tmp_path / "verl", 3)
    src = load_run(verl.path / "rollout_data" / "2.jsonl")
    assert src.format == "verl" and src.rollouts.collect().height == verl.samples_per_step
    src = load_run(verl.path / "verl_grpo_tooluse" / "qwen2.5_grpo_tooluse.jsonl")
    assert src.format == "verl" and src.rollouts.collect().height == 0
    assert src.metrics.collect().height == 4 and "entropy" in src.metrics.collect().columns  # steps 0 (val) .. 3
    oi = write_open_instruct_run(tmp_path / "oi", 3)
    src = load_run(oi.files[0])
    assert src.format == "open_instruct" and src.tokens.collect().height > 0


@pytest.mark.parametrize(("fmt", "name", "content", "why"), [
    ("verl", "rollout_data/1.jsonl", b"", "no readable rollout lines"),
    ("conversations", "conv/step-000001.jsonl", b"\n\n", "no readable conversation"),
])
def test_empty_step_files(tmp_path, fmt, name, content, why):
    f = tmp_path / name
    f.parent.mkdir()
    f.write_bytes(content)
    assert detect_format(f.parent) is None
    src = load_run(f.parent, format=fmt)
    assert src.rollouts.collect().height == 0 and src.metrics.collect().height == 0
    assert why in issues_text(src)
