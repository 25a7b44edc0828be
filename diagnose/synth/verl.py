"""verl's on-disk outputs, written the way verl's own code writes them.

Shared by `diagnose.synth.foreign.write_verl_run` (text level, no tokenizer) and the test
fixtures of ``tests/fixtures/verl_layout.py`` (real Qwen2.5 token ids). Each piece follows
verl 0.8.0.dev:

* `tool_agent_episode`: the conversation flow of ``ToolAgentLoop.run`` and its
  ``_handle_generating_state`` / ``_handle_processing_tools_state``
  (``verl/experimental/agent_loop/tool_agent_loop.py``): one generated turn at a time, the
  Hermes tool parser (``HermesToolParser.extract_tool_calls``, ``tool_parser.py``) decides
  whether tools run, at most ``max_parallel_calls`` tool messages, tool text truncated as
  ``_call_tool`` does, the termination checks, ``num_turns = user + assistant + 1``.
* `verl_dump_text`: the text of that episode as the rollout dump shows it -- the ids
  (``AgentLoopBase.apply_chat_template``, ``remove_system_prompt=True`` cutting
  ``initialize_system_prompt`` of ``verl/utils/chat_template.py``) decoded with
  ``skip_special_tokens=True`` (``RayPPOTrainer._log_rollout_data``). At the text level,
  decoding concatenated byte-level BPE ids is concatenating the decoded pieces, and skipping
  special tokens is deleting their strings; the fixtures check this against real ids.
* `dump_generations`: ``RayPPOTrainer._dump_generations`` (``verl/trainer/ppo/ray_trainer.py``).
* `FileLogger`: ``verl/utils/tracking.py`` ``FileLogger`` (path rule, ``"wb"``, orjson lines).
* `save_checkpoint`: ``RayPPOTrainer._save_checkpoint`` (``global_step_<N>/actor`` +
  ``latest_checkpointed_iteration.txt`` under ``trainer.default_local_dir``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diagnose.chat import IM_END, render_chat, skip_special

__all__ = [
    "FileLogger",
    "ToolLoopConfig",
    "dump_generations",
    "hermes_tool_calls",
    "orjson_dumps",
    "save_checkpoint",
    "system_prompt_text",
    "tool_agent_episode",
    "verl_dump_text",
]

_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolLoopConfig:
    """``actor_rollout_ref.rollout.multi_turn`` settings the tool agent loop reads, with verl's
    defaults (``verl/trainer/config/_generated_ppo_trainer.yaml``), and ``response_length``
    (``rollout.response_length``; None: not checked, as at the text level)."""

    max_assistant_turns: int | None = None
    max_user_turns: int | None = None
    max_parallel_calls: int = 1
    max_tool_response_length: int = 256
    tool_response_truncate_side: str = "middle"
    response_length: int | None = None


def hermes_tool_calls(text: str) -> list[dict[str, Any]]:
    """The calls ``HermesToolParser.extract_tool_calls`` finds: none unless both tags are in the
    text; each ``<tool_call>...</tool_call>`` whose JSON has ``name`` and ``arguments``."""
    if "<tool_call>" not in text or "</tool_call>" not in text:
        return []
    calls = []
    for body in _HERMES.findall(text):
        try:
            obj = json.loads(body)
            calls.append({"name": obj["name"], "arguments": obj["arguments"]})
        except (ValueError, KeyError, TypeError):
            continue
    return calls


def _truncate_tool_text(text: str, cfg: ToolLoopConfig) -> str:
    """``ToolAgentLoop._call_tool``'s truncation of a long tool response."""
    n = cfg.max_tool_response_length
    if not text or len(text) <= n:
        return text
    if cfg.tool_response_truncate_side == "left":
        return text[:n] + "...(truncated)"
    if cfg.tool_response_truncate_side == "right":
        return "(truncated)..." + text[-n:]
    half = n // 2
    return text[:half] + "...(truncated)..." + text[-half:]


def tool_agent_episode(
    turns: Sequence[str],
    observations: Sequence[Sequence[str]],
    encode_turn: Callable[[str], Sequence[Any]],
    encode_tools: Callable[[list[dict[str, Any]]], Sequence[Any]],
    cfg: ToolLoopConfig = ToolLoopConfig(),
) -> tuple[list[tuple[Sequence[Any], int]], int]:
    """``(pieces, num_turns)`` of one episode as ``ToolAgentLoop.run`` assembles it: pieces are
    ``(encoded, mask)`` in order -- a generated turn (``encode_turn``: its text plus EOS; mask 1)
    or the tool messages after it (``encode_tools``; mask 0).

    ``turns`` are the model's turns in order (the script of the episode), ``observations[i]``
    what the tools return for turn ``i``'s calls. Generation stops as verl's loop does: no
    parsable call, ``response_length`` reached, a turn limit, or a tool response that does not
    fit; and when the script has no next turn."""
    pieces: list[tuple[Sequence[Any], int]] = []
    n_mask = assistant = user = 0
    for i, turn in enumerate(turns):
        ids = encode_turn(turn)
        pieces.append((ids, 1))
        n_mask += len(ids)
        assistant += 1
        if cfg.response_length is not None and n_mask >= cfg.response_length:
            break
        if cfg.max_assistant_turns and assistant >= cfg.max_assistant_turns:
            break
        if cfg.max_user_turns and user >= cfg.max_user_turns:
            break
        calls = hermes_tool_calls(turn)
        if not calls or i + 1 >= len(turns):
            break
        obs = list(observations[i]) if i < len(observations) else []
        n_calls = min(len(calls), cfg.max_parallel_calls)
        msgs = [{"role": "tool", "content": _truncate_tool_text(obs[k] if k < len(obs) else
                                                                "Error when executing tool: no result", cfg)}
                for k in range(n_calls)]
        tool_ids = encode_tools(msgs)
        if cfg.response_length is not None and n_mask + len(tool_ids) >= cfg.response_length:
            break
        pieces.append((tool_ids, 0))
        n_mask += len(tool_ids)
        user += 1
    return pieces, user + assistant + 1


