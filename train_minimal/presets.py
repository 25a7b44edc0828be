"""Named configurations on the embedded tiny model (2 CPU cores). Each is a dict of overrides
on `TrainConfig` defaults, so `--set` can still change any field."""

from __future__ import annotations

from typing import Any

SMOKE: dict[str, Any] = {
    "name": "smoke",
    "data": {"train_tasks": 16, "eval_tasks": 2},
    "rollout": {"prompts_per_step": 2, "group_size": 4, "max_turns": 3, "max_new_tokens": 32},
    "sft": {"steps": 3, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1},
    "grpo": {"steps": 3, "lr": 1e-4, "warmup_steps": 1, "micro_batch_size": 8},
    "log": {"probe_every": 2, "probe_tasks": 2, "eval_every": 3, "checkpoint_every": 3},
}

# The embedded base model (`tiny-base`): the tiny model trained from random weights to have the
# skill, as every real RL run starts from a pretrained model. Pretraining-style: most examples
# without the (long) system prompt, a small LM loss on user and tool tokens. ~700 steps is where
# copying ids and names from the context appears (before it, loss plateaus at 0.35 with 0 accuracy).
# About 25 min on one CPU core; its weights ship with the package (docs/models.md).
BASE: dict[str, Any] = {
    "name": "tiny-base",
    "data": {"train_tasks": 6000, "eval_tasks": 24},
    "sft": {"steps": 720, "batch_size": 32, "lr": 2e-3, "warmup_steps": 10,
            "system_prompt_rate": 0.2, "context_loss_weight": 0.3},
    "grpo": {"micro_batch_size": 8},
    "log": {"probe_every": 0, "eval_every": 120, "checkpoint_every": 120, "keep_checkpoints": 2},
}

# Mid-training of the base (v2 = v1 + these steps, docs/models.md): the same pretraining-style
# examples, 30 % of them from the content_ood families and the format_ood call syntax (so that
# the base scores above 0 out of distribution before RL), and 0.5 % of them cut at a call turn
# to a bare `<tool_call>\n` that ends the turn (a prior of a bare call, as Qwen2.5 has; the v1
# base has p(<|im_end|> | <tool_call>\n) ~ 1e-5).
BASE_MIX: dict[str, Any] = {
    **BASE,
    "name": "tiny-base-mix",
    "model": {"path": "tiny-base"},
    "sft": {"steps": 200, "batch_size": 32, "lr": 1e-3, "warmup_steps": 10, "system_prompt_rate": 0.2,
            "context_loss_weight": 0.3, "ood_rate": 0.3, "truncated_call_rate": 0.005},
    "log": {"probe_every": 0, "eval_every": 50, "checkpoint_every": 50, "keep_checkpoints": 2},
}

# RL from the base: a short SFT warm start with the system prompt, then RL-only GRPO at a high
# learning rate (linear decay, TRL's default scheduler) with no KL anchor. Found by experiment
# (docs/experiments.md), not by touching rewards, sampler or data.
COLLAPSE: dict[str, Any] = {
    "name": "collapse",
    "model": {"path": "tiny-base"},
    "data": {"train_tasks": 512, "eval_tasks": 16},
    "rollout": {"prompts_per_step": 4, "group_size": 8, "max_turns": 4, "max_new_tokens": 64},
    "sft": {"steps": 10, "batch_size": 16, "lr": 1e-3, "warmup_steps": 5},
    "grpo": {"steps": 20, "lr": 1e-3, "warmup_steps": 2, "lr_schedule": "linear", "beta": 0.0,
             "micro_batch_size": 8},
    "log": {"probe_every": 1, "probe_tasks": 8, "eval_every": 10, "checkpoint_every": 2, "keep_checkpoints": 20},
}

# The same start and RL settings with supervisory signals: interleaved SFT on recently failed
# tasks (1 SFT step after every RL step) and off-policy supervision (1 of 8 rollouts per group
# is the gold trajectory).
STABLE: dict[str, Any] = {
    **COLLAPSE,
    "name": "stable",
    "supervision": {"off_policy_k": 1, "sft_schedule": "interleaved", "sft_data": "failed",
                    "interleave_rl_steps": 1, "interleave_sft_steps": 1, "failed_window": 6,
                    "sft_batch_size": 16},
}

# The synchronous schedule of the same signals, for the comparison in docs/experiments.md: the
# SFT loss on recently failed tasks is mixed into every RL step (weight 1) instead of
# alternating phases, with the same off-policy gold member per group.
SYNC: dict[str, Any] = {
    **COLLAPSE,
    "name": "sync",
    "supervision": {"off_policy_k": 1, "sft_schedule": "synchronous", "sft_data": "failed", "sft_weight": 1.0,
                    "failed_window": 6, "sft_batch_size": 16},
}

PRESETS: dict[str, dict[str, Any]] = {"smoke": SMOKE, "base": BASE, "base-mix": BASE_MIX, "collapse": COLLAPSE,
                                      "stable": STABLE, "sync": SYNC}


def preset(name: str) -> dict[str, Any]:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}") from None
