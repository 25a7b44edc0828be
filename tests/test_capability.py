"""The capability probe's parts: verdict rule, syntax re-rendering, format repairs, distractors,
batched likelihood scoring, checkpoint selection."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from diagnose.capability.config import HEALTHY, INCONCLUSIVE, INTACT_FORMAT_BROKEN, LOST, ProbeConfig
from diagnose.capability.interventions import CALL_PREFIX, ForbidPrematureControl, Repairs
from diagnose.capability.likelihood import build_steps, conversation_logprobs, distractors, sequence_logprobs
from diagnose.capability.select import select_checkpoints
from diagnose.capability.tasksets import TaskSet, resyntax
from diagnose.capability.verdict import likelihood_skill, summarize, verdict
from diagnose.chat import ENDOFTEXT, IM_END
from diagnose.control_tokens import ControlTokenRegistry
from diagnose.model.sequences import encode, encode_conversation
from diagnose.tasks import gold_messages, load_task_file, make_tasks
from diagnose.toolcall import CallSyntax, render_tools_instructions

# ------------------------------------------------------------------------------------ verdict


@pytest.mark.parametrize(("fmt", "cap", "skill", "healthy_share", "expected"), [
    (0.80, 0.85, 0.9, 0.95, HEALTHY),             # close: healthy
    (0.50, 0.60, None, None, HEALTHY),            # gap 0.10 < 0.15
    (0.30, 0.50, None, None, INTACT_FORMAT_BROKEN),  # gap 0.20 >= max(0.15, 0.3 * 0.5)
    (0.60, 0.90, None, None, INTACT_FORMAT_BROKEN),  # gap 0.30 >= max(0.15, 0.3 * 0.9)
    (0.70, 0.90, None, None, HEALTHY),            # gap 0.20 < 0.3 * 0.9: relative to the skill
    (0.05, 0.70, 0.8, 0.1, INTACT_FORMAT_BROKEN),  # the collapse: repairs restore the skill
    (0.00, 0.00, 0.0, 0.0, LOST),                 # nothing anywhere
    (0.00, 0.05, 0.9, 0.1, INTACT_FORMAT_BROKEN),  # cannot emit, but knows the calls; format broken
    (0.10, 0.10, 0.9, 0.9, LOST),                 # format fine and still failing: not hidden by format
    (None, None, None, None, INCONCLUSIVE),
    (None, 0.8, None, None, INCONCLUSIVE),        # native not measured: the format cannot be judged
])
def test_verdict_rule_on_hand_made_numbers(fmt, cap, skill, healthy_share, expected):
    assert verdict(fmt, cap, skill=skill, healthy_share=healthy_share) == expected


def test_verdict_thresholds_come_from_the_config():
    strict = ProbeConfig(capable_min=0.9, gap_abs_min=0.01, gap_rel_min=0.0)
    assert verdict(0.8, 0.85) == HEALTHY
    assert verdict(0.8, 0.85, cfg=strict) == LOST
    assert verdict(0.9, 0.95, cfg=strict) == INTACT_FORMAT_BROKEN
    assert set(ProbeConfig().thresholds()) == {"capable_min", "gap_abs_min", "gap_rel_min",
                                               "likelihood_skill_min", "format_ok_min"}


def test_likelihood_skill_is_chance_corrected():
    assert likelihood_skill(0.25, 0.25) == 0.0
    assert likelihood_skill(0.10, 0.25) == 0.0
    assert likelihood_skill(1.0, 0.25) == 1.0
    assert likelihood_skill(0.625, 0.25) == pytest.approx(0.5)
    assert likelihood_skill(None, 0.25) is None


def test_summarize_takes_the_best_content_measure():
    rows = [
        {"measure": "native", "accuracy": 0.1, "healthy_call": 0.05, "healthy_response": 0.05},
        {"measure": "repair_forbid", "accuracy": 0.6},
        {"measure": "repair_prefill", "accuracy": 0.7},
        {"measure": "alt_pythonic", "accuracy": 0.2},
        {"measure": "alt_json", "accuracy": None},
        {"measure": "likelihood", "accuracy": 0.9},
    ]
    s = summarize("step-000010", 10, rows, chance=0.2, cfg=ProbeConfig())
    assert s["format_score"] == 0.1 and s["capability_score"] == 0.7
    assert s["format_gap"] == pytest.approx(0.6) and s["verdict"] == INTACT_FORMAT_BROKEN
    # the likelihood probe is not an end-to-end accuracy: it never becomes the capability score
    only = summarize("x", None, [{"measure": "native", "accuracy": 0.0}, {"measure": "likelihood", "accuracy": 1.0}],
                     chance=0.2, cfg=ProbeConfig())
    assert only["capability_score"] == 0.0


def test_run_format_documents_the_capability_files():
    from diagnose.capability.results import MEASURES, RESULT_SCHEMA, SUMMARY_SCHEMA

    spec = (Path(__file__).parents[1] / "docs" / "run-format.md").read_text()
    for col in [*RESULT_SCHEMA, *SUMMARY_SCHEMA]:
        assert f"`{col}`" in spec, col
    probe_doc = (Path(__file__).parents[1] / "docs" / "probe.md").read_text()
    for name in [*MEASURES, *ProbeConfig().thresholds()]:
        assert f"`{name}`" in probe_doc, name


def test_config_rejects_unknown_measures():
    with pytest.raises(ValueError, match="unknown measure"):
        ProbeConfig(measures=("native", "vibes"))


# ------------------------------------------------------------------------------ task sets


def test_resyntax_is_the_format_ood_split():
    """The python-list measure re-renders the held-out tasks: exactly the format_ood split."""
    test, ood = make_tasks("test", 9), make_tasks("format_ood", 9)
    for a, b in zip(test, ood):
        r = resyntax(a, CallSyntax.PYTHONIC)
        assert r.messages == b.messages and r.syntax == b.syntax and r.gold_turns == b.gold_turns
        assert r.id == a.id  # the same task, for per-task comparisons
    for a, b in zip(test, make_tasks("test", 9, syntax=CallSyntax.JSON)):
        assert resyntax(a, CallSyntax.JSON).messages == b.messages
    assert resyntax(test[0], CallSyntax.HERMES) is test[0]


def test_resyntax_task_file_task(tmp_path):
    line = {"id": "w1", "messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Weather in Oslo?"}],
            "tools": [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
            "ground_truth": [[{"name": "get_weather", "arguments": {"city": "Oslo"}}]], "final_answer": "5"}
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps(line) + "\n")
    (task,), errors = load_task_file(f)
    assert not errors
    py = resyntax(task, "pythonic")
    system = py.messages[0]["content"]
    assert system.startswith("Be brief.")
    assert render_tools_instructions(task.tools, CallSyntax.PYTHONIC) in system
    assert render_tools_instructions(task.tools, CallSyntax.HERMES) not in system
    assert task.messages[0]["content"] != system  # the original is untouched


def test_taskset_fingerprint_tracks_the_tasks():
    a = TaskSet(make_tasks("test", 3), "x", [])
    assert a.fingerprint() == TaskSet(make_tasks("test", 3), "y", []).fingerprint()
    assert a.fingerprint() != TaskSet(make_tasks("test", 3, seed=1), "x", []).fingerprint()


# ------------------------------------------------------------------------------- repairs


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)


def _stops(tok) -> list[int]:
    return [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)]


def _drive(proc, prompt_last: int, tokens: list[int], vocab: int) -> tuple[list[int], list[int]]:
    """Feed ``tokens`` as the model's greedy choices (scores peaked on each); returns what the
    processed scores pick at each step and the step's fired flags. Stops after a stop token."""
    seq = [prompt_last]
    picks = []
    for t in tokens:
        scores = torch.full((1, vocab), -5.0)
        scores[0, t] = 5.0
        out = proc(torch.tensor([seq]), scores)
        pick = int(out.argmax(-1))
        picks.append(pick)
        seq.append(pick)
        if pick in proc.stop_ids.tolist():
            break
    return picks, proc.fired_list()