def system_prompt_text(render: Callable[..., str] = render_chat) -> str:
    """``initialize_system_prompt`` at the text level: the template's default system turn, which
    ``apply_chat_template(..., remove_system_prompt=True)`` cuts off."""
    one = render([{"role": "user", "content": ""}])
    two = render([{"role": "user", "content": ""}] * 2)
    return one[: len(one) - (len(two) - len(one))]


def verl_dump_text(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    turns: Sequence[str],
    observations: Sequence[Sequence[str]],
    cfg: ToolLoopConfig = ToolLoopConfig(),
) -> tuple[str, str, int]:
    """``(input, output, num_turns)`` of one tool-agent episode as the rollout dump shows it,
    without a tokenizer (Qwen2.5 template via `diagnose.chat.render_chat`, EOS ``<|im_end|>``)."""
    system = system_prompt_text()
    prompt = render_chat(list(messages), list(tools) if tools else None, add_generation_prompt=True)
    pieces, num_turns = tool_agent_episode(
        turns, observations, lambda t: t + IM_END,
        lambda msgs: render_chat(msgs, add_generation_prompt=True)[len(system):], cfg)
    response = "".join(str(p) for p, _ in pieces)
    return skip_special(prompt), skip_special(response), num_turns


def dump_generations(dump_path: str | os.PathLike[str], step: int, inputs: Sequence[str], outputs: Sequence[str],
                     gts: Sequence[Any], scores: Sequence[float],
                     reward_extra_infos: Mapping[str, Sequence[Any]] | None = None) -> Path:
    """``RayPPOTrainer._dump_generations``: ``<dump_path>/<step>.jsonl``, one ``json.dumps(...,
    ensure_ascii=False)`` line per sample with ``input, output, gts, score, step`` then every
    extra key whose list has one value per sample (validation passes ``reward`` first)."""
    os.makedirs(dump_path, exist_ok=True)
    filename = Path(dump_path) / f"{step}.jsonl"
    n = len(inputs)
    base: dict[str, Sequence[Any]] = {"input": inputs, "output": outputs, "gts": gts, "score": scores,
                                      "step": [step] * n}
    for k, v in (reward_extra_infos or {}).items():
        if len(v) == n:
            base[k] = v
    lines = [json.dumps({k: v[i] for k, v in base.items()}, ensure_ascii=False) for i in range(n)]
    with open(filename, "w") as f:
        f.write("\n".join(lines) + "\n")
    return filename


def _orjson_compatible(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Mapping):
        return {str(k): _orjson_compatible(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_orjson_compatible(x) for x in v]
    return v


def orjson_dumps(obj: Any) -> bytes:
    """``orjson.dumps(obj, option=OPT_SERIALIZE_NUMPY)``: compact UTF-8, NaN and ±inf as null.
    Uses orjson when installed, else the same semantics through json."""
    try:
        import orjson
    except ImportError:
        return json.dumps(_orjson_compatible(obj), ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode()
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


class FileLogger:
    """verl's ``tracking.FileLogger``: ``path`` (``$VERL_FILE_LOGGER_PATH``) or
    ``<root>/<project_name>/<experiment_name>.jsonl`` (root: ``$VERL_FILE_LOGGER_ROOT``, default
    the working directory), opened ``"wb"`` -- every start truncates it, a resume included --
    and one ``{"step": N, "data": {...}}`` orjson line per ``log``."""

    def __init__(self, project_name: str, experiment_name: str, root: str | os.PathLike[str] = ".",
                 path: str | os.PathLike[str] | None = None) -> None:
        if path is None:
            directory = Path(os.path.expanduser(str(root))) / project_name
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"{experiment_name}.jsonl"
        self.filepath = Path(path)
        self.fp = open(self.filepath, "wb", buffering=0)

    def log(self, data: Mapping[str, Any], step: int) -> None:
        self.fp.write(orjson_dumps({"step": step, "data": dict(data)}) + b"\n")

    def finish(self) -> None:
        self.fp.close()


def save_checkpoint(default_local_dir: str | os.PathLike[str], step: int, *, critic: bool = False) -> Path:
    """The files ``RayPPOTrainer._save_checkpoint`` leaves (FSDP, one rank), as empty
    placeholders: ``global_step_<N>/actor/{model,optim,extra_state}_world_size_1_rank_0.pt``,
    ``global_step_<N>/data.pt`` and ``latest_checkpointed_iteration.txt`` holding N."""
    root = Path(default_local_dir)
    folder = root / f"global_step_{step}"
    for role in ("actor",) + (("critic",) if critic else ()):
        d = folder / role
        d.mkdir(parents=True, exist_ok=True)
        for kind in ("model", "optim", "extra_state"):
            (d / f"{kind}_world_size_1_rank_0.pt").write_bytes(b"")
    (folder / "data.pt").write_bytes(b"")
    (root / "latest_checkpointed_iteration.txt").write_text(str(step))
    return folder
