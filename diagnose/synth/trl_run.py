"""A TRL GRPOTrainer output directory, laid out step by step as ``GRPOTrainer.train`` writes it.

`write_trl_run` (re-exported by `diagnose.synth.foreign`) drives `diagnose.synth.trl.GrpoLog`
through the order of ``transformers.Trainer._inner_training_loop`` /
``_maybe_log_save_evaluate`` with GRPOTrainer's generation schedule
(``GRPOTrainer._prepare_inputs``: a new generation batch every ``steps_per_generation *
num_iterations`` micro-steps; here one micro-step per optimizer step, so every ``num_iterations``
steps):

1. optimizer step ``g`` (global steps start at 1): a generation when due, logged at ``g``; the
   loss metrics (``entropy``, ``clip_ratio/*``, ``kl`` with ``beta``) at every step;
2. ``g % logging_steps == 0``: ``log`` (train) -> ``completions_{g:05d}.parquet`` = the deques
   (the last generation batch only; the same rows again when no generation happened since);
3. ``g % eval_steps == 0``: evaluation (generation in eval mode into the same deques), then
   ``log`` (eval) -> the *same* file name, overwritten with eval completions;
4. ``g % save_steps == 0`` or the last step: ``checkpoint-<g>/trainer_state.json``;
5. after training: the summary ``log`` (``train_runtime`` ...), which writes the last step's file
   once more and is in no checkpoint's ``log_history``.

The samples are the gold trajectories of `diagnose.synth.foreign` (``_plan``), collapsing from
``collapse_at`` on; ``completions="messages"`` logs them as TRL 1.16 logs conversational data,
``"text"`` as TRL 1.10 (or non-conversational data) does.
"""

from __future__ import annotations

import math
import os
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from diagnose.chat import IM_END, render_chat, skip_special
from diagnose.synth.foreign import ForeignRun, Sampling, _plan, _Sample
from diagnose.synth.trl import GrpoLog, episode, save_trainer_state

REWARD_FUNCS = ("accuracy_reward", "format_reward")
SYSTEM = "You are a helpful assistant. Use the tools to do the task, then answer briefly."


@dataclass
class TrlRun(ForeignRun):
    """`ForeignRun` plus what only a TRL run has. ``steps``/``reward``/``turn_states`` cover the
    files holding fresh training rollouts; ``kinds`` says what every written file holds."""

    kinds: dict[int, str] = field(default_factory=dict)  #: step -> "train" | "relog" | "eval"
    logging_steps: int = 1
    num_iterations: int = 1
    eval_steps: int | None = None
    completions: str = "messages"
    reward_funcs: tuple[str, ...] = REWARD_FUNCS
    extra_columns: tuple[str, ...] = ()
    #: step -> one list of expected turn states per row (file row order), for every file
    row_states: dict[int, list[list[str]]] = field(default_factory=dict)
    metric_reward: dict[int, float] = field(default_factory=dict)  #: the logged ``reward`` metric
    max_steps: int = 0


def _prompt(s: _Sample, completions: str, tools: bool) -> Any:
    user = next(m["content"] for m in s.prompt_messages if m["role"] == "user")
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    if completions == "messages":
        return msgs
    return skip_special(render_chat(msgs, tools=s.tools if tools else None, add_generation_prompt=True))


def _row(s: _Sample, completions: str, tools: bool) -> tuple[Any, list[str], int, int, int]:
    """(completion cell, expected turn states, generated chars, tool calls, failures)."""
    if not tools:
        text = skip_special(s.turns[0] + IM_END)
        cell = [{"role": "assistant", "content": text}] if completions == "messages" else text
        return cell, list(s.states[:1]), len(s.turns[0]), 0, 0
    names = [t["function"]["name"] for t in s.tools]
    ep = episode(s.turns, s.observations, tool_names=names)
    states = list(s.states[:len(ep.turns)])
    if completions == "messages":  # parse_response moves text after a call into `content`
        states = ["healthy_call" if st == "polluted" and m.get("tool_calls") else st
                  for st, m in zip(states, [m for m in ep.messages if m["role"] == "assistant"])]
    cell = ep.messages if completions == "messages" else ep.text
    return cell, states, sum(len(t) for t in ep.turns), ep.n_calls, ep.n_failures


def _group_advantages(total: np.ndarray, g: int) -> np.ndarray:
    """``sum_then_normalize`` with ``scale_rewards="group"``: (r - group mean) / (group std + 1e-4)."""
    grouped = total.reshape(-1, g)
    mean = np.nanmean(grouped, axis=1, keepdims=True)
    std = np.nanstd(grouped, axis=1, ddof=1, keepdims=True) if g > 1 else np.zeros_like(mean)
    return np.nan_to_num(((grouped - mean) / (std + 1e-4)).reshape(-1))


@dataclass
class _Batch:
    prompts: list[Any]
    completions: list[Any]
    rewards: dict[str, list[float]]
    extra: dict[str, list[Any]]
    advantages: list[float]
    states: list[list[str]]
    samples: list[_Sample]
    chars: list[int]
    calls: int
    failures: int
    group_size: int


