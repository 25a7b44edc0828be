"""The control-token registry: the structural tokens of a chat / tool-call format that collapse
diagnostics watch, each with a role.

A registry is derived from a tokenizer (:meth:`ControlTokenRegistry.from_tokenizer`). The chat
format's family (:mod:`diagnose.control_families`: ChatML/Hermes as in Qwen2.5, Qwen3 and SmolLM2,
Llama 3.1+, Mistral) is read from the chat template, else from the vocabulary. Turn markers
(``<|im_end|>``, ``<|eot_id|>``, ``[TOOL_CALLS]``, ...) are registered only if they are one token;
markup such as ``<tool_call>`` is registered with its whole id sequence when it is several tokens
(five in SmolLM2; ``<tool_response>`` in Qwen2.5). :attr:`ControlToken.token_id` is the first id,
what per-position log-prob columns hold; :attr:`ControlToken.token_ids` is the sequence, whose
probability from a decisive position is the product along it. A tokenizer with no chat format
registers only single tokens, and :attr:`ControlTokenRegistry.missing_roles` says what is absent.
Token names are valid Python identifiers: run-directory columns are ``lp_ctrl_<name>``.

Roles (:data:`ROLES`): ``turn_start``, ``turn_end``, ``call_open``, ``call_close``,
``response_open``, ``response_close``, ``eos``, ``call_body_start`` (the first token of the call
body, ``{"`` in Qwen2.5 and Llama 3.1), plus the optional ``call_newline`` (the ``\\n`` token right
after ``<tool_call>``, where the model continues with the body, and where a collapsed policy puts
``<|im_end|>`` instead), ``header_end`` (``<|end_header_id|>``, Mistral's ``[/INST]``: the end of
a turn header, after which the speaker's text starts) and ``think_open``/``think_close`` (Qwen3's
``<think>``/``</think>``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from diagnose.control_families import (
    CHATML,
    UNKNOWN,
    ChatFamily,
    detect_family,
    family_named,
    infer_family_from_texts,
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
    "ids_of",
    "key_contexts",
]

#: (name, text, role) of the ChatML / Hermes control strings (the embedded tiny model's format).
STRUCTURAL_TOKENS: tuple[tuple[str, str, str], ...] = tuple(
    (s.name, s.text, s.role) for s in CHATML.strings if s.role not in ("think_open", "think_close")
)

#: Text encoded to find the call-body tokens: the newline after ``<tool_call>`` and the first
#: token of the JSON body (ChatML / Hermes; other families: ``ChatFamily.body_probe``).
CALL_BODY_PROBE = CHATML.body_probe
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
OPTIONAL_ROLES: tuple[str, ...] = ("call_newline", "header_end", "think_open", "think_close")
ROLES: tuple[str, ...] = REQUIRED_ROLES + OPTIONAL_ROLES

#: Named contexts (raw text to encode and run the model on) at whose end a control token is
#: the decisive next token, for the ChatML / Hermes format (other families:
#: :meth:`ControlTokenRegistry.key_contexts`). See :data:`KEY_CONTEXT_ROLES` for which.
KEY_CONTEXTS: Mapping[str, str] = CHATML.key_contexts

#: For each key context: the role of the healthy next token, and the role whose probability
#: rising there is the collapse signature (None: no single collapse token).
KEY_CONTEXT_ROLES: Mapping[str, Mapping[str, str | None]] = CHATML.key_context_roles


def key_contexts(family: str | None = None) -> dict[str, str]:
    """Named context strings where a control token matters (a fresh copy): ChatML's
    ``turn_start``, ``after_call_open``, ``after_call_body``, ``after_call_close`` by default, or
    those of the named family (:mod:`diagnose.control_families`)."""
    return dict(KEY_CONTEXTS if family is None else family_named(family).key_contexts)


def ids_of(control_tokens: Sequence[Mapping[str, Any]]) -> dict[int, Mapping[str, Any]]:
    """The control tokens (as run.json lists them: ``{name, text, token_id, role}``) whose
    ``token_id`` is an integer, by id. A run read without its run.json knows their names only
    (``token_id`` None), and a hand-edited one may hold anything: those are left out, not raised on."""
    return {t["token_id"]: t for t in control_tokens
            if isinstance(t.get("token_id"), int) and not isinstance(t.get("token_id"), bool)}


def _check_id(tid: Any, what: str) -> None:
    if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
        raise ValueError(f"{what} must be a non-negative int: {tid!r}")


@dataclass(frozen=True)
class ControlToken:
    """One registered control string: ``name`` (a valid identifier, unique in a registry), its
    decoded ``text``, its ``role``, ``token_ids`` (its id sequence in the tokenizer it came from;
    one id for a special token) and ``token_id`` (the first of them: per-position columns hold
    the log-prob of this first token). ``token_ids`` defaults to ``(token_id,)``."""

    name: str
    text: str
    token_id: int
    role: str
    token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"control token name must be a valid identifier: {self.name!r}")
        if self.role not in ROLES:
            raise ValueError(f"unknown control token role {self.role!r}; expected one of {ROLES}")
        _check_id(self.token_id, "token_id")
        if not isinstance(self.text, str):
            raise ValueError(f"text must be a str: {self.text!r}")
        if isinstance(self.token_ids, (str, bytes)) or not isinstance(self.token_ids, Sequence):
            raise ValueError(f"token_ids must be a sequence of ids: {self.token_ids!r}")
        ids = tuple(self.token_ids) or (self.token_id,)
        for i in ids:
            _check_id(i, "token_ids entry")
        if ids[0] != self.token_id:
            raise ValueError(f"{self.name}: token_id {self.token_id} is not the first of token_ids {ids}")
        object.__setattr__(self, "token_ids", ids)

    @property
    def multi(self) -> bool:
        """Whether this control string is several tokens."""
        return len(self.token_ids) > 1

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "text", "token_id", "role"}``, plus ``"token_ids"`` for a multi-token string
        (a single-token entry stays as run.json files have always held it)."""
        d: dict[str, Any] = {"name": self.name, "text": self.text, "token_id": self.token_id, "role": self.role}
        if self.multi:
            d["token_ids"] = list(self.token_ids)
        return d


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Ids of ``text`` without BOS/EOS; works for transformers tokenizers and raw
    ``tokenizers.Tokenizer`` objects."""
    out = tokenizer.encode(text, add_special_tokens=False)
    ids = getattr(out, "ids", out)
    return [int(i) for i in ids]


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def _token_ids(tokenizer: Any, text: str) -> list[int] | None:
    """The ids ``text`` encodes to, if they decode back to exactly ``text``."""
    ids = _encode(tokenizer, text)
    if ids and _decode(tokenizer, ids) == text:
        return ids
    return None


def _single_token_id(tokenizer: Any, text: str) -> int | None:
    ids = _token_ids(tokenizer, text)
    return ids[0] if ids is not None and len(ids) == 1 else None


def _spans(tokenizer: Any, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character span of each token in the decoded text (by incremental decoding)."""
    spans, start = [], 0
    for i in range(len(ids)):
        end = len(_decode(tokenizer, ids[: i + 1]))
        spans.append((start, max(end, start)))
        start = max(end, start)
    return spans


