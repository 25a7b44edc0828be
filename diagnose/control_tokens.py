"""The control-token registry: the structural tokens of the ChatML / Hermes tool-call format
that collapse diagnostics watch, each with a role.

A registry is derived from a tokenizer (:meth:`ControlTokenRegistry.from_tokenizer`): a control
string is registered only if it encodes to exactly one token id, so the same code serves the
embedded tiny tokenizer, Qwen2.5 (where ``<tool_response>`` is *not* a single token) and a
tokenizer with no control tokens at all (:attr:`ControlTokenRegistry.missing_roles` says what is
absent). Token names are valid Python identifiers: run-directory columns are ``lp_ctrl_<name>``.

Roles (:data:`ROLES`): ``turn_start``, ``turn_end``, ``call_open``, ``call_close``,
``response_open``, ``response_close``, ``eos``, ``call_body_start`` (the first token of the call
JSON body, ``{"`` in Qwen2.5), plus the optional ``call_newline`` (the ``\\n`` token right after
``<tool_call>``, where the model continues with the body, and where a collapsed policy puts
``<|im_end|>`` instead).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from diagnose.chat import (
    ASSISTANT_PREFIX,
    ENDOFTEXT,
    IM_END,
    IM_START,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_RESPONSE_CLOSE,
    TOOL_RESPONSE_OPEN,
)

__all__ = [
    "CALL_BODY_PROBE",
    "KEY_CONTEXTS",
    "KEY_CONTEXT_ROLES",
    "OPTIONAL_ROLES",
    "REQUIRED_ROLES",
    "ROLES",
    "STRUCTURAL_TOKENS",
    "ControlToken",
    "ControlTokenRegistry",
    "key_contexts",
]

#: (name, text, role) of the structural control strings, each registered iff it is one token.
STRUCTURAL_TOKENS: tuple[tuple[str, str, str], ...] = (
    ("im_start", IM_START, "turn_start"),
    ("im_end", IM_END, "turn_end"),
    ("endoftext", ENDOFTEXT, "eos"),
    ("tool_call_open", TOOL_CALL_OPEN, "call_open"),
    ("tool_call_close", TOOL_CALL_CLOSE, "call_close"),
    ("tool_response_open", TOOL_RESPONSE_OPEN, "response_open"),
    ("tool_response_close", TOOL_RESPONSE_CLOSE, "response_close"),
)

#: Text encoded to find the call-body tokens: the newline after ``<tool_call>`` and the first
#: token of the JSON body.
CALL_BODY_PROBE = TOOL_CALL_OPEN + '\n{"name": "f", "arguments": {}}'
CALL_BODY_START_NAME = "call_body_start"
CALL_NEWLINE_NAME = "call_open_newline"

#: Roles every tool-calling chat tokenizer should provide (the contract in docs/architecture.md).
REQUIRED_ROLES: tuple[str, ...] = (
    "turn_start",
    "turn_end",
    "call_open",
    "call_close",
    "response_open",
    "response_close",
    "eos",
    "call_body_start",
)
#: Roles registered when the tokenizer has them, never reported missing.
OPTIONAL_ROLES: tuple[str, ...] = ("call_newline",)
ROLES: tuple[str, ...] = REQUIRED_ROLES + OPTIONAL_ROLES

#: Named contexts (raw text to encode and run the model on) at whose end a control token is
#: the decisive next token. See :data:`KEY_CONTEXT_ROLES` for which.
KEY_CONTEXTS: Mapping[str, str] = {
    # first token of an assistant turn: <tool_call> (call) vs text (answer) vs <|im_end|> (empty)
    "turn_start": ASSISTANT_PREFIX,
    # inside a call block: '{"' belongs here; the collapse puts <|im_end|> here instead
    "after_call_open": ASSISTANT_PREFIX + TOOL_CALL_OPEN + "\n",
    # after a complete call body: '</tool_call>' closes the block
    "after_call_body": ASSISTANT_PREFIX + CALL_BODY_PROBE + "\n",
    # after a call block: <|im_end|> ends the turn (or '\n<tool_call>' starts another call)
    "after_call_close": TOOL_CALL_CLOSE,
}

#: For each key context: the role of the healthy next token, and the role whose probability
#: rising there is the collapse signature (None: no single collapse token).
KEY_CONTEXT_ROLES: Mapping[str, Mapping[str, str | None]] = {
    "turn_start": {"expected": "call_open", "collapse": "turn_end"},
    "after_call_open": {"expected": "call_body_start", "collapse": "turn_end"},
    "after_call_body": {"expected": "call_close", "collapse": "turn_end"},
    "after_call_close": {"expected": "turn_end", "collapse": None},
}


def key_contexts() -> dict[str, str]:
    """Named context strings where a control token matters (a fresh copy of
    :data:`KEY_CONTEXTS`): ``turn_start``, ``after_call_open``, ``after_call_body``,
    ``after_call_close``."""
    return dict(KEY_CONTEXTS)


@dataclass(frozen=True)
class ControlToken:
    """One registered token: ``name`` (a valid identifier, unique in a registry), its decoded
    ``text``, its ``token_id`` in the tokenizer it came from, and its ``role``."""

    name: str
    text: str
    token_id: int
    role: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"control token name must be a valid identifier: {self.name!r}")
        if self.role not in ROLES:
            raise ValueError(f"unknown control token role {self.role!r}; expected one of {ROLES}")
        if isinstance(self.token_id, bool) or not isinstance(self.token_id, int) or self.token_id < 0:
            raise ValueError(f"token_id must be a non-negative int: {self.token_id!r}")
        if not isinstance(self.text, str):
            raise ValueError(f"text must be a str: {self.text!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Ids of ``text`` without BOS/EOS; works for transformers tokenizers and raw
    ``tokenizers.Tokenizer`` objects."""
    out = tokenizer.encode(text, add_special_tokens=False)
    ids = getattr(out, "ids", out)
    return [int(i) for i in ids]


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def _single_token_id(tokenizer: Any, text: str) -> int | None:
    ids = _encode(tokenizer, text)
    if len(ids) == 1 and _decode(tokenizer, ids) == text:
        return ids[0]
    return None


