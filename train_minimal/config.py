"""Trainer configuration: one dataclass per concern (TRL-style ``...Config``), loaded from
TOML/YAML or a preset, overridden from the CLI with dotted keys (``grpo.lr=3e-4``).

Why strict: a typo in an RL config silently trains the wrong run for hours. Unknown keys and
wrong types are one-line errors that name the key.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from diagnose.tasks.episode import OnMalformed


class ConfigError(ValueError):
    """A bad configuration; the message names the key."""


@dataclass
class ModelConfig:
    path: str = "tiny"  # "tiny" = embedded default (random init), "tiny-base" = embedded base model; or any HF model dir
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: str = "auto"  # auto: cuda if available
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    train_tasks: int = 512  # size of the training task pool (split "train")
    eval_tasks: int = 64  # per eval split (test, content_ood, format_ood)
    task_file: str = ""  # optional user task JSONL (replaces the generated train pool)
    seed: int = 0


@dataclass
class RolloutConfig:
    backend: Literal["hf", "vllm"] = "hf"
    prompts_per_step: int = 8
    group_size: int = 8  # n rollouts per prompt (GRPO group)
    max_turns: int = 5
    on_malformed: OnMalformed = "end"  # a turn whose call attempts are all malformed:
    #   "end" the episode there (it is the final answer), or "continue" with one error output per attempt
    max_new_tokens: int = 64  # per assistant turn
    temperature: float = 1.0
    top_p: float = 1.0
    vllm_gpu_memory_utilization: float = 0.4


@dataclass
class SFTConfig:
    steps: int = 0  # SFT warm-start steps (0 = none)
    lr: float = 1e-3
    batch_size: int = 16
    warmup_steps: int = 10
    # Pretraining-style warm start (the embedded base model was trained this way, see docs/models.md):
    system_prompt_rate: float = 1.0  # share of examples that keep the system prompt (tool schemas);
    #   dropping it makes sequences ~2.4x shorter, so more steps fit in the same CPU time
    context_loss_weight: float = 0.0  # LM loss weight on non-assistant tokens (user, tool outputs)
    # Mid-training mix (how the base v2 was made, docs/models.md):
    ood_rate: float = 0.0  # share of examples from the content_ood families and the format_ood syntax
    #   (half each; other instances than the eval sets'; format_ood always keeps its system prompt,
    #   the only cue to its call syntax)
    truncated_call_rate: float = 0.0  # share of examples cut at one call turn: the assistant writes
    #   `<tool_call>\n` and ends the turn (gives the base a prior of a bare call, as Qwen2.5 has)


@dataclass
class GRPOConfig:
    steps: int = 0
    lr: float = 1e-4
    warmup_steps: int = 5
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"  # after warm-up; linear/cosine decay towards 0
    beta: float = 0.0  # KL to the frozen reference (k3 estimator); 0 = no reference model
    epsilon: float = 0.2  # clip range low
    epsilon_high: float = 0.2  # clip range high (DAPO's clip-higher when > epsilon)
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    scale_rewards: bool = True  # divide advantages by the group std (Dr. GRPO: False)
    # token-mean: every trained token of the step weighs the same (verl's default, TRL "dapo");
    # seq-mean-token-mean: every sequence weighs the same (verl's mode of that name, TRL "grpo")
    loss_agg: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    micro_batch_size: int = 16


@dataclass
class SupervisionConfig:
    """Supervisory signals; they combine. See docs/trainer.md."""

    off_policy_k: int = 0  # of group_size rollouts, k replaced by the gold trajectory
    off_policy_gamma: float = 0.1  # shaping f(w) = w / (w + gamma) of the off-policy importance weight
    hint_k: int = 0  # of group_size rollouts, k sampled with a hint in the system prompt
    # SFT-type supervision and how it is applied:
    #   sft_data "failed" = erroneous-example supervision (gold of tasks the policy failed in the
    #   last `failed_window` RL steps); "train" = gold of random training tasks.
    sft_schedule: Literal["none", "synchronous", "interleaved"] = "none"
    sft_data: Literal["failed", "train"] = "failed"
    failed_window: int = 10
    sft_weight: float = 0.1  # synchronous: weight of the SFT loss mixed into each RL step
    interleave_rl_steps: int = 10  # interleaved: RL phase length
    interleave_sft_steps: int = 2  # interleaved: SFT phase length
    sft_batch_size: int = 16


@dataclass
class LogConfig:
    traces: bool = True  # token-level traces of every rollout
    probe_every: int = 5  # fixed control-token probe every K steps (0 = off)
    probe_tasks: int = 8
    attribution: bool = True  # logit-gradient attribution of control tokens
    eval_every: int = 10  # greedy eval on held-out splits (0 = off)
    checkpoint_every: int = 50
    keep_checkpoints: int = 3


@dataclass
class TrainConfig:
    name: str = "run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        r, s = self.rollout, self.supervision
        if r.group_size < 2:
            raise ConfigError("rollout.group_size: GRPO needs at least 2 rollouts per group")
        if s.off_policy_k + s.hint_k >= r.group_size:
            raise ConfigError("supervision.off_policy_k + hint_k must leave at least one plain rollout per group")
        for key, v in (("sft.ood_rate", self.sft.ood_rate), ("sft.truncated_call_rate", self.sft.truncated_call_rate)):
            if not 0 <= v <= 1:
                raise ConfigError(f"{key}: must be in [0, 1], got {v}")
        for key, v in (("sft.lr", self.sft.lr), ("grpo.lr", self.grpo.lr), ("rollout.temperature", r.temperature)):
            if not v > 0:
                raise ConfigError(f"{key}: must be > 0, got {v}")
        check_bounds(self.to_dict())
        return self


# Numeric bounds. Why: a negative step count trained nothing and exited 0, a zero interval
# divided by zero a step into the run, an infinite temperature sampled garbage for hours.
AT_LEAST_1 = ("data.train_tasks", "rollout.prompts_per_step", "rollout.max_turns", "rollout.max_new_tokens",
              "sft.batch_size", "grpo.micro_batch_size", "supervision.interleave_rl_steps",
              "supervision.sft_batch_size", "log.probe_tasks", "log.checkpoint_every")
FRACTIONS = ("sft.system_prompt_rate", "sft.ood_rate", "sft.truncated_call_rate")  # in [0, 1]
OPEN_FRACTIONS = ("rollout.top_p", "rollout.vllm_gpu_memory_utilization")  # in (0, 1]


def check_bounds(data: dict[str, Any], prefix: str = "") -> None:
    """Every number finite and >= 0, counts and intervals that divide >= 1, shares within [0, 1];
    the first violation is a ConfigError naming the key."""
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            check_bounds(v, f"{key}.")
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v):
            raise ConfigError(f"{key}: must be a finite number, got {v}")
        if key in OPEN_FRACTIONS and not 0 < v <= 1:
            raise ConfigError(f"{key}: must be in (0, 1], got {v}")
        if key in FRACTIONS and not 0 <= v <= 1:
            raise ConfigError(f"{key}: must be in [0, 1], got {v}")
        if key in AT_LEAST_1 and v < 1:
            raise ConfigError(f"{key}: must be >= 1, got {v}")
        if v < 0:
            raise ConfigError(f"{key}: must be >= 0, got {v}")


# ---------------------------------------------------------------- dict -> dataclass, strictly


def _check_value(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_value(key, arg, value)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp in (int, bool, str):
        if type(value) is not tp:
            raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return from_dict(tp, value, prefix=f"{key}.")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        if k not in hints:
            close = difflib.get_close_matches(k, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{k}'{hint}")
        kwargs[k] = _check_value(f"{prefix}{k}", hints[k], v)
    return cls(**kwargs)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``"grpo.lr=3e-4"`` -> ``{"grpo": {"lr": 3e-4}}``; the value is read as TOML, else a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. grpo.lr=3e-4")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror or exc}") from None
    text = decode_text(p, raw)
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except Exception as exc:  # parser errors carry line numbers in their message
        raise ConfigError(f"{p}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a table of settings at top level")
    return data


def decode_text(p: Path, raw: bytes) -> str:
    """A config file's text: UTF-8 (a BOM allowed), or UTF-16 with its BOM (as some Windows
    editors save it); anything else, a binary file included, is a ConfigError naming the file."""
    for bom, enc in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if raw.startswith(bom):
            break
    else:
        enc = "utf-8"
    try:
        text = raw.decode(enc)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not a text config (invalid {exc.encoding} at byte {exc.start}): "
                          "a binary file? save it as UTF-8 TOML or YAML") from None
    if "\x00" in text:
        raise ConfigError(f"{p}: not a text config (NUL characters): a binary file? save it as UTF-8 TOML or YAML")
    return text


def build_config(base: dict[str, Any] | None = None, file: str | Path | None = None,
                 overrides: list[str] = ()) -> TrainConfig:
    data = dict(base or {})
    if file:
        data = merge(data, load_file(file))
    for item in overrides:
        data = merge(data, parse_override(item))
    return from_dict(TrainConfig, data).validate()
