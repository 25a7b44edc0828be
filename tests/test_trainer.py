"""The trainer on the embedded tiny model: run format, resume, signals, supervisory signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from diagnose.chat import render_chat
from diagnose.rundir import RunReader, ctrl_column
from diagnose.model.sequences import encode_conversation
from diagnose.tasks import gold_messages, make_tasks
from diagnose.model.resolve import load_model_and_tokenizer
from train_minimal.cli import app
from train_minimal.config import build_config
from diagnose.model.generation import Sampling
from train_minimal.presets import preset
from train_minimal.rollout import rollout_episodes
from train_minimal.trainer import clip_and_step, group_items, train

QUIET = Console(file=open(os.devnull, "w"))


def smoke_config(model_dir: Path, *extra: str):
    return build_config(preset("smoke"), overrides=[f"model.path={model_dir}", *extra])


@pytest.fixture(scope="module")
def smoke_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "smoke"
    train(smoke_config(tiny_model_dir), out, console=QUIET)
    return out


def test_smoke_run_writes_run_format_v1(smoke_run):
    r = RunReader(smoke_run)
    assert r.issues == []
    m = r.metrics()
    assert m["step"].to_list() == [1, 2, 3, 4, 5, 6]
    assert m["phase"].to_list() == ["sft"] * 3 + ["rl"] * 3
    for key in ("reward", "accuracy", "entropy", "kl", "clip_ratio", "grad_norm", "lr", "completions/mean_length",
                "turn_state/collapsed", "group_reward_std", "mismatch/abs_logprob_diff",
                "attribution/im_end/self", "probe/after_call_open/im_end", "eval/format_ood/accuracy"):
        assert key in m.columns, key
    assert m["sft_loss"][0] > m["sft_loss"][2]  # the warm start learns
    assert r.steps("rollouts") == [4, 5, 6] and r.steps("tokens") == [4, 5, 6]
    assert r.steps("probe") == [1, 2, 4, 6]
    names = [c["name"] for c in r.control_tokens]
    assert {"im_end", "tool_call_open", "call_body_start"} <= set(names)
    tok = r.tokens().collect()
    assert all(ctrl_column(n) in tok.columns for n in names)
    ro = r.rollouts().collect()
    assert ro.height == 3 * 2 * 4  # steps x prompts x group
    # positions are contiguous per sample and every rollout has tokens
    per = tok.group_by("step", "sample_id").agg(pl.col("position").min().alias("lo"),
                                                pl.col("position").max().alias("hi"), pl.len().alias("n"))
    assert per.height == ro.height
    assert (per["lo"] == 0).all() and (per["hi"] + 1 == per["n"]).all()
    # the trainer's log-probs of sampled tokens equal the sampler's (same weights, HF backend)
    gen = tok.filter(pl.col("is_generated"))
    assert gen.height > 0
    assert (gen["logprob"] - gen["sampler_logprob"]).abs().max() < 1e-3
    # control-token log-probs are log-probabilities (<= 0), the sampled one matches logprob
    lp_end = gen.filter(pl.col("token_id") == next(c["token_id"] for c in r.control_tokens if c["name"] == "im_end"))
    assert (lp_end["logprob"] - lp_end[ctrl_column("im_end")]).abs().max() < 1e-5
    ckpts = r.checkpoints()
    assert [s for s, _ in ckpts] == [3, 6]
    assert (ckpts[-1][1] / "optimizer.pt").exists()
    load_model_and_tokenizer(ckpts[-1][1])  # a checkpoint is a normal HF model dir


def test_resume_matches_uninterrupted_run(smoke_run, tiny_model_dir, tmp_path):
    out = tmp_path / "resumed"
    cfg = smoke_config(tiny_model_dir)
    train(cfg, out, console=QUIET, stop_after=4)
    assert RunReader(out).metrics()["step"].max() == 4
    train(cfg, out, console=QUIET, resume=True)
    a, b = RunReader(smoke_run).metrics(), RunReader(out).metrics()
    assert b["step"].to_list() == a["step"].to_list()
    for col in ("reward", "loss", "entropy", "grad_norm", "sft_loss", "probe/after_call_open/im_end"):
        np.testing.assert_allclose(b[col].to_numpy(), a[col].to_numpy(), rtol=1e-5, atol=1e-6, err_msg=col)
    wa = load_file(RunReader(smoke_run).checkpoints()[-1][1] / "model.safetensors")
    wb = load_file(RunReader(out).checkpoints()[-1][1] / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_sigterm_finishes_step_checkpoints_and_exits_cleanly(tiny_model_dir, tmp_path):
    out = tmp_path / "term"
    cmd = [sys.executable, "-m", "train_minimal.cli", "run", "--preset", "smoke", "--out", str(out),
           "--set", f"model.path={tiny_model_dir}", "--set", "grpo.steps=200", "--set", "log.checkpoint_every=1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"

    def logged() -> int:
        return len(metrics.read_text().splitlines()) if metrics.exists() else 0

    deadline = time.time() + 900  # generous: a loaded CI machine is slow to reach the RL phase
    while time.time() < deadline and logged() < 4 and proc.poll() is None:
        time.sleep(0.2)
    seen = logged()
    assert seen >= 4, f"the run did not reach its RL phase in time (steps logged: {seen})"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    r = RunReader(out)
    last = int(r.metrics()["step"].max())
    assert seen <= last <= seen + 1  # the step in flight was finished, the run did not go on
    assert [s for s, _ in r.checkpoints()] == [last]
    assert r.issues == []
    assert not any(p.name.endswith(".parquet") and p.name.startswith(".") for p in out.rglob("*"))


def test_gold_sequence_tokens_reproduce_the_rendered_conversation(tiny_model_dir):
    _, tok = load_model_and_tokenizer(tiny_model_dir)
    for task in make_tasks("train", 3) + make_tasks("format_ood", 2):
        msgs = gold_messages(task)
        seq = encode_conversation(tok, msgs, len(task.messages))
        assert tok.decode(seq.ids) == render_chat(msgs).removesuffix("\n")
        trained = tok.decode([i for i, m in zip(seq.ids, seq.loss_mask) if m])
        # exactly the assistant turns (each with its <|im_end|>) are trained on
        assert trained == "".join(m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant")


def test_groups_mix_gold_hint_and_policy_members(tiny_model_dir):
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    cfg = smoke_config(tiny_model_dir, "supervision.off_policy_k=1", "supervision.hint_k=1")
    tasks = make_tasks("train", 2)
    trajs = rollout_episodes(model, tok, group_items(tasks, cfg), max_turns=3, sampling=Sampling(max_new_tokens=16))
    kinds = [t.kind for t in trajs]
    assert kinds == ["gold", "hint", "policy", "policy"] * 2
    gold = [t for t in trajs if t.kind == "gold"]
    assert all(t.reward == 1.0 for t in gold)  # the gold trajectory solves its task
    plain_prompt = trajs[2].seq.ids[: trajs[2].seq.turn.index(0)]
    hint_prompt = trajs[1].seq.ids[: trajs[1].seq.turn.index(0)]
    assert hint_prompt == plain_prompt  # the hint is not in the trained context
    assert all(np.isnan(t.seq.sampler_logprob).all() for t in gold)


def test_nonfinite_gradient_skips_the_update():
    model = torch.nn.Linear(2, 1)
    before = model.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    (model(torch.tensor([[float("nan"), 1.0]])).sum()).backward()
    norm, ok = clip_and_step(model, opt, 1.0)
    assert not ok and torch.equal(model.weight, before)


@pytest.mark.parametrize("args, code, needle", [
    (["run", "--preset", "nope"], 2, "unknown preset 'nope'"),
    (["run", "--preset", "smoke", "--set", "grpo.lrr=1"], 2, "did you mean 'grpo.lr'"),
    (["run", "--preset", "smoke", "--set", "model.path=/no/such/model"], 1, "/no/such/model"),
])
def test_cli_errors_are_one_line(args, code, needle, tmp_path):
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r")])
    assert res.exit_code == code, res.output
    assert needle in res.stderr and "Traceback" not in res.output


def test_scan_reads_a_trainer_run(smoke_run):
    """The trainer -> scan contract: a run the trainer wrote scans with no issue, and the
    control-token signals at the key contexts and the probe signals come out of it."""
    from diagnose.adapters import load_run
    from diagnose.scan import scan_source

    src = load_run(smoke_run)
    assert src.format == "native" and src.issues == []
    r = scan_source(src)
    assert r.verdict == "insufficient_data"  # 3 RL steps: too short to judge, and it says so
    cols = set(r.signals.columns)
    assert {"probe/after_call_open/im_end", "probe/after_call_open/call_body_start", "entropy",
            "turn_state/collapsed", "attribution/im_end/total", "ctx/turn_start/im_end"} <= cols
    rl = r.signals.filter(pl.col("step") >= 4)
    assert rl["entropy"].is_not_null().all() and rl["reward"].is_not_null().all()


def test_sft_pass_context_weight_and_dropped_system_prompt(tiny_model_dir):
    """The pretraining-style options of the warm start: dropping the system prompt shortens the
    sequence, and a context weight adds LM loss on user/tool tokens (changing the gradient)."""
    from train_minimal.trainer import sft_pass

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    tasks = make_tasks("train", 3, seed=5)

    def grad_norm(**kw) -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        loss = sft_pass(model, tok, tasks, micro=2, scale=1.0, **kw)
        g = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
        return loss, float(g)

    base_loss, base_g = grad_norm()
    same_loss, same_g = grad_norm(keep_system=[True] * 3, context_weight=0.0)
    assert same_loss == pytest.approx(base_loss, rel=1e-5) and same_g == pytest.approx(base_g, rel=1e-4)
    ctx_loss, ctx_g = grad_norm(context_weight=0.3)
    assert ctx_loss != pytest.approx(base_loss, rel=1e-3) and ctx_g != pytest.approx(base_g, rel=1e-3)
    nosys_loss, _ = grad_norm(keep_system=[False] * 3)
    assert nosys_loss != pytest.approx(base_loss, rel=1e-3)  # same assistant tokens, other context
    # the loss is a token mean of the same assistant tokens: micro-batching does not change it
    one_loss, _ = grad_norm(keep_system=[False, True, False], context_weight=0.3)
    model.zero_grad(set_to_none=True)
    whole = sft_pass(model, tok, tasks, micro=8, scale=1.0, keep_system=[False, True, False], context_weight=0.3)
    assert whole == pytest.approx(one_loss, rel=1e-4)


def test_lr_schedule_warms_up_then_decays_but_never_to_zero():
    from train_minimal.trainer import lr_at

    assert [lr_at(s, 1.0, 2) for s in (1, 2, 3, 20)] == [0.5, 1.0, 1.0, 1.0]  # constant (the default)
    lin = [lr_at(s, 1.0, 2, 20, "linear") for s in range(1, 21)]
    assert lin[:2] == [0.5, 1.0] and all(a > b for a, b in zip(lin[1:], lin[2:])) and 0 < lin[-1] < 0.1
    cos = [lr_at(s, 1.0, 2, 20, "cosine") for s in range(1, 21)]
    assert cos[1] == 1.0 and all(a >= b for a, b in zip(cos[1:], cos[2:])) and 0 < cos[-1] < 0.05


def test_truncated_call_example_ends_the_turn_after_the_call_opener(tiny_model_dir):
    """The base-mix recipe's truncated calls: a conversation cut at a call turn trains `<tool_call>` `\\n` `<|im_end|>`
    as that turn's assistant tokens, and nothing after it."""
    from train_minimal.trainer import truncated_at_call

    _, tok = load_model_and_tokenizer(tiny_model_dir)
    task = make_tasks("train", 1, seed=3)[0]
    full = gold_messages(task)
    cut = truncated_at_call(full, 1)
    n_calls = sum(m["role"] == "assistant" and "<tool_call>" in m["content"] for m in full)
    assert n_calls >= 2 and cut[-1] == {"role": "assistant", "content": "<tool_call>\n"}
    assert sum(m["role"] == "assistant" for m in cut) == 2 and cut[:-1] == full[: len(cut) - 1]
    seq = encode_conversation(tok, cut, len(task.messages))
    trained = [i for i, m in zip(seq.ids, seq.loss_mask) if m]
    assert tok.convert_ids_to_tokens(trained[-3:]) == ["<tool_call>", "\u010a", "<|im_end|>"]
    assert truncated_at_call(full[:2], 0) == full[:2]  # no call turn: unchanged