def _spans(tokenizer: Any, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character span of each token in the decoded text (by incremental decoding)."""
    spans, start = [], 0
    for i in range(len(ids)):
        end = len(_decode(tokenizer, ids[: i + 1]))
        spans.append((start, max(end, start)))
        start = max(end, start)
    return spans


def _call_body_tokens(tokenizer: Any) -> list[ControlToken]:
    """The newline token after ``<tool_call>`` (if it is a token of its own) and the first token
    containing the body's first character (``{``)."""
    ids = _encode(tokenizer, CALL_BODY_PROBE)
    if not ids or _decode(tokenizer, ids) != CALL_BODY_PROBE:
        return []
    spans = _spans(tokenizer, ids)
    newline_at = len(TOOL_CALL_OPEN)
    body_at = newline_at + 1
    found: list[ControlToken] = []
    for tid, (start, end) in zip(ids, spans):
        if (start, end) == (newline_at, body_at):
            found.append(ControlToken(CALL_NEWLINE_NAME, "\n", tid, "call_newline"))
        if start <= body_at < end:
            text = _decode(tokenizer, [tid])
            found.append(ControlToken(CALL_BODY_START_NAME, text, tid, "call_body_start"))
            break
    return found


@dataclass(frozen=True)
class ControlTokenRegistry:
    """The control tokens found in one tokenizer, in :data:`STRUCTURAL_TOKENS` order, then
    ``call_open_newline`` and ``call_body_start``."""

    tokens: tuple[ControlToken, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        toks = tuple(self.tokens)
        for t in toks:
            if not isinstance(t, ControlToken):
                raise TypeError(f"registry entries must be ControlToken, got {type(t).__name__}")
        names = [t.name for t in toks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate control token names: {dupes}")
        object.__setattr__(self, "tokens", toks)

    # construction ---------------------------------------------------------------------------

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ControlTokenRegistry:
        """Find the structural tokens present in ``tokenizer`` (a transformers tokenizer or a
        ``tokenizers.Tokenizer``). Never raises for a tokenizer lacking them: see
        :attr:`missing_roles`."""
        found: list[ControlToken] = []
        for name, text, role in STRUCTURAL_TOKENS:
            tid = _single_token_id(tokenizer, text)
            if tid is not None:
                found.append(ControlToken(name, text, tid, role))
        found.extend(_call_body_tokens(tokenizer))
        return cls(tuple(found))

    def to_json(self) -> list[dict[str, Any]]:
        """JSON-compatible form: a list of ``{"name", "text", "token_id", "role"}`` dicts."""
        return [t.to_dict() for t in self.tokens]

    @classmethod
    def from_json(cls, data: Sequence[Mapping[str, Any]]) -> ControlTokenRegistry:
        if isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
            raise ValueError("control token registry JSON must be a list of objects")
        tokens = []
        for i, d in enumerate(data):
            try:
                tokens.append(
                    ControlToken(name=d["name"], text=d["text"], token_id=d["token_id"], role=d["role"])
                )
            except (KeyError, TypeError) as e:
                raise ValueError(f"control token registry entry {i} is malformed: {d!r}") from e
        return cls(tuple(tokens))

    # queries --------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tokens]

    @property
    def ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]

    @property
    def roles(self) -> list[str]:
        """Roles present, in :data:`ROLES` order."""
        have = {t.role for t in self.tokens}
        return [r for r in ROLES if r in have]

    @property
    def missing_roles(self) -> list[str]:
        """Required roles (:data:`REQUIRED_ROLES`) with no token in this registry."""
        have = {t.role for t in self.tokens}
        return [r for r in REQUIRED_ROLES if r not in have]

    @property
    def complete(self) -> bool:
        return not self.missing_roles

    def by_role(self, role: str) -> list[ControlToken]:
        if role not in ROLES:
            raise ValueError(f"unknown control token role {role!r}; expected one of {ROLES}")
        return [t for t in self.tokens if t.role == role]

    def get(self, name: str, default: ControlToken | None = None) -> ControlToken | None:
        for t in self.tokens:
            if t.name == name:
                return t
        return default

    def id_of(self, name: str) -> int | None:
        t = self.get(name)
        return None if t is None else t.token_id

    def __getitem__(self, name: str) -> ControlToken:
        t = self.get(name)
        if t is None:
            raise KeyError(name)
        return t

    def __contains__(self, name: object) -> bool:
        return any(t.name == name for t in self.tokens)

    def __iter__(self) -> Iterator[ControlToken]:
        return iter(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)
