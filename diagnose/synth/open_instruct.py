"""open-instruct's rollout traces, written as its own code writes them (for fixtures and
synthetic runs; nothing here reads a trace).

What each piece follows (allenai/open-instruct, ``open_instruct/``):

* `rollout_record`: ``rl_utils.py`` ``RolloutRecord`` (field order of ``asdict``) as filled by
  ``_save_rollouts``: ``step`` (the data-preparation step, 0-based), ``sample_idx`` (index in
  the batch), ``prompt_idx = sample_idx // num_samples_per_prompt``, ``prompt_tokens``,
  ``response_tokens``, ``reward`` (``batch.scores``), ``advantage``, ``finish_reason``,
  ``dataset``, ``ground_truth``, ``request_info``, ``logprobs``. No text is saved.
* `request_info`: ``rl_utils.py`` ``_get_request_info_for_sample`` from the ``RequestInfo``
  that ``vllm_utils.py`` ``process_completed_request`` builds out of the ``RolloutState``
  (``environments/base.py``) of ``process_request``: ``num_calls`` = ``step_count``,
  ``tool_calleds`` = ``step_count > 0``, ``tool_outputs`` / ``tool_errors`` = the outputs /
  error messages concatenated without separator, ``timeouts`` (bool), ``tool_runtimes``,
  ``tool_call_stats`` (``{"tool_name", "success", "runtime"}`` per call), ``rollout_state``.
* `tool_output_text`: ``vllm_utils.py`` ``process_tool_tokens`` formats each observation with
  ``environments/tools/parsers.py`` ``VLLM_PARSERS["vllm_hermes"]`` (the Qwen2.5 / Hermes
  parser): ``<|im_start|>tool\\n<tool_response>\\n{output}\\n</tool_response>\\n<|im_end|>\\n``
  then the postfix ``<|im_start|>assistant\\n``; one call of it per observation, so parallel
  calls repeat the postfix. Its tokens get log-prob exactly ``0.0``; the mask is not saved.
* `Response`: ``vllm_utils.py`` ``process_request``: each model turn's sampled ids (ending in
  the EOS ``<|im_end|>``, which vLLM keeps) with their log-probs, then the tool-output tokens,
  appended into one response; an empty generation is saved as ``[eos_token_id]`` with log-prob
  NaN (there, and again in ``data_loader.py`` ``process_group`` when ``finish_reason == "stop"``).
* `advantages`: ``data_loader.py`` ``DataPreparationActor._data_preparation_loop`` with
  ``advantage_normalization_type="standard"``: ``(score - group mean) / (group std + 1e-8)``
  (the default, ``"centered"``, is ``score - group mean``).
* `TraceWriter`: ``rl_utils.py`` ``save_rollout_metadata`` (``<run_name>_metadata.jsonl``, one
  line ``run_name, git_commit, model_name, timestamp``) and ``save_rollouts_to_disk`` (shard
  ``<run_name>_rollouts_<total_samples_written // 10000:06d>.jsonl``, one JSON line per
  sample, ``json.dumps`` so NaN is written as ``NaN``), all in ``rollouts_save_path`` (default
  ``/weka/oe-adapt-default/allennlp/deletable_rollouts/``, shared by every run). ``run_name``
  is ``f"{exp_name}__{seed}__{int(time.time())}"`` (``grpo_fast.py``).

Shards are written whole and atomically here (open-instruct appends line by line).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diagnose.atomic import atomic_write_text

__all__ = [
    "DEFAULT_SAVE_PATH",
    "HERMES_POSTFIX",
    "HERMES_TOOL_TEMPLATE",
    "ROLLOUT_SHARD_SIZE",
    "Response",
    "TraceWriter",
    "advantages",
    "legacy_output_text",
    "metadata_name",
    "request_info",
    "rollout_record",
    "run_name_of",
    "shard_name",
    "tool_output_text",
]

#: ``StreamingDataLoaderConfig.rollouts_save_path`` default (``data_loader.py``): every run's traces
DEFAULT_SAVE_PATH = "/weka/oe-adapt-default/allennlp/deletable_rollouts/"
#: ``rl_utils.ROLLOUT_SHARD_SIZE``
ROLLOUT_SHARD_SIZE = 10000
#: ``VLLM_PARSERS["vllm_hermes"].role_templates`` and ``output_postfix``
HERMES_TOOL_TEMPLATE = "<|im_start|>tool\n<tool_response>\n{output}\n</tool_response>\n<|im_end|>\n"
HERMES_USER_TEMPLATE = "<|im_start|>user\n{output}<|im_end|>\n"
HERMES_POSTFIX = "<|im_start|>assistant\n"

Encode = Callable[[str], list[int]]


def run_name_of(exp_name: str, seed: int, unix_time: int) -> str:
    """``grpo_fast.py``: ``args.run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"``."""
    return f"{exp_name}__{seed}__{int(unix_time)}"


