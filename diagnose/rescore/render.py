"""Logged rollouts (prompt + completion text) back to the token ids the model saw.

Why: TRL and verl decode completions with ``skip_special_tokens=True``, so ``<|im_end|>`` and
``<|im_start|>`` are gone from the dump, and re-tokenising the text would teacher-force a model
on sequences it never produced (no turn ends, tool outputs glued to calls). The completion is
split into assistant turns with `diagnose.transcripts.split_turns` in the run's dialect
(``RunSource.dialect``: the split the turn states come from); each turn is encoded and closed
with the turn-end token; the text between turns (tool outputs) is rendered again through the
run's chat template (``tokenizer.apply_chat_template``), which restores the headers and turn
markers the dump lost.

Every rendering is checked: decoded the way the dump was written (special tokens skipped when
the logged text has none), it must give back the logged completion exactly. Rollouts that do
not (a tokenizer that is not the run's, a transcript the splitter cannot read) are not scored;
their number is reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from diagnose.chat import IM_END, IM_START, TOOL_CALL_CLOSE
from diagnose.model.ctrl_probe import context_patterns, label_contexts
from diagnose.model.sequences import encode
from diagnose.transcripts import Dialect, split_turns

__all__ = ["Rendered", "RenderError", "Renderer"]

_TOOL_RESPONSE = re.compile(r"<tool_response>\n?(.*?)\n?</tool_response>", re.S)
_SPECIAL_SEGMENT = re.compile(re.escape(IM_START) + r"(\w+)\n(.*?)(?:" + re.escape(IM_END) + r"|\Z)", re.S)
_STRIPPED_SEGMENT = re.compile(r"\n?(user|tool|system)\n(.*?)(?=\n(?:user|tool|system|assistant)\n|\Z)", re.S)


class RenderError(ValueError):
    """The run cannot be rendered at all with this tokenizer (e.g. no chat template)."""


@dataclass
class Rendered:
    """One rollout as token ids: ``ids`` = prompt + completion; ``prompt_len``; per completion
    token its ``turn`` and whether the model generated it (``generated``)."""

    step: int
    sample_id: int
    ids: list[int]
    prompt_len: int
    turn: list[int] = field(default_factory=list)
    generated: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def _observation_messages(gap: str, stripped: bool) -> list[dict[str, str]]:
    """The messages between two assistant turns, from the text the dump holds there."""
    seg = _STRIPPED_SEGMENT if stripped else _SPECIAL_SEGMENT
    msgs: list[dict[str, str]] = []
    for role, body in seg.findall(gap):
        if role == "assistant":
            continue
        tools = _TOOL_RESPONSE.findall(body) if role in ("user", "tool") else []
        if tools:
            msgs += [{"role": "tool", "content": c} for c in tools]
        else:
            msgs.append({"role": role, "content": body})
    return msgs


class Renderer:
    """Renders rollouts with one tokenizer (the run's), their completions split in ``dialect``
    (the run's, ``RunSource.dialect``). Raises `RenderError` when the tokenizer has no chat
    template or no turn-end token."""

    def __init__(self, tokenizer: Any, dialect: Dialect = Dialect.CHATML, turn_end: str = IM_END):
        if not getattr(tokenizer, "chat_template", None):
            raise RenderError("the tokenizer has no chat template, so the turns the dump stripped cannot be "
                              "restored; pass --tokenizer DIR with the run's tokenizer_config.json")
        self.tok = tokenizer
        self.dialect = Dialect(dialect)
        self.turn_end = turn_end
        self.turn_end_id = tokenizer.convert_tokens_to_ids(turn_end)
        if self.turn_end_id is None or self.turn_end_id == tokenizer.unk_token_id:
            raise RenderError(f"the tokenizer has no {turn_end!r} token")
        self._obs: dict[tuple[str, ...], list[int]] = {}
        self.patterns = context_patterns(tokenizer)
        self.close_id = tokenizer.convert_tokens_to_ids(TOOL_CALL_CLOSE)

    def _observation_ids(self, msgs: list[dict[str, str]]) -> list[int]:
        """Template text from the end of an assistant turn (after its turn-end token) to the start
        of the next assistant turn's content, as `diagnose.model.sequences.observation_text` cuts it;
        verl's agent loop appends the messages' own rendering (``apply_chat_template(...,
        remove_system_prompt=True)``), which starts at their header, without the newline the
        template puts after a turn end."""
        key = tuple(f"{m['role']}\0{m['content']}" for m in msgs)
        hit = self._obs.get(key)
        if hit is None:
            history = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
            before = self.tok.apply_chat_template(history, tokenize=False)
            after = self.tok.apply_chat_template(history + msgs, tokenize=False, add_generation_prompt=True)
            cut = before.rindex(self.turn_end) + len(self.turn_end)
            if after[:cut] != before[:cut]:
                raise RenderError("the chat template renders a conversation's history differently once tool "
                                  "outputs follow; cannot cut the observation text")
            text = after[cut:].removeprefix("\n") if self.dialect is Dialect.VERL else after[cut:]
            hit = self._obs[key] = encode(self.tok, text)
        return hit

    def render(self, step: int, sample_id: int, prompt: str, completion: str) -> Rendered | None:
        """The rollout as ids, or None when its rendering does not decode back to the logged text."""
        stripped = IM_START not in completion and IM_END not in completion
        turns = split_turns(completion, self.dialect)
        r = Rendered(step, sample_id, list(encode(self.tok, prompt)), 0)
        r.prompt_len = len(r.ids)
        pos = 0
        for i, text in enumerate(turns):
            if not stripped and text.rstrip().endswith(self.turn_end):
                text = text.rstrip()[: -len(self.turn_end)]
            at = completion.find(text, pos)
            if at < 0:
                return None
            if i > 0:
                msgs = _observation_messages(completion[pos:at], stripped)
                if not msgs:
                    return None
                obs = self._observation_ids(msgs)
                r.ids += obs
                r.turn += [i - 1] * len(obs)
                r.generated += [False] * len(obs)
            body = encode(self.tok, text) + [self.turn_end_id]
            r.ids += body
            r.turn += [i] * len(body)
            r.generated += [True] * len(body)
            pos = at + len(text)
        if not self._round_trips(r, completion, stripped):
            return None
        return r

    def _round_trips(self, r: Rendered, completion: str, stripped: bool) -> bool:
        text = self.tok.decode(r.ids[r.prompt_len:], skip_special_tokens=stripped)
        if stripped:
            return text.strip() == completion.strip()
        return text.replace(self.turn_end, "").strip() == completion.replace(self.turn_end, "").strip() or \
            all(t in text for t in split_turns(completion, self.dialect))

    def contexts(self, r: Rendered) -> list[str]:
        """Key-context label of each predicting position from the last prompt token on (the probe's
        ``context`` column), by `diagnose.model.ctrl_probe.label_contexts`."""
        labels = label_contexts(r.ids, self.patterns, self.close_id)
        return labels[r.prompt_len - 1: len(r.ids) - 1]
