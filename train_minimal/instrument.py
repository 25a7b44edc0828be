"""What a training step records for `diagnose`: token traces, logit-gradient attribution of the
control tokens, rollout rows and the step's metrics. All of it is computed from tensors the loss
already needs, so instrumentation costs gathers, not forward passes.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import polars as pl
import torch

from diagnose.chat import render_chat
from diagnose.control_tokens import ControlTokenRegistry
from diagnose.model.attribution import logit_push
from diagnose.model.logits import TokenStats
from diagnose.rundir.schema import ctrl_column
from diagnose.turns import TurnState

from train_minimal.batch import Batch
from train_minimal.rollout import Trajectory


class TraceCollector:
    """Accumulates token-trace columns over micro-batches (numpy, no per-token Python)."""

    def __init__(self, registry: ControlTokenRegistry, step: int, is_gold: list[bool]):
        self.registry = registry
        self.step = step
        self.is_gold = np.array(is_gold)
        self.parts: list[dict[str, np.ndarray]] = []

    def add(self, mb: Batch, row_offset: int, st: TokenStats) -> None:
        rows, pos = mb.completion_index()
        lp = st.logprob.detach().float().cpu().numpy()
        ent = st.entropy.detach().float().cpu().numpy()
        ctrl = st.ctrl_logprob.detach().float().cpu().numpy()
        sample = rows + row_offset
        part = {
            "step": np.full(len(rows), self.step, dtype=np.int64),
            "sample_id": sample.astype(np.int64),
            "turn": mb.turn.numpy()[rows, pos].astype(np.int32),
            "position": (pos - (np.asarray(mb.prompt_lengths)[rows] - 1)).astype(np.int32),
            "token_id": mb.ids[:, 1:].numpy()[rows, pos].astype(np.int32),
            "logprob": lp[rows, pos],
            "sampler_logprob": mb.sampler_logprob.numpy()[rows, pos],
            "entropy": ent[rows, pos],
            "is_generated": (mb.loss_mask.numpy()[rows, pos] > 0) & ~self.is_gold[sample],
        }
        for k, name in enumerate(self.registry.names):
            part[ctrl_column(name)] = ctrl[rows, pos, k]
        self.parts.append(part)

    def columns(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}


class Attribution:
    """Per control token k, the advantage-weighted push the policy-gradient step puts on its
    logit: ``sum_t A * (1[k = sampled_t] - p_k,t) / |response|``, averaged over samples, split
    into the part from k being sampled ("self") and from other tokens being sampled ("other").

    Gradient descent on ``-A log p(y)`` moves logit k by ``lr * A * (1[k=y] - p_k)``: a positive
    total means the step raises k's logit everywhere it was scored.
    """

    def __init__(self, registry: ControlTokenRegistry):
        self.registry = registry
        self.ctrl_ids = torch.tensor(registry.ids, dtype=torch.long)
        self.self_ = torch.zeros(len(registry.ids))
        self.other = torch.zeros(len(registry.ids))
        self.n_samples = 0

    @torch.no_grad()
    def add(self, mb: Batch, st: TokenStats, advantages: torch.Tensor) -> None:
        s, o = logit_push(mb.ids[:, 1:], st.ctrl_logprob.cpu(), mb.loss_mask, advantages.cpu(), self.ctrl_ids)
        self.self_ += s
        self.other += o
        self.n_samples += len(mb)

    def metrics(self) -> dict[str, float]:
        n = max(self.n_samples, 1)
        out = {}
        for k, name in enumerate(self.registry.names):
            s, o = float(self.self_[k]) / n, float(self.other[k]) / n
            out[f"attribution/{name}/self"] = s
            out[f"attribution/{name}/other"] = o
            out[f"attribution/{name}/total"] = s + o
        return out


def rollout_rows(trajs: list[Trajectory], step: int) -> dict[str, list[Any]]:
    cols: dict[str, list[Any]] = {k: [] for k in (
        "step", "sample_id", "group_id", "task_id", "split", "prompt", "completion", "reward", "accuracy",
        "n_turns", "turn_states", "error_types", "is_hint", "is_off_policy")}
    for i, t in enumerate(trajs):
        ep = t.episode
        prompt = render_chat(t.task.messages, add_generation_prompt=True)
        full = render_chat(ep.messages)
        cols["step"].append(step)
        cols["sample_id"].append(i)
        cols["group_id"].append(t.group)
        cols["task_id"].append(t.task.id)
        cols["split"].append(t.task.split)
        cols["prompt"].append(prompt)
        cols["completion"].append(full[len(prompt):])
        cols["reward"].append(t.reward)
        cols["accuracy"].append(float(ep.score.reward))
        cols["n_turns"].append(len(ep.turn_states))
        cols["turn_states"].append([s.value for s in ep.turn_states])
        cols["error_types"].append([e.value for c in ep.classifications for e in c.errors])
        cols["is_hint"].append(t.kind == "hint")
        cols["is_off_policy"].append(t.kind == "gold")
    return cols


def rollout_metrics(trajs: list[Trajectory], group_size: int) -> dict[str, float]:
    """Metrics of the on-policy rollouts (hinted and gold group members excluded, so the curves
    show what the policy does on its own)."""
    own = [t for t in trajs if t.kind == "policy"]
    if not own:
        return {}
    states = Counter(s.value for t in own for s in t.episode.turn_states)
    errors = Counter(e.value for t in own for c in t.episode.classifications for e in set(c.errors))
    n_turns = sum(states.values())
    rewards = np.array([t.reward for t in own])
    groups: dict[int, list[float]] = {}
    for t in own:
        groups.setdefault(t.group, []).append(t.reward)
    group_std = [float(np.std(v)) for v in groups.values() if len(v) > 1]
    gen_len = [sum(1 for m, tn in zip(t.seq.loss_mask, t.seq.turn) if m and tn >= 0) for t in own]
    out = {
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "accuracy": float(np.mean([t.episode.score.reward for t in own])),
        "calls_right": float(np.mean([t.episode.score.calls_right for t in own])),
        "group_reward_std": float(np.mean(group_std)) if group_std else 0.0,
        "frac_reward_zero_std": float(np.mean([s == 0 for s in group_std])) if group_std else 1.0,
        "completions/mean_length": float(np.mean(gen_len)),
        "completions/truncated": float(np.mean([t.truncated for t in own])),
        "turns_per_episode": float(np.mean([len(t.episode.turn_states) for t in own])),
        "tool_calls_per_episode": float(np.mean([t.episode.score.well_formed_calls for t in own])),
    }
    for s in TurnState:
        out[f"turn_state/{s.value}"] = states.get(s.value, 0) / max(n_turns, 1)
    for e, n in errors.items():
        out[f"format_error/{e}"] = n / max(n_turns, 1)
    return out


def frame(columns: dict[str, Any]) -> pl.DataFrame:
    return pl.DataFrame(columns)