def _call_body_tokens(tokenizer: Any, family: ChatFamily) -> list[ControlToken]:
    """The newline token after the call tag (if the family has one and it is a token of its
    own) and the first token containing the body's first character (``{`` / ``[`` / ``<``)."""
    probe = family.body_probe
    ids = _encode(tokenizer, probe)
    if not ids or _decode(tokenizer, ids) != probe:
        return []
    found: list[ControlToken] = []
    body_at = family.body_at
    for tid, (start, end) in zip(ids, _spans(tokenizer, ids)):
        nl = family.newline_at
        if nl is not None and (start, end) == (nl, nl + 1):
            found.append(ControlToken(CALL_NEWLINE_NAME, "\n", tid, "call_newline"))
        if start <= body_at < end:
            found.append(ControlToken(CALL_BODY_START_NAME, _decode(tokenizer, [tid]), tid, "call_body_start"))
            break
    return found


def _family_tokens(tokenizer: Any, family: ChatFamily) -> list[ControlToken]:
    found: list[ControlToken] = []
    for s in family.strings:
        ids = _token_ids(tokenizer, s.text)
        if ids is None or (s.special and len(ids) != 1):
            continue
        found.append(ControlToken(s.name, s.text, ids[0], s.role, tuple(ids)))
    return found


@dataclass(frozen=True)
class ControlTokenRegistry:
    """The control tokens found in one tokenizer, in the family's order
    (:attr:`diagnose.control_families.ChatFamily.strings`), then ``call_open_newline`` and
    ``call_body_start``. ``family`` names the chat format (``chatml``, ``chatml_xml``,
    ``llama3``, ``mistral``, ``unknown``); not compared, and inferred from the texts when not
    given (run.json stores the token list only)."""

    tokens: tuple[ControlToken, ...] = field(default_factory=tuple)
    family: str = field(default="", compare=False)

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
        if not self.family:
            object.__setattr__(self, "family", infer_family_from_texts({t.text for t in toks}).name)

    # construction ---------------------------------------------------------------------------

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ControlTokenRegistry:
        """Find the control strings of ``tokenizer``'s chat format (a transformers tokenizer or
        a ``tokenizers.Tokenizer``; the format is read from its chat template, else from its
        vocabulary). Never raises for a tokenizer lacking them: see :attr:`missing_roles`."""
        family = detect_family(tokenizer, lambda text: _single_token_id(tokenizer, text) is not None)
        found = _family_tokens(tokenizer, family)
        found.extend(_call_body_tokens(tokenizer, family))
        return cls(tuple(found), family=family.name)

    def to_json(self) -> list[dict[str, Any]]:
        """JSON-compatible form: a list of ``{"name", "text", "token_id", "role"}`` dicts, with
        ``"token_ids"`` on multi-token entries (:meth:`ControlToken.to_dict`)."""
        return [t.to_dict() for t in self.tokens]

    @classmethod
    def from_json(cls, data: Sequence[Mapping[str, Any]]) -> ControlTokenRegistry:
        """Read :meth:`to_json`'s list; entries without ``token_ids`` (every run.json written
        before multi-token support) are single tokens."""
        if isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
            raise ValueError("control token registry JSON must be a list of objects")
        tokens = []
        for i, d in enumerate(data):
            try:
                ids = d.get("token_ids") or ()
                tokens.append(ControlToken(name=d["name"], text=d["text"], token_id=d["token_id"],
                                           role=d["role"], token_ids=tuple(ids) if isinstance(ids, list) else ids))
            except (KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"control token registry entry {i} is malformed: {d!r}") from e
        return cls(tuple(tokens))

    # queries --------------------------------------------------------------------------------

    @property
    def chat_family(self) -> ChatFamily:
        """The :class:`~diagnose.control_families.ChatFamily` this registry was read for."""
        return family_named(self.family) if self.family else UNKNOWN

    def key_contexts(self) -> dict[str, str]:
        """The family's key contexts (a fresh copy; ChatML's are :data:`KEY_CONTEXTS`)."""
        return dict(self.chat_family.key_contexts)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tokens]

    @property
    def ids(self) -> list[int]:
        """First token id of each entry (several entries may share one: SmolLM2's
        ``<tool_call>`` and ``<tool_response>`` both start with ``<``)."""
        return [t.token_id for t in self.tokens]

    @property
    def sequences(self) -> list[tuple[int, ...]]:
        """Whole id sequence of each entry."""
        return [t.token_ids for t in self.tokens]

    @property
    def multi_token(self) -> list[ControlToken]:
        """Entries that are several tokens."""
        return [t for t in self.tokens if t.multi]

    def _shared(self) -> dict[str, str]:
        have = {t.role for t in self.tokens}
        return {r: to for r, to in self.chat_family.shared_roles.items() if r not in have and to in have}

    @property
    def roles(self) -> list[str]:
        """Roles present (a role the family plays with another role's token counts), in
        :data:`ROLES` order."""
        have = {t.role for t in self.tokens} | set(self._shared())
        return [r for r in ROLES if r in have]

    @property
    def missing_roles(self) -> list[str]:
        """Required roles (:data:`REQUIRED_ROLES`) with no token in this registry."""
        have = set(self.roles)
        return [r for r in REQUIRED_ROLES if r not in have]

    @property
    def complete(self) -> bool:
        return not self.missing_roles

    def by_role(self, role: str) -> list[ControlToken]:
        """Entries with ``role``; for a role the family plays with another role's token
        (Mistral's call close is ``</s>``), that role's entries."""
        if role not in ROLES:
            raise ValueError(f"unknown control token role {role!r}; expected one of {ROLES}")
        role = self._shared().get(role, role)
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