def test_warm_start_mix_draws_ood_examples_apart_from_the_eval_sets(tiny_model_dir, tmp_path):
    """sft.ood_rate draws content_ood / format_ood examples (format_ood keeps its system prompt,
    its only syntax cue), none with an eval set's request; rate 0 keeps the v1 random stream."""
    from train_minimal.trainer import setup, warm_start_batch

    cfg = smoke_config(tiny_model_dir, "sft.ood_rate=0.5", "sft.truncated_call_rate=0.5", "sft.batch_size=16")
    s = setup(cfg, tmp_path / "run", resume=False, console=QUIET, init_from=None)
    try:
        held = {t.user for ts in s.eval_sets.values() for t in ts}
        assert s.ood_pool and not any(t.user in held for t in s.ood_pool)
        tasks, keep, cut = warm_start_batch(s, 1)
        splits = [t.split for t in tasks]
        assert "train" in splits and {"content_ood", "format_ood"} & set(splits)
        assert all(k for t, k in zip(tasks, keep) if t.split == "format_ood")
        assert cut is not None and any(c is not None for c in cut) and any(c is None for c in cut)
    finally:
        s.writer.close()
    plain = setup(smoke_config(tiny_model_dir), tmp_path / "plain", resume=False, console=QUIET, init_from=None)
    try:
        tasks, _, cut = warm_start_batch(plain, 1)
        assert cut is None and all(t.split == "train" for t in tasks) and not plain.ood_pool
    finally:
        plain.writer.close()


def test_seq_mean_aggregation_weighs_sequences_not_tokens():
    """loss_agg: token-mean weighs a long sequence by its tokens; seq-mean-token-mean gives each
    sequence the same weight (a 1-token sequence weighs as much as a 3-token one)."""
    from train_minimal.losses import grpo_loss

    lp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    for agg, want in (("token-mean", [[-0.25] * 3, [0.25, 0, 0]]),
                      ("seq-mean-token-mean", [[-1 / 6] * 3, [0.5, 0, 0]])):
        lp.grad = None
        grpo_loss(lp, lp.detach(), adv, mask, epsilon=0.2, epsilon_high=0.2, agg=agg).loss.backward()
        assert torch.allclose(lp.grad, torch.tensor(want)), (agg, lp.grad)
