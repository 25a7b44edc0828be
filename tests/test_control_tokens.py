"""The control-token registry on the tiny tokenizer, on Qwen2.5/Qwen3-like stand-ins and on a
tokenizer without control tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from diagnose.chat import ENDOFTEXT, IM_END, IM_START, TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from diagnose.control_tokens import (
    KEY_CONTEXT_ROLES,
    REQUIRED_ROLES,
    ROLES,
    ControlToken,
    ControlTokenRegistry,
    key_contexts,
)
from diagnose.model.tokenizer import QWEN2_PRETOKENIZE_REGEX

# Qwen2.5's added tokens in id order (151643..151664); ``special`` as in its tokenizer_config.
QWEN25_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
# Qwen3 appends these (151665..151668); Qwen2.5 has no single <tool_response> token.
QWEN3_EXTRA = [
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
]

ENGLISH_JSON_CORPUS = [
    "The quick brown fox jumps over the lazy dog. It was a sunny day in the city.",
    "Please send the report to the team before Friday; they need the numbers.",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    '{"id": 42, "items": [{"sku": "A-1", "qty": 3}, {"sku": "B-7", "qty": 0}], "ok": true}',
    'Config: {"model": "qwen", "layers": 24, "heads": 16}\nDone.\n',
    "Alice transferred 120 dollars from account A1 to account B2 on Monday.",
] * 20


def _byte_bpe(corpus: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def _qwen_like(added: list[tuple[str, bool]]) -> PreTrainedTokenizerFast:
    """Stand-in for a Qwen tokenizer: byte-level BPE + Qwen's added tokens after the BPE vocab,
    in Qwen's order and with Qwen's special flags (exact ids differ)."""
    tok = _byte_bpe(ENGLISH_JSON_CORPUS, 700)
    tok.add_tokens([AddedToken(s, normalized=False, special=sp) for s, sp in added])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)


def test_tiny_tokenizer_has_every_role(tiny_tokenizer) -> None:
    reg = ControlTokenRegistry.from_tokenizer(tiny_tokenizer)
    assert reg.missing_roles == [] and reg.complete
    assert reg.roles == list(ROLES)  # call_newline too: '\n' is its own token after <tool_call>
    assert reg.names == [
        "im_start", "im_end", "endoftext", "tool_call_open", "tool_call_close",
        "tool_response_open", "tool_response_close", "call_open_newline", "call_body_start",
    ]
    for t in reg:
        assert tiny_tokenizer.decode([t.token_id]) == t.text
        assert f"lp_ctrl_{t.name}".isidentifier()
    assert reg["im_end"].token_id == tiny_tokenizer.convert_tokens_to_ids(IM_END)
    assert reg["call_body_start"].text == '{"'
    assert reg["call_open_newline"].text == "\n"
    assert [t.name for t in reg.by_role("turn_end")] == ["im_end"]
    assert len(set(reg.ids)) == len(reg)


def test_qwen25_like_tokenizer() -> None:
    tok = _qwen_like(QWEN25_ADDED)
    reg = ControlTokenRegistry.from_tokenizer(tok)
    # Real Qwen2.5 has no single-token <tool_response>; everything else is there.
    assert reg.missing_roles == ["response_open", "response_close"]
    base = tok.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    assert reg["endoftext"].token_id == base  # Qwen's order: endoftext, im_start, im_end, ...
    assert reg["im_start"].token_id == base + 1 and reg["im_end"].token_id == base + 2
    assert reg["tool_call_open"].token_id == base + 14 and reg["tool_call_close"].token_id == base + 15
    assert reg["call_body_start"].text == '{"'
    assert reg["call_open_newline"].text == "\n"


def test_qwen3_like_tokenizer_has_every_role() -> None:
    reg = ControlTokenRegistry.from_tokenizer(_qwen_like(QWEN25_ADDED + QWEN3_EXTRA))
    assert reg.missing_roles == []
    assert set(reg.roles) == set(ROLES)


def test_tokenizer_without_control_tokens() -> None:
    raw = _byte_bpe(ENGLISH_JSON_CORPUS, 500)
    for tok in (raw, PreTrainedTokenizerFast(tokenizer_object=raw)):
        reg = ControlTokenRegistry.from_tokenizer(tok)
        assert reg.missing_roles == [r for r in REQUIRED_ROLES if r != "call_body_start"]
        assert not reg.complete
        # the body start still exists as text: it is the first token covering its '{'
        assert reg["call_body_start"].text.startswith("{")
        assert ControlTokenRegistry.from_json(reg.to_json()) == reg


def test_registry_json_round_trip(tiny_tokenizer) -> None:
    reg = ControlTokenRegistry.from_tokenizer(tiny_tokenizer)
    data = json.loads(json.dumps(reg.to_json()))
    assert data[0] == {"name": "im_start", "text": IM_START, "token_id": reg.ids[0], "role": "turn_start"}
    again = ControlTokenRegistry.from_json(data)
    assert again == reg and again.tokens == reg.tokens
    assert ControlTokenRegistry.from_json([]).missing_roles == list(REQUIRED_ROLES)


def test_registry_validation() -> None:
    with pytest.raises(ValueError):
        ControlToken("lp-ctrl", "x", 1, "eos")  # not an identifier
    with pytest.raises(ValueError):
        ControlToken("x", "x", 1, "no_such_role")
    with pytest.raises(ValueError):
        ControlToken("x", "x", -1, "eos")
    t = ControlToken("x", "x", 1, "eos")
    with pytest.raises(ValueError):
        ControlTokenRegistry((t, t))
    with pytest.raises(ValueError):
        ControlTokenRegistry.from_json([{"name": "x"}])
    with pytest.raises(ValueError):
        ControlTokenRegistry.from_json("[]")
    reg = ControlTokenRegistry((t,))
    assert reg.get("missing") is None and reg.id_of("x") == 1 and "x" in reg
    with pytest.raises(KeyError):
        reg["missing"]
    with pytest.raises(ValueError):
        reg.by_role("nope")


def test_key_contexts(tiny_tokenizer) -> None:
    ctx = key_contexts()
    assert ctx["after_call_open"] == "<|im_start|>assistant\n<tool_call>\n"
    assert ctx["turn_start"] == "<|im_start|>assistant\n"
    assert ctx["after_call_close"] == "</tool_call>"
    assert set(KEY_CONTEXT_ROLES) == set(ctx)
    ctx["turn_start"] = "mutated"
    assert key_contexts()["turn_start"] == "<|im_start|>assistant\n"

    reg = ControlTokenRegistry.from_tokenizer(tiny_tokenizer)
    healthy = {
        "turn_start": TOOL_CALL_OPEN,
        "after_call_open": '{"name": "f", "arguments": {}}',
        "after_call_body": TOOL_CALL_CLOSE,
        "after_call_close": IM_END,
    }
    for name, text in key_contexts().items():
        prefix = tiny_tokenizer.encode(text, add_special_tokens=False)
        full = tiny_tokenizer.encode(text + healthy[name], add_special_tokens=False)
        # each context ends on a token boundary, and the next token is the expected role's
        assert full[: len(prefix)] == prefix, name
        expected = reg.by_role(KEY_CONTEXT_ROLES[name]["expected"])
        assert full[len(prefix)] in [t.token_id for t in expected], name
    # after '<tool_call>' the context ends with the call_open_newline token
    assert tiny_tokenizer.encode(ctx["after_call_open"])[-1] == reg["call_open_newline"].token_id
