"""Minimal format repairs applied during greedy generation, as HF logits processors.

Why logits processors: the collapse we diagnose is a probability spike on a few control tokens
(``<|im_end|>`` right after ``<tool_call>\\n``, where ``{"`` belongs). The smallest intervention
that tests "is the skill still there underneath?" removes exactly that choice and nothing else:

* :class:`ForbidPrematureControl` (measure ``repair_forbid``): while a ``<tool_call>`` is open,
  the turn end, end of text, a new turn, a nested ``<tool_call>`` and ``<tool_response>`` tags
  are forbidden; right after ``<tool_call>`` (and its newline), before any body token, the
  closing ``</tool_call>`` is forbidden too.
* :class:`PrefillCallPrefix` (measure ``repair_prefill``): when the model emits ``<tool_call>``,
  the next tokens are forced to the call prefix ``\\n{"name": "`` (as if prefilled); the model
  then writes the tool name and arguments itself.

Each processor records, per row, whether it *fired*: whether it changed the greedy choice at
least once (a forbidden token was the argmax, or a forced token was not). A repair that never
fires changes nothing, so its accuracy equals native accuracy.

State is kept per row and updated from the last token of each call (O(batch) per step, no loop
over tokens). A processor instance serves one ``generate`` call: make a new one per call.
"""

from __future__ import annotations

from typing import Any

import torch

from diagnose.chat import TOOL_CALL_OPEN
from diagnose.control_tokens import ControlTokenRegistry

#: The forced call prefix (after ``<tool_call>``): the Hermes body up to the tool name.
CALL_PREFIX = '\n{"name": "'

#: Roles forbidden anywhere inside an open call block.
FORBIDDEN_IN_CALL = ("turn_end", "eos", "turn_start", "call_open", "response_open", "response_close")

#: Roles the repairs need from the tokenizer.
REPAIR_ROLES = ("call_open", "call_close", "turn_end", "eos")


def _ids(registry: ControlTokenRegistry, roles: tuple[str, ...]) -> list[int]:
    # single tokens only: a multi-token string's first id (SmolLM2's '<' of <tool_call>, Qwen2.5's
    # of <tool_response>) is ordinary text, never to be forbidden as if it were the string
    return sorted({t.token_id for r in roles for t in registry.by_role(r) if not t.multi})


