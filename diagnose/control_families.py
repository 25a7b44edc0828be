"""Chat-format families and their control strings: which strings the registry looks for in a
tokenizer, which role each plays, and the key contexts of the family's tool-call format.

Why families: ``<tool_call>`` is one token in Qwen2.5 but five in SmolLM2; Llama 3.1 has no call
tag at all for JSON calls (the call is a JSON object right after the assistant header, closed by
``<|eot_id|>``, or ``<|python_tag|>`` ... ``<|eom_id|>`` for built-in tools); Mistral opens calls
with ``[TOOL_CALLS]`` and closes them with ``</s>``. The family is read from the chat template
text where there is one (:func:`detect_family`), else from the vocabulary.

Each :class:`ControlString` is either *special* (registered only if it is exactly one token: a
turn marker that is several BPE tokens means the tokenizer does not speak this format) or
*markup* (text such as ``<tool_call>``, registered with its whole id sequence when it is several
tokens). Facts followed, per family:

- ChatML / Hermes (Qwen2.5, Qwen3, Qwen3.5, SmolLM2): TRL's stored templates
  ``trl/chat_templates/qwen2_5.jinja``, ``qwen3.jinja``, ``qwen3_5_think.jinja`` (XML calls
  ``<tool_call>\\n<function=name>``) and the added tokens of the released tokenizers
  (``diagnose/model/qwen_tokenizer.py``); SmolLM2-135M-Instruct's GGUF tokenizer.
- Llama 3.1+: TRL's ``trl/chat_templates/llama3_1.jinja`` (header ``<|start_header_id|>assistant
  <|end_header_id|>\\n\\n``, JSON calls ``{"name": ..., "parameters": ...}``, ``<|python_tag|>`` and
  ``<|eom_id|>`` in ipython mode, tool results under an ``ipython`` header).
- Mistral (v3 / Tekken): ``[INST]``/``[/INST]``, ``[TOOL_CALLS][{...}]</s>``,
  ``[TOOL_RESULTS]``/``[/TOOL_RESULTS]`` (the Tekken special-token table as torchtune's Mistral
  Small tokenizer lists it; ``</s>`` as the call's end as in kani's Mistral tool-call parser).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
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
    "FAMILIES",
    "ChatFamily",
    "ControlString",
    "chat_template_text",
    "detect_family",
    "family_named",
    "infer_family_from_texts",
]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
EOT_ID, EOM_ID, PYTHON_TAG, END_OF_TEXT = "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<|end_of_text|>"
LLAMA_ASSISTANT = f"{START_HEADER}assistant{END_HEADER}\n\n"
LLAMA_IPYTHON = f"{START_HEADER}ipython{END_HEADER}\n\n"
INST, INST_CLOSE, TOOL_CALLS, EOS_S = "[INST]", "[/INST]", "[TOOL_CALLS]", "</s>"
TOOL_RESULTS, TOOL_RESULTS_CLOSE = "[TOOL_RESULTS]", "[/TOOL_RESULTS]"


@dataclass(frozen=True)
class ControlString:
    """One control string a family uses: registry ``name``, ``text``, ``role``, and ``special``
    (True: registered only as a single token; False: markup, registered as its id sequence)."""

    name: str
    text: str
    role: str
    special: bool = True


@dataclass(frozen=True)
class ChatFamily:
    """A chat format's control strings and tool-call layout.

    ``body_probe``: text containing a call whose JSON body starts at character ``body_at`` (the
    registry's ``call_body_start`` is the token covering that character); ``newline_at``: the
    character offset of a newline after the call tag (``call_newline`` if it is its own token).
    ``key_contexts`` / ``key_context_roles``: as :data:`diagnose.control_tokens.KEY_CONTEXTS`.
    ``shared_roles``: roles this format plays with another role's token (Mistral closes a call
    with ``</s>``, the turn end), never reported missing. ``template_markers``: strings whose
    presence in a chat template names the family; ``vocab_markers``: single tokens that do.
    """

    name: str
    strings: tuple[ControlString, ...]
    body_probe: str
    body_at: int
    newline_at: int | None
    key_contexts: Mapping[str, str]
    key_context_roles: Mapping[str, Mapping[str, str | None]]
    shared_roles: Mapping[str, str] = field(default_factory=dict)
    template_markers: tuple[str, ...] = ()
    vocab_markers: tuple[str, ...] = ()


# ---- ChatML / Hermes ----------------------------------------------------------------------------

_HERMES_BODY = '{"name": "f", "arguments": {}}'
_CHATML_STRINGS = (
    ControlString("im_start", IM_START, "turn_start"),
    ControlString("im_end", IM_END, "turn_end"),
    ControlString("endoftext", ENDOFTEXT, "eos"),
    ControlString("tool_call_open", TOOL_CALL_OPEN, "call_open", special=False),
    ControlString("tool_call_close", TOOL_CALL_CLOSE, "call_close", special=False),
    ControlString("tool_response_open", TOOL_RESPONSE_OPEN, "response_open", special=False),
    ControlString("tool_response_close", TOOL_RESPONSE_CLOSE, "response_close", special=False),
    ControlString("think_open", THINK_OPEN, "think_open"),
    ControlString("think_close", THINK_CLOSE, "think_close"),
)
_CHATML_CONTEXTS = {
    # first token of an assistant turn: <tool_call> (call) vs text (answer) vs <|im_end|> (empty)
    "turn_start": ASSISTANT_PREFIX,
    # inside a call block: '{"' belongs here; the collapse puts <|im_end|> here instead
    "after_call_open": ASSISTANT_PREFIX + TOOL_CALL_OPEN + "\n",
    # after a complete call body: '</tool_call>' closes the block
    "after_call_body": ASSISTANT_PREFIX + TOOL_CALL_OPEN + "\n" + _HERMES_BODY + "\n",
    # after a call block: <|im_end|> ends the turn (or '\n<tool_call>' starts another call)
    "after_call_close": TOOL_CALL_CLOSE,
}
_CHATML_ROLES = {
    "turn_start": {"expected": "call_open", "collapse": "turn_end"},
    "after_call_open": {"expected": "call_body_start", "collapse": "turn_end"},
    "after_call_body": {"expected": "call_close", "collapse": "turn_end"},
    "after_call_close": {"expected": "turn_end", "collapse": None},
}

CHATML = ChatFamily(
    name="chatml",
    strings=_CHATML_STRINGS,
    body_probe=TOOL_CALL_OPEN + "\n" + _HERMES_BODY,
    body_at=len(TOOL_CALL_OPEN) + 1,
    newline_at=len(TOOL_CALL_OPEN),
    key_contexts=_CHATML_CONTEXTS,
    key_context_roles=_CHATML_ROLES,
    template_markers=(IM_START,),
    vocab_markers=(IM_START, IM_END),
)

# Qwen3.5/3.6 (qwen3_5_think.jinja): '<tool_call>\n<function=name>\n<parameter=...>' bodies.
_XML_BODY = "<function=f>\n</function>"
CHATML_XML = ChatFamily(
    name="chatml_xml",
    strings=_CHATML_STRINGS,
    body_probe=TOOL_CALL_OPEN + "\n" + _XML_BODY,
    body_at=len(TOOL_CALL_OPEN) + 1,
    newline_at=len(TOOL_CALL_OPEN),
    key_contexts={**_CHATML_CONTEXTS,
                  "after_call_body": ASSISTANT_PREFIX + TOOL_CALL_OPEN + "\n" + _XML_BODY + "\n"},
    key_context_roles=_CHATML_ROLES,
    template_markers=("<function=",),
)

# ---- Llama 3.1+ ---------------------------------------------------------------------------------

_LLAMA_BODY = '{"name": "f", "parameters": {}}'
LLAMA3 = ChatFamily(
    name="llama3",
    strings=(
        ControlString("start_header", START_HEADER, "turn_start"),
        ControlString("end_header", END_HEADER, "header_end"),
        ControlString("eot_id", EOT_ID, "turn_end"),
        ControlString("end_of_text", END_OF_TEXT, "eos"),
        ControlString("python_tag", PYTHON_TAG, "call_open"),
        ControlString("eom_id", EOM_ID, "call_close"),
        # a tool result is a turn of its own: the ipython header (several tokens) ... <|eot_id|>
        ControlString("ipython_header", LLAMA_IPYTHON, "response_open", special=False),
    ),
    body_probe=LLAMA_ASSISTANT + _LLAMA_BODY,
    body_at=len(LLAMA_ASSISTANT),
    newline_at=None,
    key_contexts={
        # JSON calls start right after the header: '{"' (call) vs text vs <|eot_id|> (empty)
        "turn_start": LLAMA_ASSISTANT,
        # a complete JSON call: <|eot_id|> ends it (<|eom_id|> in ipython mode)
        "after_call_body": LLAMA_ASSISTANT + _LLAMA_BODY,
    },
    key_context_roles={
        "turn_start": {"expected": "call_body_start", "collapse": "turn_end"},
        "after_call_body": {"expected": "turn_end", "collapse": None},
    },
    shared_roles={"response_close": "turn_end"},
    template_markers=(START_HEADER,),
    vocab_markers=(START_HEADER, EOT_ID),
)

# ---- Mistral ------------------------------------------------------------------------------------

_MISTRAL_BODY = '[{"name": "f", "arguments": {}}]'
MISTRAL = ChatFamily(
    name="mistral",
    strings=(
        ControlString("inst_open", INST, "turn_start"),
        ControlString("inst_close", INST_CLOSE, "header_end"),
        ControlString("eos", EOS_S, "turn_end"),
        ControlString("tool_calls", TOOL_CALLS, "call_open"),
        ControlString("tool_results_open", TOOL_RESULTS, "response_open"),
        ControlString("tool_results_close", TOOL_RESULTS_CLOSE, "response_close"),
    ),
    body_probe=TOOL_CALLS + _MISTRAL_BODY,
    body_at=len(TOOL_CALLS),
    newline_at=None,
    key_contexts={
        "turn_start": INST_CLOSE,
        "after_call_open": INST_CLOSE + TOOL_CALLS,
        "after_call_body": INST_CLOSE + TOOL_CALLS + _MISTRAL_BODY,
    },
    key_context_roles={
        "turn_start": {"expected": "call_open", "collapse": "turn_end"},
        "after_call_open": {"expected": "call_body_start", "collapse": "turn_end"},
        "after_call_body": {"expected": "call_close", "collapse": None},
    },
    # '</s>' ends the assistant turn, the call and the sequence
    shared_roles={"call_close": "turn_end", "eos": "turn_end"},
    template_markers=(INST,),
    vocab_markers=(INST, INST_CLOSE),
)

# ---- fallback: the ChatML strings, single tokens only (today's behaviour for unknown formats) -----

UNKNOWN = ChatFamily(
    name="unknown",
    strings=tuple(ControlString(s.name, s.text, s.role, True) for s in _CHATML_STRINGS),
    body_probe=CHATML.body_probe,
    body_at=CHATML.body_at,
    newline_at=CHATML.newline_at,
    key_contexts=_CHATML_CONTEXTS,
    key_context_roles=_CHATML_ROLES,
)

#: Detection order: the first family whose template marker (or else vocabulary markers) match.
FAMILIES: tuple[ChatFamily, ...] = (LLAMA3, MISTRAL, CHATML_XML, CHATML)
_BY_NAME = {f.name: f for f in FAMILIES + (UNKNOWN,)}


def family_named(name: str) -> ChatFamily:
    """The family called ``name`` (``unknown`` for a name not known)."""
    return _BY_NAME.get(name, UNKNOWN)


def chat_template_text(tokenizer: Any) -> str:
    """The tokenizer's chat template(s) as one string ("" when it has none)."""
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, Mapping):
        return "\n".join(str(v) for v in tpl.values())
    if isinstance(tpl, (list, tuple)):  # older transformers: [{"name", "template"}]
        return "\n".join(str(t.get("template", "")) for t in tpl if isinstance(t, Mapping))
    return tpl if isinstance(tpl, str) else ""


def detect_family(tokenizer: Any, is_single: Any) -> ChatFamily:
    """The family of ``tokenizer``: named by its chat template where it has one, else by the
    single tokens of its vocabulary (``is_single(text) -> bool``); :data:`UNKNOWN` otherwise."""
    template = chat_template_text(tokenizer)
    if template:
        for fam in FAMILIES:
            if any(m in template for m in fam.template_markers):
                return fam
    for fam in FAMILIES:
        if fam.vocab_markers and all(is_single(m) for m in fam.vocab_markers):
            return fam
    return UNKNOWN


def infer_family_from_texts(texts: set[str]) -> ChatFamily:
    """The family of a registry read back from JSON, from the texts it holds (run.json stores a
    plain token list, so the family is not written)."""
    for fam in (LLAMA3, MISTRAL, CHATML):
        if any(m in texts for m in fam.vocab_markers):
            return fam
    return UNKNOWN