def shard_name(run_name: str, shard_idx: int) -> str:
    return f"{run_name}_rollouts_{shard_idx:06d}.jsonl"


def metadata_name(run_name: str) -> str:
    return f"{run_name}_metadata.jsonl"


def legacy_output_text(output: str, wrap: str = "output") -> str:
    """One observation as the default parser formats it (``OpenInstructLegacyToolParser.
    _format_tool_output``; ``process_tool_tokens`` calls it with one output at a time)."""
    return f"<{wrap}>\n{str(output).replace(chr(0), '')}\n</{wrap}>\n"


def tool_output_text(output: str, role: str = "tool") -> str:
    """One observation as ``process_tool_tokens`` formats it with the vllm_hermes parser
    (``format_tool_outputs([output], role)``: template, then the assistant postfix)."""
    template = HERMES_TOOL_TEMPLATE if role == "tool" else HERMES_USER_TEMPLATE
    return template.format(output=str(output).replace("\x00", "")) + HERMES_POSTFIX


@dataclass
class Response:
    """The response ids of one sample as ``process_request`` assembles them."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    #: ``response_masks`` with ``mask_tool_use``: 1 sampled, 0 tool output (never saved: truth)
    masks: list[int] = field(default_factory=list)

    def add_model_turn(self, ids: Sequence[int], logprobs: Sequence[float]) -> None:
        if len(ids) != len(logprobs):
            raise ValueError("one log-prob per sampled token")
        self.tokens.extend(int(i) for i in ids)
        self.logprobs.extend(float(x) for x in logprobs)
        self.masks.extend([1] * len(ids))

    def add_observation(self, encode: Encode, output: str, role: str = "tool", parser: str = "vllm_hermes") -> None:
        """``process_tool_tokens``: ``tokenizer.encode(formatted, add_special_tokens=False)``,
        log-prob ``0.0`` per token; ``parser``: ``vllm_hermes`` or ``legacy``."""
        ids = encode(legacy_output_text(output) if parser == "legacy" else tool_output_text(output, role))
        self.tokens.extend(ids)
        self.logprobs.extend([0.0] * len(ids))
        self.masks.extend([0] * len(ids))

    def finish(self, eos_token_id: int) -> None:
        """``if len(response_tokens) == 0``: one EOS with log-prob NaN."""
        if not self.tokens:
            self.tokens.append(int(eos_token_id))
            self.logprobs.append(math.nan)
            self.masks.append(1)


def request_info(outputs: Sequence[str] = (), *, tool_names: Sequence[str] = (), errors: Sequence[str] = (),
                 timeout: bool = False, runtimes: Sequence[float] = (), rewards: Sequence[float] = (),
                 done: bool = False) -> dict[str, Any]:
    """``_get_request_info_for_sample`` for a rollout whose calls returned ``outputs`` (one per
    executed call, in order; ``errors[k]`` non-empty marks call ``k`` failed)."""
    n = len(outputs)
    errs = list(errors) + [""] * (n - len(errors))
    rts = list(runtimes) + [0.0] * (n - len(runtimes))
    names = list(tool_names) + ["tool"] * (n - len(tool_names))
    stats = [{"tool_name": names[k], "success": not errs[k] and not timeout, "runtime": float(rts[k])}
             for k in range(n)]
    state = {
        "rewards": list(rewards) or [0.0] * n,
        "step_count": n,
        "done": done,
        "info": {},
        "tool_output": "".join(outputs),
        "tool_error": "".join(errs),
        "tool_runtime": float(sum(rts)),
        "timeout": bool(timeout),
        "tool_call_stats": stats,
    }
    return {
        "num_calls": n,
        "timeouts": bool(timeout),
        "tool_errors": state["tool_error"],
        "tool_outputs": state["tool_output"],
        "tool_runtimes": state["tool_runtime"],
        "tool_calleds": n > 0,
        "tool_call_stats": stats,
        "rollout_state": state,
    }


def advantages(scores: Sequence[float], num_samples_per_prompt: int) -> list[float]:
    """GRPO advantages as the data-preparation loop computes them ("standard")."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1, num_samples_per_prompt)
    mean = np.repeat(s.mean(axis=-1), num_samples_per_prompt)
    std = np.repeat(s.std(axis=-1), num_samples_per_prompt)
    return ((s.reshape(-1) - mean) / (std + 1e-8)).tolist()