class _RowState:
    """Per-row bookkeeping shared by the processors: rows that already stopped, fired flags."""

    def __init__(self, stop_ids: list[int]):
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.long)
        self.done: torch.Tensor | None = None
        self.fired: torch.Tensor | None = None
        self._calls = 0

    def _begin_step(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Start one generation step: the row state sized to the batch; returns each row's last
        token and whether this is the first call (which sees the prompt's last token)."""
        self._init(input_ids.shape[0], input_ids.device)
        first = self._calls == 0
        self._calls += 1
        return input_ids[:, -1], first

    def _init(self, batch: int, device: torch.device) -> None:
        if self.done is None or self.done.shape[0] != batch:
            self.done = torch.zeros(batch, dtype=torch.bool, device=device)
            self.fired = torch.zeros(batch, dtype=torch.bool, device=device)
            self.stop_ids = self.stop_ids.to(device)
            self._reset(batch, device)

    def _reset(self, batch: int, device: torch.device) -> None:  # pragma: no cover - overridden
        pass

    def _step_done(self, last: torch.Tensor, first: bool) -> None:
        if not first:  # the first call sees the prompt's last token, not a generated one
            self.done |= torch.isin(last, self.stop_ids)

    def fired_list(self) -> list[bool]:
        return [] if self.fired is None else [bool(x) for x in self.fired.tolist()]


class ForbidPrematureControl(_RowState):
    """Forbid premature control tokens inside an open ``<tool_call>`` block (see module doc)."""

    def __init__(self, registry: ControlTokenRegistry, stop_ids: list[int]):
        super().__init__(stop_ids)
        self.open_id = registry.by_role("call_open")[0].token_id
        self.close_id = registry.by_role("call_close")[0].token_id
        newline = registry.by_role("call_newline")
        self.newline_id = newline[0].token_id if newline else -1
        self.in_call = torch.tensor(_ids(registry, FORBIDDEN_IN_CALL), dtype=torch.long)
        self.open: torch.Tensor | None = None
        self.body: torch.Tensor | None = None

    def _reset(self, batch: int, device: torch.device) -> None:
        self.open = torch.zeros(batch, dtype=torch.bool, device=device)
        self.body = torch.zeros(batch, dtype=torch.bool, device=device)
        self.in_call = self.in_call.to(device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        last, first = self._begin_step(input_ids)
        if not first:
            opened = last == self.open_id
            self.body = torch.where(opened, torch.zeros_like(self.body), self.body | (self.open & (last != self.newline_id)))
            self.open = (self.open | opened) & (last != self.close_id)
        self._step_done(last, first)
        active = self.open & ~self.done
        if not bool(active.any()):
            return scores
        empty = active & ~self.body
        top = scores.argmax(-1)
        self.fired |= (active & torch.isin(top, self.in_call)) | (empty & (top == self.close_id))
        scores = scores.clone()
        neg = torch.finfo(scores.dtype).min
        scores[:, self.in_call] = torch.where(active[:, None], torch.full_like(scores[:, self.in_call], neg),
                                              scores[:, self.in_call])
        scores[:, self.close_id] = torch.where(empty, torch.full_like(scores[:, self.close_id], neg),
                                               scores[:, self.close_id])
        return scores

    def would_fire(self, turns: list[list[int]]) -> bool:
        """Whether this repair would change any greedy choice of an unrepaired greedy episode
        whose generated turns are ``turns`` (the same rule as ``__call__``, on known tokens). If
        not, the repaired episode is that episode, token for token."""
        in_call = set(self.in_call.tolist())
        for tokens in turns:
            is_open = body = False
            for tok in tokens:
                if is_open and (tok in in_call or (not body and tok == self.close_id)):
                    return True
                if tok == self.open_id:
                    is_open, body = True, False
                elif is_open and tok != self.newline_id:
                    body = True
                if tok == self.close_id:
                    is_open = False
        return False


class PrefillCallPrefix(_RowState):
    """After the model emits ``<tool_call>``, force the tokens of :data:`CALL_PREFIX`."""

    def __init__(self, open_id: int, prefix_ids: list[int], stop_ids: list[int]):
        super().__init__(stop_ids)
        if not prefix_ids:
            raise ValueError("empty call prefix")
        self.open_id = open_id
        self.prefix = torch.tensor(prefix_ids, dtype=torch.long)
        self.pos: torch.Tensor | None = None

    def _reset(self, batch: int, device: torch.device) -> None:
        self.pos = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.prefix = self.prefix.to(device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        last, first = self._begin_step(input_ids)
        self._step_done(last, first)
        if not first:
            self.pos = torch.where(self.pos >= 0, self.pos + 1, self.pos)
            self.pos = torch.where(self.pos >= len(self.prefix), torch.full_like(self.pos, -1), self.pos)
            self.pos = torch.where((last == self.open_id) & ~self.done, torch.zeros_like(self.pos), self.pos)
        rows = (self.pos >= 0) & ~self.done
        if not bool(rows.any()):
            return scores
        forced = self.prefix[self.pos.clamp(min=0)]
        self.fired |= rows & (scores.argmax(-1) != forced)
        scores = scores.clone()
        neg = torch.finfo(scores.dtype).min
        masked = torch.full_like(scores, neg).scatter(-1, forced[:, None], 0.0)
        return torch.where(rows[:, None], masked, scores)

    def would_fire(self, turns: list[list[int]]) -> bool:
        """Whether forcing the prefix would change any greedy choice of an unrepaired greedy
        episode whose generated turns are ``turns`` (see ``ForbidPrematureControl.would_fire``)."""
        prefix = self.prefix.tolist()
        for tokens in turns:
            pos = -1
            for tok in tokens:
                if pos >= 0:
                    if tok != prefix[pos]:
                        return True
                    pos = pos + 1 if pos + 1 < len(prefix) else -1
                elif tok == self.open_id:
                    pos = 0
        return False


def call_prefix_ids(tokenizer: Any, open_id: int) -> list[int] | None:
    """Token ids of :data:`CALL_PREFIX` as they follow ``<tool_call>`` in this tokenizer, or None
    when the encoding does not round-trip."""
    ids = tokenizer(TOOL_CALL_OPEN + CALL_PREFIX, add_special_tokens=False)["input_ids"]
    if not ids or ids[0] != open_id:
        return None
    rest = list(ids[1:])
    if tokenizer.decode(rest, skip_special_tokens=False) != CALL_PREFIX:
        return None
    return rest


class Repairs:
    """Factories of the two repairs for one tokenizer; ``missing`` explains what is unavailable."""

    def __init__(self, tokenizer: Any, registry: ControlTokenRegistry, stop_ids: list[int]):
        self.registry = registry
        self.stop_ids = stop_ids
        # the repairs act on single token ids: a role held by a multi-token string counts as missing
        have = {r for r in registry.roles if any(not t.multi for t in registry.by_role(r))}
        self.missing = [r for r in REPAIR_ROLES if r not in have]
        self.prefix_ids = None
        if not self.missing:
            self.prefix_ids = call_prefix_ids(tokenizer, registry.by_role("call_open")[0].token_id)

    def forbid(self) -> ForbidPrematureControl | None:
        return None if self.missing else ForbidPrematureControl(self.registry, self.stop_ids)

    def prefill(self) -> PrefillCallPrefix | None:
        if self.missing or not self.prefix_ids:
            return None
        return PrefillCallPrefix(self.registry.by_role("call_open")[0].token_id, self.prefix_ids, self.stop_ids)
