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

PRESETS: dict[str, dict[str, Any]] = {"smoke": SMOKE}


def preset(name: str) -> dict[str, Any]:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}") from None
