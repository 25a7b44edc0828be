"""TRL GRPOTrainer's on-disk outputs, written the way TRL's own code writes them.

Shared by `diagnose.synth.foreign.write_trl_run` and the test fixtures of
``tests/fixtures/trl_layout.py``. Each piece follows ``trl/trainer/grpo_trainer.py`` of TRL
1.16.0 (and 1.10.0.dev where it differs):

* `GrpoLog`: ``GRPOTrainer.__init__`` (``self._logs``: deques of ``maxlen=generation_batch_size``
  shared by train and eval; ``self._metrics[mode]``), ``_generate_and_score_completions``
  (``_logs[...].extend`` of the gathered batch: ``prompt``, ``completion``, one column per
  reward function, ``log_extra`` columns, ``advantages``) and ``GRPOTrainer.log`` (metrics
  averaged with NaN left out, ``None`` when none is left, ``eval_`` prefix in eval mode, then
  ``pd.DataFrame({step, prompt, completion, **rewards, **extra, advantage}).to_parquet(
  <output_dir>/completions/completions_{global_step:05d}.parquet)`` on the main process, from
  whatever the deques hold). ``transformers.Trainer.log`` appends ``{**logs, "epoch", "step"}`` to
  ``state.log_history``.
* `save_trainer_state`: ``TrainerState.save_to_json`` (``json.dumps(asdict(state), indent=2,
  sort_keys=True) + "\\n"``; NaN written as ``NaN``), in ``checkpoint-<step>/`` at each save.
* `episode`: ``GRPOTrainer._generate`` + ``_tool_call_loop``: each generated turn parsed with
  ``trl.chat_template_utils.parse_response`` (`parse_response_text`), tool messages
  ``{"role": "tool", "name", "content": str(result)}`` appended after a turn with ``tool_calls``,
  the loop ending at the first turn without. 1.16 logs conversational prompts/completions as
  those message lists; 1.10 (and non-conversational data) logs
  ``batch_decode(ids, skip_special_tokens=True)`` text, in which the tool suffix of
  ``_get_tool_suffix_ids`` (Qwen2.5: ``\\n<|im_start|>user\\n<tool_response>\\n...\\n</tool_response>
  <|im_end|>\\n<|im_start|>assistant\\n``) survives as ``\\nuser\\n<tool_response>...
  </tool_response>\\nassistant\\n``.

At the text level, decoding byte-level BPE ids with ``skip_special_tokens=True`` is deleting the
special tokens' strings (`skip_special`); the fixtures check `parse_response_text` against TRL's
real ``parse_response`` on real Qwen2.5 ids.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diagnose.chat import IM_END, IM_START, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, skip_special

__all__ = [
    "GrpoLog",
    "episode",
    "parse_response_text",
    "save_trainer_state",
    "tool_content",
    "tool_suffix_text",
]

_BLOCK = re.compile(r"<tool_call>\s*(.+?)\s*</tool_call>\s*", re.DOTALL)


def parse_response_text(text: str) -> dict[str, Any]:
    """``trl.chat_template_utils.parse_response`` (1.16) with the response template that
    ``add_response_schema`` sets for Qwen2.5's chat template (``qwen3_template``), on the text of
    one generated turn (special tokens kept, ``<|im_end|>`` included when generated).

    Content before ``<|im_end|>``; ``<tool_call>`` blocks whose bodies are JSON objects with a
    string ``name`` become ``tool_calls`` (``{"type": "function", "function": {...}}``, missing
    ``arguments`` -> ``{}``) and text before or after them becomes ``content`` (stripped);
    anything malformed falls back to the turn decoded with special tokens skipped."""
    end = text.find(IM_END)
    body = text if end < 0 else text[:end]
    first = body.find(TOOL_CALL_OPEN)
    if first < 0:
        return {"role": "assistant", "content": body.strip()}
    calls, pos, tail = [], first, ""
    while pos < len(body):
        m = _BLOCK.match(body, pos)
        if m is None:
            tail = body[pos:]
            break
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            return {"role": "assistant", "content": skip_special(text)}
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return {"role": "assistant", "content": skip_special(text)}
        if obj.get("arguments") is None:
            obj["arguments"] = {}
        calls.append({"type": "function", "function": obj})
        pos = m.end()
    if TOOL_CALL_OPEN in tail or TOOL_CALL_CLOSE in tail:  # an unclosed or stray block
        return {"role": "assistant", "content": skip_special(text)}
    content = (body[:first] + tail).strip()
    return {"role": "assistant", "tool_calls": calls, "content": content} if calls else \
        {"role": "assistant", "content": content}


def tool_content(result: Any) -> str:
    """The ``content`` TRL gives a tool message: ``str(result)`` of what the tool returned
    (a JSON observation string of ours is read back to the object a Python tool would return)."""
    if isinstance(result, str):
        try:
            result = json.loads(result)
        except ValueError:
            return result
    return str(result)


def tool_suffix_text(contents: Sequence[str]) -> str:
    """The ids ``_get_tool_suffix_ids`` appends after a turn's ``<|im_end|>`` for these tool
    messages, as text (Qwen2.5 chat template, EOS-trimmed prefix)."""
    body = "".join(f"\n<tool_response>\n{c}\n</tool_response>" for c in contents)
    return f"\n{IM_START}user{body}{IM_END}\n{IM_START}assistant\n"


@dataclass
class Episode:
    """One rollout as TRL logs it: ``messages`` (the 1.16 conversational completion), ``text``
    (1.10 / decoded completion) and the generated turn texts (special tokens kept)."""

    messages: list[dict[str, Any]]
    text: str
    turns: list[str]
    n_calls: int
    n_failures: int


def episode(turns: Sequence[str], observations: Sequence[Sequence[Any]], *, max_iterations: int | None = None,
            tool_names: Sequence[str] | None = None) -> Episode:
    """Run ``_tool_call_loop`` over scripted turns (each the text the model generates, without
    the ``<|im_end|>`` it ends with) and the tool results after each: a turn is parsed; with
    ``tool_calls`` each call gets a tool message (the next scripted result, or TRL's
    ``{"error": "Tool <name> not found."}`` for a name outside ``tool_names``), then the next turn
    is generated; the loop stops at a turn without calls or after ``max_iterations`` rounds."""
    messages: list[dict[str, Any]] = []
    ids_text = ""
    generated: list[str] = []
    n_calls = n_fail = 0
    for i, turn in enumerate(turns):
        raw = turn + IM_END
        generated.append(raw)
        ids_text += raw
        msg = parse_response_text(raw)
        messages.append(msg)
        calls = msg.get("tool_calls") or []
        if not calls or i + 1 >= len(turns) or (max_iterations is not None and i >= max_iterations):
            break
        results = list(observations[i]) if i < len(observations) else []
        contents = []
        for k, c in enumerate(calls):
            n_calls += 1
            name = c["function"]["name"]
            if tool_names is not None and name not in tool_names:
                n_fail += 1
                res: Any = {"error": f"Tool {name} not found."}
            else:
                res = results[k] if k < len(results) else {"error": "no result"}
            contents.append(tool_content(res))
            messages.append({"role": "tool", "name": name, "content": contents[-1]})
        ids_text += tool_suffix_text(contents)
    return Episode(messages, skip_special(ids_text), generated, n_calls, n_fail)


# ---- GRPOTrainer._logs / _metrics / log ----------------------------------------------


def _to_parquet(table: Mapping[str, Any], path: Path) -> None:
    """``pd.DataFrame(table).to_parquet(path)`` as TRL calls it (pyarrow engine); without pandas,
    the same Arrow types from pyarrow's own inference (pandas hands object columns to it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import pandas as pd
    except ImportError:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({k: pa.array(list(v)) for k, v in table.items()}), path)
        return
    pd.DataFrame(table).to_parquet(path)