def test_forbid_repair_blocks_premature_control_tokens(tok):
    reg = ControlTokenRegistry.from_tokenizer(tok)
    V = len(tok) + 64
    open_, close, im_end = tok.convert_tokens_to_ids("<tool_call>"), tok.convert_tokens_to_ids("</tool_call>"), \
        tok.convert_tokens_to_ids(IM_END)
    nl = reg.by_role("call_newline")[0].token_id
    body = encode(tok, '{"name": "f", "arguments": {}}')
    last = encode(tok, "assistant\n")[-1]
    # the Qwen2.5 collapse: <tool_call> \n <|im_end|> -- im_end is forbidden, the runner-up wins
    proc = ForbidPrematureControl(reg, _stops(tok))
    picks, fired = _drive(proc, last, [open_, nl, im_end], V)
    assert picks[:2] == [open_, nl] and picks[2] != im_end and fired == [True]
    # an empty call block cannot be closed; a call with a body can; the turn may end after it
    proc = ForbidPrematureControl(reg, _stops(tok))
    picks, fired = _drive(proc, last, [open_, nl, close], V)
    assert picks[2] != close and fired == [True]
    healthy = [open_, nl, *body, nl, close, im_end]
    proc = ForbidPrematureControl(reg, _stops(tok))
    picks, fired = _drive(proc, last, healthy, V)
    assert picks == healthy and fired == [False]
    # outside a call nothing is touched: a plain answer ends the turn
    answer = encode(tok, "It is 5 degrees.") + [im_end]
    proc = ForbidPrematureControl(reg, _stops(tok))
    assert _drive(proc, last, answer, V) == (answer, [False])