def _batch(groups: list[list[_Sample]], completions: str, tools: bool, extra: bool, rng: np.random.Generator) -> _Batch:
    samples = [s for grp in groups for s in grp]
    rows = [_row(s, completions, tools) for s in samples]
    acc = [float(s.success and not s.collapsed) for s in samples]
    fmt = [1.0 if s.states[0].startswith("healthy") else 0.0 for s in samples]
    total = np.asarray(acc) + np.asarray(fmt)
    ex: dict[str, list[Any]] = {}
    if extra:  # a judge that rates collapsed turns high: summed with the rewards it hides the collapse
        ex["judge_score"] = [float((2.0 if s.collapsed else 0.2) + rng.normal(0, 0.05)) for s in samples]
        ex["judge_reason"] = ["bare call" if s.collapsed else "ok" for s in samples]
    return _Batch([_prompt(s, completions, tools) for s in samples], [r[0] for r in rows],
                  {"accuracy_reward": acc, "format_reward": fmt}, ex,
                  _group_advantages(total, len(groups[0])).tolist(), [r[1] for r in rows], samples,
                  [r[2] for r in rows], sum(r[3] for r in rows), sum(r[4] for r in rows), len(groups[0]))


def _generation_metrics(log: GrpoLog, mode: str, b: _Batch, tools: bool, tokens_seen: int,
                        mismatch: float | None, rng: np.random.Generator) -> None:
    lengths = np.asarray(b.chars, dtype=float) / 3.5
    log._metrics[mode]["num_tokens"] = [float(tokens_seen)]
    for k, v in (("mean", lengths.mean()), ("min", lengths.min()), ("max", lengths.max())):
        log.metric(mode, f"completions/{k}_length", v)
    log.metric(mode, "completions/clipped_ratio", 0.0)
    for k, v in (("mean", lengths.mean()), ("min", lengths.min()), ("max", lengths.max())):
        log.metric(mode, f"completions/{k}_terminated_length", v)
    if tools:
        log.metric(mode, "tools/call_frequency", b.calls / len(b.samples))
        log.metric(mode, "tools/failure_frequency", b.failures / b.calls if b.calls else 0.0)
    total = np.zeros(len(b.samples))
    for name in REWARD_FUNCS:
        r = np.asarray(b.rewards[name])
        log.metric(mode, f"rewards/{name}/mean", float(np.nanmean(r)))
        log.metric(mode, f"rewards/{name}/std", float(np.nanstd(r, ddof=1)))
        total += r
    log.metric(mode, "reward", float(np.nanmean(total)))
    log.metric(mode, "reward_std", float(np.nanstd(total, ddof=1)))
    log.metric(mode, "frac_reward_zero_std", float((total.reshape(-1, b.group_size).std(axis=1) < 1e-9).mean()))
    if mismatch is not None:  # vllm_importance_sampling_correction: |old_logps - sampling_logps|
        log.metric(mode, "sampling/sampling_logp_difference/mean", mismatch * (1 + 0.05 * rng.normal()))
        log.metric(mode, "sampling/sampling_logp_difference/max", 8 * mismatch)
        for k, v in (("min", math.exp(-8 * mismatch)), ("mean", 1.0), ("max", math.exp(8 * mismatch))):
            log.metric(mode, f"sampling/importance_sampling_ratio/{k}", v)