@dataclass
class GrpoLog:
    """What ``GRPOTrainer`` keeps between logging steps and writes at each ``log`` call.

    ``decoded``: log prompts/completions as decoded text (TRL 1.10, or non-conversational data)
    instead of message lists (TRL 1.16 conversational)."""

    output_dir: Path
    generation_batch_size: int
    reward_func_names: Sequence[str]
    log_completions: bool = True
    log_history: list[dict[str, Any]] = field(default_factory=list)
    written: dict[int, list[str]] = field(default_factory=dict)  #: step -> modes of the writes

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        n = self.generation_batch_size
        self._logs: dict[str, Any] = {
            "prompt": deque(maxlen=n), "completion": deque(maxlen=n),
            "rewards": defaultdict(lambda: deque(maxlen=n)), "advantages": deque(maxlen=n),
            "extra": defaultdict(lambda: deque(maxlen=n)),
        }
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        if self.log_completions:
            os.makedirs(self.output_dir / "completions", exist_ok=True)

    def metric(self, mode: str, name: str, value: float) -> None:
        """``self._metrics[mode][name].append(value)``."""
        self._metrics[mode][name].append(float(value))

    def generation(self, mode: str, prompts: Sequence[Any], completions: Sequence[Any],
                   rewards: Mapping[str, Sequence[float]], advantages: Sequence[float],
                   extra: Mapping[str, Sequence[Any]] | None = None) -> None:
        """The ``_logs`` part of ``_generate_and_score_completions`` for one gathered batch (the
        reward metrics are the caller's: `metric`)."""
        self._logs["prompt"].extend(prompts)
        self._logs["completion"].extend(completions)
        for name in self.reward_func_names:
            self._logs["rewards"][name].extend(float(v) for v in rewards[name])
        self._logs["advantages"].extend(float(a) for a in advantages)
        for column in sorted(extra or {}):
            self._logs["extra"][column].extend(extra[column])

    def log(self, step: int, logs: dict[str, Any], mode: str = "train", epoch: float | None = None) -> None:
        """``GRPOTrainer.log`` then ``Trainer.log``: metrics averaged (NaN left out, None if none
        left), ``eval_`` prefixed in eval mode, the entry appended to ``log_history``, and the
        completions table of the deques written to ``completions_{step:05d}.parquet``."""
        metrics: dict[str, Any] = {}
        for key, val in self._metrics[mode].items():
            valid = [v for v in val if not math.isnan(v)]
            metrics[key] = sum(valid) / len(valid) if valid else None
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs = {**logs, **metrics}
        if epoch is not None:
            logs["epoch"] = epoch
        self.log_history.append({**logs, "step": step})
        self._metrics[mode].clear()
        if not self.log_completions:
            return
        table = {
            "step": [step] * len(self._logs["prompt"]),
            "prompt": list(self._logs["prompt"]),
            "completion": list(self._logs["completion"]),
            **{k: list(v) for k, v in self._logs["rewards"].items()},
            **{k: list(v) for k, v in self._logs["extra"].items()},
            "advantage": list(self._logs["advantages"]),
        }
        _to_parquet(table, self.output_dir / "completions" / f"completions_{step:05d}.parquet")
        self.written.setdefault(step, []).append(mode)