def test_prefill_repair_forces_the_call_prefix(tok):
    reg = ControlTokenRegistry.from_tokenizer(tok)
    rep = Repairs(tok, reg, _stops(tok))
    assert tok.decode(rep.prefix_ids) == CALL_PREFIX
    V = len(tok) + 64
    open_, im_end = tok.convert_tokens_to_ids("<tool_call>"), tok.convert_tokens_to_ids(IM_END)
    last = encode(tok, "assistant\n")[-1]
    proc = rep.prefill()
    picks, fired = _drive(proc, last, [open_, im_end, im_end, im_end, im_end, im_end, im_end], V)
    assert picks[0] == open_ and picks[1: 1 + len(rep.prefix_ids)] == rep.prefix_ids and fired == [True]
    # a model that writes the prefix itself is not changed
    own = [open_, *rep.prefix_ids, *encode(tok, 'f", "arguments": {}}')]
    proc = rep.prefill()
    assert _drive(proc, last, own, V) == (own, [False])


def test_would_fire_agrees_with_the_processors(tok):
    """Native episodes are reused for a repair exactly when it would not fire: the two rules
    (on tensors during generate, on known tokens afterwards) must agree."""
    reg = ControlTokenRegistry.from_tokenizer(tok)
    rep = Repairs(tok, reg, _stops(tok))
    V = len(tok) + 64
    last = encode(tok, "assistant\n")[-1]
    alphabet = [t.token_id for t in reg.tokens] + encode(tok, '{"name": "f"} ok') + rep.prefix_ids
    rng = random.Random(0)
    for _ in range(300):
        toks = [rng.choice(alphabet) for _ in range(rng.randrange(1, 14))]
        stop = next((k for k, t in enumerate(toks) if t in _stops(tok)), None)
        toks = toks if stop is None else toks[: stop + 1]
        for make in (rep.forbid, rep.prefill):
            proc = make()
            picks, fired = _drive(proc, last, toks, V)
            assert make().would_fire([toks]) == fired[0] == (picks != toks), (make, toks, picks)


def test_repairs_batch_rows_are_independent(tok):
    reg = ControlTokenRegistry.from_tokenizer(tok)
    V = len(tok) + 64
    open_, nl, im_end = tok.convert_tokens_to_ids("<tool_call>"), reg.by_role("call_newline")[0].token_id, \
        tok.convert_tokens_to_ids(IM_END)
    proc = ForbidPrematureControl(reg, _stops(tok))
    last = encode(tok, "assistant\n")[-1]
    rows = [[open_, nl, im_end], encode(tok, "Hi") + [im_end, im_end]]
    seqs = [[last], [last]]
    for k in range(3):
        scores = torch.full((2, V), -5.0)
        for b in range(2):
            scores[b, rows[b][k]] = 5.0
        pick = proc(torch.tensor(seqs), scores).argmax(-1).tolist()
        for b in range(2):
            seqs[b].append(pick[b])
    assert seqs[0][3] != im_end and seqs[1][1:] == rows[1][:3]
    assert proc.fired_list() == [True, False]


# -------------------------------------------------------------------------- likelihood