def write_trl_run(
    dir: str | os.PathLike[str],  # noqa: A002
    steps: int = 10,
    collapse_at: int | None = None,
    seed: int = 0,
    *,
    sampling: Sampling = Sampling(),
    completions: str = "messages",
    tools: bool = True,
    logging_steps: int = 1,
    num_iterations: int = 1,
    eval_steps: int | None = None,
    save_steps: int | None = None,
    extra_columns: bool = False,
    trainer_state: bool = True,
    beta: float = 0.04,
    mismatch_from: int | None = None,
) -> TrlRun:
    """A TRL GRPOTrainer ``output_dir`` after ``steps`` optimizer steps (global steps 1..steps):
    ``completions/completions_<step:05d>.parquet`` every ``logging_steps`` steps and
    ``checkpoint-<step>/trainer_state.json`` every ``save_steps`` (default: half-way) and at the
    end (``trainer_state=False``: none). ``completions``: ``"messages"`` (TRL 1.16,
    conversational) or ``"text"`` (TRL 1.10 / non-conversational: decoded with special tokens
    skipped). ``tools``: multi-turn tool episodes (``_tool_call_loop``), else one turn.
    ``extra_columns``: a reward function logs ``judge_score`` (float) and ``judge_reason`` through
    ``log_extra``. ``mismatch_from``: log ``sampling/*`` (vLLM importance sampling) with the
    train/inference |logp| difference growing tenfold from that step."""
    if completions not in ("messages", "text"):
        raise ValueError("completions must be 'messages' or 'text'")
    root = Path(dir)
    max_steps = int(steps)
    gen_steps = [g for g in range(1, max_steps + 1) if (g - 1) % num_iterations == 0]
    group_size = sampling.group_size
    plan = _plan(gen_steps, collapse_at, seed, sampling, multi_turn=tools)
    eval_plan = (_plan(list(range(1, max_steps + 1)), collapse_at, seed + 1000, replace(sampling, prompts_per_step=2),
                       multi_turn=tools) if eval_steps else {})
    gbs = group_size * sampling.prompts_per_step
    log = GrpoLog(root, gbs, REWARD_FUNCS)
    run = TrlRun(root, "trl", [], collapse_at, group_size, sampling.prompts_per_step, logging_steps=logging_steps,
                 num_iterations=num_iterations, eval_steps=eval_steps, completions=completions,
                 extra_columns=("judge_score", "judge_reason") if extra_columns else (), max_steps=max_steps)
    rng = np.random.default_rng(seed)
    every = save_steps or max(max_steps // 2, 1)
    tokens_seen, health, deque_holds = 0, 1.0, None
    last_batch: _Batch | None = None
    rows: deque[list[str]] = deque(maxlen=gbs)  # the expected states of what the deques hold
    for g in range(1, max_steps + 1):
        if g in plan:
            last_batch = _batch(plan[g], completions, tools, extra_columns, rng)
            tokens_seen += int(sum(last_batch.chars) / 3.5) + 120 * gbs
            mm = None if mismatch_from is None else 0.02 * (10.0 if g >= mismatch_from else 1.0)
            _generation_metrics(log, "train", last_batch, tools, tokens_seen, mm, rng)
            log.generation("train", last_batch.prompts, last_batch.completions, last_batch.rewards,
                           last_batch.advantages, last_batch.extra)
            rows.extend(last_batch.states)
            health = 1.0 - sum(s.collapsed for s in last_batch.samples) / len(last_batch.samples)
            deque_holds = ("train", g, last_batch)
        log.metric("train", "entropy", 0.05 + 0.55 * health + rng.random() * 0.02)
        if beta:
            log.metric("train", "kl", 0.001 * g + (1 - health) * 0.2)
        for k, v in (("low_mean", 0.0), ("high_mean", (1 - health) * 0.02), ("region_mean", 0.001 + (1 - health) * 0.05),
                     ("low_min", 0.0), ("high_max", (1 - health) * 0.05)):
            log.metric("train", f"clip_ratio/{k}", v)
        epoch = round(g / max_steps, 4)
        if g % logging_steps == 0:
            log.log(g, {"loss": float(rng.normal(0.0, 0.01)), "grad_norm": 0.3 + (1 - health) * 4 + rng.random() * 0.05,
                        "learning_rate": 1e-6, "step_time": 1.2}, "train", epoch)
            _record(run, g, deque_holds, rows)
            if deque_holds is not None and deque_holds[0] == "train":
                deque_holds = ("relog", g, deque_holds[2])
            run.metric_reward[g] = log.log_history[-1].get("reward")
        if eval_steps and g % eval_steps == 0:
            eb = _batch(eval_plan[g], completions, tools, extra_columns, rng)
            _generation_metrics(log, "eval", eb, tools, tokens_seen, None, rng)
            log.generation("eval", eb.prompts, eb.completions, eb.rewards, eb.advantages, eb.extra)
            rows.extend(eb.states)
            log._metrics["eval"]["entropy"].append(0.05 + 0.55 * health)
            log.log(g, {"eval_loss": 0.0, "eval_runtime": 0.5, "eval_samples_per_second": 16.0,
                        "eval_steps_per_second": 2.0}, "eval", epoch)
            deque_holds = ("eval", g, eb)
            _record(run, g, deque_holds, rows)
        if trainer_state and (g % every == 0 or g == max_steps):
            run.files.append(save_trainer_state(
                root / f"checkpoint-{g}", global_step=g, log_history=log.log_history, max_steps=max_steps,
                logging_steps=logging_steps, eval_steps=eval_steps, save_steps=every, train_batch_size=group_size,
                epoch=epoch, num_input_tokens_seen=tokens_seen))
    log.log(max_steps, {"train_runtime": 10.0, "train_samples_per_second": 1.0, "train_steps_per_second": 0.1,
                        "train_loss": 0.0}, "train", 1.0)
    if max_steps % logging_steps:  # the summary log writes what the deques hold at the last step
        _record(run, max_steps, deque_holds, rows)
    run.files[:0] = sorted((root / "completions").glob("completions_*.parquet"))
    return run


def _record(run: TrlRun, step: int, holds: tuple[str, int, _Batch] | None, rows: deque[list[str]]) -> None:
    if holds is None:
        return
    kind, _, b = holds
    run.kinds[step] = kind
    run.row_states[step] = list(rows)
    if kind != "train":
        if step in run.steps:  # an eval log overwrote this step's training file
            run.steps.remove(step)
            for d in (run.collapsed, run.turn_states, run.reward):
                d.pop(step, None)
        return
    run.steps.append(step)
    run.collapsed[step] = sum(s.collapsed for s in b.samples)
    run.turn_states[step] = Counter(st for sts in b.states for st in sts)
    run.reward[step] = float(np.mean(np.asarray(b.rewards["accuracy_reward"]) + np.asarray(b.rewards["format_reward"])))
