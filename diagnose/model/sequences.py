"""Conversations as token sequences with a loss mask.

Multi-turn RL must train on the tokens the sampler produced, not on a re-tokenisation of their
text (BPE is not canonical on sampled text). So a trajectory is built from segments: the prompt,
each generated turn (in the loss), each observation (tool output + the next turn's header,
masked). Observation text is cut from the chat renderer, so it matches the template exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diagnose.chat import IM_END, render_chat


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_text(messages: list[dict[str, Any]]) -> str:
    return render_chat(messages, add_generation_prompt=True)


def observation_text(history: list[dict[str, Any]], new_messages: list[dict[str, Any]]) -> str:
    """Text between the end of the last assistant turn's ``<|im_end|>`` and the start of the next
    assistant turn's content: ``"\\n<|im_start|>user\\n<tool_response>...<|im_start|>assistant\\n"``.

    ``history`` ends with that assistant message.
    """
    before = render_chat(history)
    after = render_chat(history + new_messages, add_generation_prompt=True)
    cut = before.rindex(IM_END) + len(IM_END)
    return after[cut:]


@dataclass
class Sequence:
    """A tokenised trajectory. ``loss_mask[i]`` says whether token ``i`` is trained on (model
    output); ``turn[i]`` is the assistant turn a token belongs to (-1: prompt)."""

    ids: list[int] = field(default_factory=list)
    loss_mask: list[bool] = field(default_factory=list)
    turn: list[int] = field(default_factory=list)
    sampler_logprob: list[float] = field(default_factory=list)  # NaN where not sampled here

    def add(self, ids: list[int], *, train: bool, turn: int, logprobs: list[float] | None = None) -> None:
        self.ids.extend(ids)
        self.loss_mask.extend([train] * len(ids))
        self.turn.extend([turn] * len(ids))
        self.sampler_logprob.extend(logprobs if logprobs is not None else [float("nan")] * len(ids))

    def __len__(self) -> int:
        return len(self.ids)


def encode_conversation(tokenizer: Any, messages: list[dict[str, Any]], n_prompt: int) -> Sequence:
    """Tokenise a complete conversation (e.g. a gold trajectory) as trajectory segments.

    ``messages[:n_prompt]`` is the prompt (system + user). Assistant turns are trained on,
    including their closing ``<|im_end|>``; tool outputs and headers are not.
    """
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    seq = Sequence()
    seq.add(encode(tokenizer, prompt_text(messages[:n_prompt])), train=False, turn=-1)
    turn = 0
    i = n_prompt
    while i < len(messages):
        msg = messages[i]
        if msg["role"] != "assistant":
            raise ValueError(f"message {i}: expected an assistant turn, got {msg['role']}")
        seq.add(encode(tokenizer, msg.get("content") or "") + [im_end], train=True, turn=turn)
        j = i + 1
        while j < len(messages) and messages[j]["role"] == "tool":
            j += 1
        if j > i + 1 or j < len(messages):
            seq.add(encode(tokenizer, observation_text(messages[: i + 1], messages[i + 1 : j])), train=False, turn=turn)
        turn += 1
        i = j
    return seq