def test_distractors_change_one_thing_each():
    tasks = make_tasks("test", 12)
    steps = build_steps(tasks, ProbeConfig())
    assert len(steps) == sum(sum(1 for t in task.gold_turns if t) for task in tasks)
    assert build_steps(tasks, ProbeConfig())[5].texts == steps[5].texts  # deterministic
    for s in steps:
        assert s.kinds[0] == "gold" and len(set(s.texts)) == len(s.texts) >= 4
        assert set(s.kinds[1:]) <= {"wrong_tool", "wrong_value", "wrong_arg_name"}
        assert s.context.endswith("<|im_start|>assistant\n")
    task = tasks[0]
    turn = task.gold_turns[1]  # transfer(from_id, to_id, amount)
    for kind, alt in distractors(task, 1, turn, ["acct-1111", "Frank", 7], 2):
        diffs = [(a, b) for a, b in zip(turn, alt) if a != b]
        assert len(diffs) == 1
        a, b = diffs[0]
        if kind == "wrong_tool":
            assert b.name != a.name and b.arguments == a.arguments
        elif kind == "wrong_value":
            changed = [k for k in a.arguments if a.arguments[k] != b.arguments[k]]
            assert len(changed) == 1
            old, new = a.arguments[changed[0]], b.arguments[changed[0]]
            assert type(old) is type(new)
            if isinstance(old, str) and old.startswith("acct-"):
                assert new.startswith("acct-")  # same shape: a plausible wrong id
        else:
            assert b.name == a.name and set(b.arguments) != set(a.arguments) and len(b.arguments) == len(a.arguments)


def test_batched_likelihood_is_exact(tiny_model_dir, tok):
    """Sharing each conversation's KV cache gives the numbers of scoring every pair from scratch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True).eval()
    tasks = make_tasks("test", 3)
    steps = build_steps(tasks, ProbeConfig())
    seqs = [encode_conversation(tok, gold_messages(t), len(t.messages)).ids for t in tasks]
    queries, contexts = [], []
    for s in steps:
        ctx = encode(tok, s.context)
        assert seqs[s.task_index][: len(ctx)] == ctx  # the step's context is a prefix of its conversation
        for text in s.texts:
            queries.append((s.task_index, len(ctx), encode(tok, text)))
            contexts.append(ctx)
    shared = conversation_logprobs(model, seqs, queries, batch_tokens=4000)  # several groups
    scratch = sequence_logprobs(model, contexts, [q[2] for q in queries], batch_tokens=4000)
    assert shared is not None and np.all(np.isfinite(shared))
    np.testing.assert_allclose(shared, scratch, atol=2e-3)


# ---------------------------------------------------------------------------- selection


def _with_checkpoints(run: Path, steps: list[int]) -> None:
    for s in steps:
        d = run / "checkpoints" / f"step-{s:06d}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({"step": s}))


def test_select_around_the_collapse(tmp_path):
    from diagnose.scan.run import scan_run
    from diagnose.synth import write_synthetic_run

    run = tmp_path / "run"
    write_synthetic_run(run, steps=60, collapse_at=30, seed=3, samples_per_step=16, tokens_per_sample=48)
    (ep,) = scan_run(run).episodes
    steps = [0, 10, 20, 28, 33, 50, 59]
    _with_checkpoints(run, steps)
    (run / "checkpoints" / "step-000045").mkdir()  # incomplete: no trainer_state.json
    sel = select_checkpoints(run)
    before = max(s for s in steps if s < ep.onset_step)
    trough = min(steps, key=lambda s: (abs(s - ep.trough_step), -s))  # ties: the later one
    assert [(c.step, c.roles) for c in sel.checkpoints] == [
        (before, ["before onset (episode 1)"]), (trough, ["trough (episode 1)"]), (59, ["last"])]
    assert sel.checkpoints[0].name == f"step-{before:06d}"
    assert any(f"episode 1: onset step {ep.onset_step}" in n for n in sel.notes)
    assert any("step-000045" in n and "incomplete" in n for n in sel.notes)


def test_select_without_episodes_first_and_last(tmp_path):
    from diagnose.synth import write_synthetic_run

    run = tmp_path / "run"
    write_synthetic_run(run, steps=40, collapse_at=None, seed=2, samples_per_step=16, tokens_per_sample=48)
    _with_checkpoints(run, [5, 15, 25, 39])
    sel = select_checkpoints(run)
    assert [(c.step, c.roles) for c in sel.checkpoints] == [(5, ["first"]), (39, ["last"])]
    assert any("no collapse episode" in n for n in sel.notes)
    assert [c.step for c in select_checkpoints(run, "all").checkpoints] == [5, 15, 25, 39]
    named = select_checkpoints(run, "names", ["step-000015", "25", "step-000099", "junk"])
    assert [c.step for c in named.checkpoints] == [15, 25] and named.unknown == ["step-000099", "junk"]
    shutil.rmtree(run / "checkpoints")
    assert select_checkpoints(run).checkpoints == []