def save_trainer_state(folder: str | os.PathLike[str], *, global_step: int, log_history: Sequence[Mapping[str, Any]],
                       max_steps: int, logging_steps: int, eval_steps: int | None, save_steps: int,
                       train_batch_size: int, epoch: float, num_input_tokens_seen: int = 0) -> Path:
    """``TrainerState.save_to_json`` (transformers ``trainer_callback.py``) into ``folder``: every
    field of the dataclass, ``indent=2, sort_keys=True`` (so NaN is written as ``NaN``)."""
    state = {
        "best_global_step": None, "best_metric": None, "best_model_checkpoint": None, "epoch": epoch,
        "eval_steps": eval_steps if eval_steps is not None else logging_steps, "global_step": global_step,
        "is_hyper_param_search": False, "is_local_process_zero": True, "is_world_process_zero": True,
        "log_history": [dict(e) for e in log_history], "logging_steps": logging_steps, "max_steps": max_steps,
        "num_input_tokens_seen": num_input_tokens_seen, "num_train_epochs": 1, "save_steps": save_steps,
        "stateful_callbacks": {"TrainerControl": {"args": {
            "should_epoch_stop": False, "should_evaluate": False, "should_log": False, "should_save": True,
            "should_training_stop": global_step >= max_steps}, "attributes": {}}},
        "total_flos": 0.0, "train_batch_size": train_batch_size, "trial_name": None, "trial_params": None,
    }
    path = Path(folder) / "trainer_state.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path

