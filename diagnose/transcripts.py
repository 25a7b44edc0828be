"""A logged multi-turn transcript split into its assistant turns: `split_turns(text, dialect)`,
the one splitter that the adapters' turn states and `diagnose rescore`'s re-rendering share.

A trainer logs a rollout's completion as one text, the model's turns and the tool outputs the
agent loop put between them. Where one turn ends depends on how that trainer wrote the text,
its `Dialect`; a `RunSource` records the dialect of its ``completion`` column
(``RunSource.dialect``), so that whoever splits those texts again gets the turns the turn
states were classified from.

Turn texts are the model's text only: role headers, tool outputs and the turn-end markers
between turns are dropped. An empty completion is one empty turn.
"""

from __future__ import annotations

import re
from enum import Enum

from diagnose.chat import IM_END, IM_START

__all__ = ["Dialect", "split_turns"]


class Dialect(str, Enum):
    """How a trainer writes a multi-turn transcript (the Qwen ChatML template throughout)."""

    #: Special tokens kept: turns are separated by ``<|im_end|>`` + ``<|im_start|>role``
    #: boundaries. Our trainer, open-instruct (ids decoded with them), conversation dumps and
    #: TRL message lists (assistant turns joined / rendered in ChatML). A text with no
    #: ``<|im_start|>`` left (decoded without special tokens) is read as `STRIPPED`.
    CHATML = "chatml"
    #: Decoded with ``skip_special_tokens=True``, generic: recognised by tool responses framed by
    #: bare ``user``/``tool`` and ``assistant`` lines, split on those role lines; else one turn.
    STRIPPED = "stripped"
    #: TRL ``GRPOTrainer`` text completions (``batch_decode(..., skip_special_tokens=True)``):
    #: split on the tool suffix of ``_get_tool_suffix_ids`` as it survives decoding,
    #: ``\nuser\n<tool_response>\n...\n</tool_response>\nassistant\n`` (several tool results
    #: share one ``user`` header).
    TRL = "trl"
    #: verl's tool agent loop (``ToolAgentLoop``) decoded with special tokens skipped
    #: (``RayPPOTrainer._log_rollout_data``): a tool round ``user\n<tool_response>...
    #: </tool_response>\nassistant\n`` follows the turn with no newline (its ``<|im_end|>`` is
    #: gone), an interaction's ``user\n...\nassistant\n`` round likewise; a text that still has
    #: ChatML markers (dumped with special tokens kept) is `CHATML`.
    VERL = "verl"


def split_turns(text: str | None, dialect: Dialect | str = Dialect.CHATML) -> list[str]:
    """The assistant turns of a completion (the text after the prompt), in order, as ``dialect``
    writes them (see `Dialect`)."""
    if not text:
        return [""]
    d = Dialect(dialect)
    if d is Dialect.TRL:
        return _TRL_TOOL_SUFFIX.split(text) if "<tool_response>" in text else [text]
    if d is Dialect.VERL and IM_START not in text and IM_END not in text:
        return _verl(text)
    if d is not Dialect.STRIPPED and IM_START in text:
        return _chatml(text)
    return _stripped(text)


# ---- ChatML, special tokens kept ----------------------------------------------------------

_CHATML_BOUNDARY = re.compile(re.escape(IM_END) + r"\s*" + re.escape(IM_START))
_LEADING_ASSISTANT = re.compile(r"\A\s*" + re.escape(IM_START) + r"assistant(?:\n|\Z)")
_CHAT_ROLES = frozenset({"system", "user", "tool", "ipython", "function", "observation"})


def _chatml(text: str) -> list[str]:
    """One turn per assistant segment; user/tool segments (observations) are dropped. The text
    before the first boundary is the first assistant turn (the prompt ended with
    ``<|im_start|>assistant``); a leading ``<|im_start|>assistant`` header is skipped. A segment
    with an unknown role header stays a turn (with its ``<|im_start|>``, so it shows up as a
    stray control token); a stray header inside a turn is no boundary."""
    m = _LEADING_ASSISTANT.match(text)
    parts = _CHATML_BOUNDARY.split(text[m.end():] if m else text)
    turns = [parts[0]]
    for seg in parts[1:]:
        role, _, body = seg.partition("\n")
        role = role.strip()
        if role == "assistant":
            turns.append(body)
        elif role not in _CHAT_ROLES:
            turns.append(IM_START + seg)
    return turns


# ---- special tokens stripped --------------------------------------------------------------

# "<|im_end|>\n<|im_start|>user\n" decoded without special tokens is "\nuser\n"
_STRIPPED_SIGNAL = re.compile(r"\n(?:user|tool)\n<tool_response>|</tool_response>\s*\nassistant\n")
_STRIPPED_SPLIT = re.compile(r"\n(user|tool|assistant)\n")


def _stripped(text: str) -> list[str]:
    if "<tool_response>" not in text or not _STRIPPED_SIGNAL.search(text):
        return [text]
    pieces = _STRIPPED_SPLIT.split(text)
    return [pieces[0]] + [body for role, body in zip(pieces[1::2], pieces[2::2]) if role == "assistant"]


# ---- TRL ----------------------------------------------------------------------------------

#: the tool suffix of a Qwen2.5 chat template after ``skip_special_tokens`` decoding
_TRL_TOOL_SUFFIX = re.compile(r"\nuser(?:\n<tool_response>\n.*?\n</tool_response>)+\nassistant\n", re.DOTALL)


# ---- verl ---------------------------------------------------------------------------------

# the tool messages of one round, as decoded: "user\n<tool_response>\n...\n</tool_response>" (one
# block per executed call) then the generation prompt "\nassistant\n"; or an interaction's user
# message (ToolAgentLoop._handle_interacting_state): "user\n<feedback>\nassistant\n", right after
# the turn (its <|im_end|> stripped, so no whitespace before "user") or at the very start
_VERL_ROUND = re.compile(r"(\n?(?:user|tool)\n<tool_response>\n.*?\n</tool_response>"
                         r"(?:\n<tool_response>\n.*?\n</tool_response>)*\nassistant\n)"
                         r"|(?:\A|(?<![ \t]))user\n(?!<tool_response>\n).*?\nassistant\n", re.DOTALL)
# an interaction round cut by response_length (run() keeps response_ids[:response_length]; the
# user message is appended without a length check), at the end of the response
_VERL_CUT_ROUND = re.compile(r"(?<!\s)user\n(?:(?!\nassistant\n).)*\Z", re.DOTALL)


def _verl(text: str) -> list[str]:
    """An interaction round that ends the response (the episode terminated after the feedback,
    or the cut) is no turn; a tool round is always followed by a generated turn (an empty one
    if the model stopped)."""
    turns: list[str] = []
    pos = 0
    trailing_user = False
    for m in _VERL_ROUND.finditer(text):
        turns.append(text[pos:m.start()])
        pos = m.end()
        trailing_user = m.group(1) is None and pos == len(text)
    if trailing_user:
        return turns
    tail = text[pos:]
    cut = _VERL_CUT_ROUND.search(tail)
    turns.append(tail[:cut.start()] if cut else tail)
    return turns