def rollout_record(*, step: int, sample_idx: int, num_samples_per_prompt: int, prompt_tokens: Sequence[int],
                   response: Response, reward: float, advantage: float, finish_reason: str = "stop",
                   dataset: str = "", ground_truth: Any = None, info: dict[str, Any] | None = None,
                   with_logprobs: bool = True) -> dict[str, Any]:
    """``asdict(RolloutRecord(...))`` as ``_save_rollouts`` fills it."""
    return {
        "step": int(step),
        "sample_idx": int(sample_idx),
        "prompt_idx": int(sample_idx) // num_samples_per_prompt,
        "prompt_tokens": [int(i) for i in prompt_tokens],
        "response_tokens": list(response.tokens),
        "reward": float(reward),
        "advantage": float(advantage),
        "finish_reason": finish_reason,
        "dataset": dataset,
        "ground_truth": ground_truth,
        "request_info": info,
        "logprobs": list(response.logprobs) if with_logprobs else None,
    }


@dataclass
class TraceWriter:
    """The rollout-saving side of ``DataPreparationActor`` for one run: the metadata line at
    start, then each step's batch to shard ``total_samples_written // shard_size``."""

    save_path: Path
    run_name: str
    model_name: str | None = None
    shard_size: int = ROLLOUT_SHARD_SIZE
    git_commit: str = "0000000000000000000000000000000000000000"
    timestamp: str = "2026-01-01T00:00:00+00:00"
    total_samples_written: int = 0
    _shards: dict[int, list[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.save_path = Path(self.save_path)
        self.save_path.mkdir(parents=True, exist_ok=True)
        meta = {"run_name": self.run_name, "git_commit": self.git_commit,
                "model_name": self.model_name or "unknown", "timestamp": self.timestamp}
        atomic_write_text(self.save_path / metadata_name(self.run_name), json.dumps(meta) + "\n")

    def write_batch(self, records: Sequence[dict[str, Any]]) -> None:
        shard = self.total_samples_written // self.shard_size
        self._shards.setdefault(shard, []).extend(json.dumps(r) + "\n" for r in records)
        self.total_samples_written += len(records)

    def close(self) -> list[Path]:
        paths = []
        for shard, lines in sorted(self._shards.items()):
            p = self.save_path / shard_name(self.run_name, shard)
            atomic_write_text(p, "".join(lines))
            paths.append(p)
        return paths
