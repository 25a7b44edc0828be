"""The embedded default model: tokenizer, chat template, model round trips, determinism."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from diagnose.chat import (
    CHAT_TEMPLATE,
    CONTROL_STRINGS,
    ENDOFTEXT,
    IM_END,
    IM_START,
    TOOL_CALL_OPEN,
    render_chat,
)
from diagnose.model import build as model_build
from diagnose.model.build import MODEL_INFO_FILE, build_tiny_model, default_model_dir, ensure_default_model, tiny_config
from diagnose.model.resolve import load_model_and_tokenizer
from diagnose.model.tokenizer import MODEL_MAX_LENGTH, build_tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name, e.g. Zürich"}},
            "required": ["city"],
        },
    },
}
TRANSFER = {
    "type": "function",
    "function": {
        "name": "transfer",
        "description": "Move money between two accounts.",
        "parameters": {
            "type": "object",
            "properties": {
                "from_id": {"type": "string"},
                "to_id": {"type": "string"},
                "amount": {"type": "number"},
            },
            "required": ["from_id", "to_id", "amount"],
        },
    },
}
TOOLS = [WEATHER, TRANSFER]

CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

#: (id, messages, tools, add_generation_prompt)
CONVERSATIONS = [
    ("plain_default_system", [{"role": "user", "content": "Hi!"}], None, False),
    (
        "plain_system_answer",
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ],
        None,
        False,
    ),
    ("generation_prompt", [{"role": "user", "content": "Hi!"}], None, True),
    (
        "tools_raw_call_text",
        [
            {"role": "system", "content": "You are an agent."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": CALL_TEXT},
            {"role": "tool", "content": '{"temp_c": 21, "sky": "clear"}'},
            {"role": "assistant", "content": "It is 21 °C and clear."},
        ],
        TOOLS,
        False,
    ),
    (
        "tools_default_system_gen_prompt",
        [{"role": "user", "content": "Weather in Paris?"}],
        TOOLS,
        True,
    ),
    (
        "consecutive_tool_messages",
        [
            {"role": "system", "content": "You are an agent."},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": CALL_TEXT + "\n" + CALL_TEXT.replace("Paris", "Rome"),
            },
            {"role": "tool", "content": '{"temp_c": 21}'},
            {"role": "tool", "content": '{"temp_c": 25}'},
            {"role": "assistant", "content": "Paris 21, Rome 25."},
        ],
        TOOLS,
        True,
    ),
    (
        "structured_tool_calls",
        [
            {"role": "system", "content": "You are an agent."},
            {"role": "user", "content": "Send 10 from A1 to B2, then check Oslo."},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {
                            "name": "transfer",
                            "arguments": {"from_id": "A1", "to_id": "B2", "amount": 10},
                        },
                    },
                    {"name": "get_weather", "arguments": {"city": "Oslo"}},
                ],
            },
            {"role": "tool", "content": '{"ok": true}'},
            {"role": "tool", "content": '{"temp_c": -3}'},
            {
                "role": "assistant",
                "content": "Let me check again.",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
            },
            {"role": "tool", "content": '{"temp_c": -2}'},
            {"role": "assistant", "content": "Done; Oslo is at -2 °C."},
        ],
        TOOLS,
        False,
    ),
    (
        "tool_message_first_and_mid_system",
        [
            {"role": "tool", "content": "orphan result"},
            {"role": "user", "content": "go"},
            {"role": "system", "content": "mid-conversation system note"},
            {"role": "assistant", "content": "ok"},
        ],
        None,
        True,
    ),
    (
        "unicode_and_json_in_content",
        [
            {"role": "user", "content": 'Quote: "naïve" — {"a": [1, 2]} 日本'},
            {"role": "assistant", "content": '{"answer": "ß"}'},
        ],
        [WEATHER],
        False,
    ),
]


def test_tokenizer_round_trip(tmp_path: Path) -> None:
    texts = [render_chat(m, tools=t, add_generation_prompt=g) for _, m, t, g in CONVERSATIONS] * 3
    tok = build_tokenizer(texts, vocab_size=512)
    assert len(tok) <= 512
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.chat_template == CHAT_TEMPLATE
    assert loaded.eos_token == IM_END and loaded.pad_token == ENDOFTEXT
    assert loaded.bos_token is None
    assert loaded.model_max_length == MODEL_MAX_LENGTH
    for text in texts + ["naïve 日本 🙂 \t\n  x", ""]:
        ids = loaded.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text, add_special_tokens=False)
        assert loaded.decode(ids) == text  # byte level: lossless


def test_tokenizer_too_small_vocab() -> None:
    with pytest.raises(ValueError):
        build_tokenizer(["abc"], vocab_size=100)


def test_control_tokens_single_ids_and_flags(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    decoder = tok.added_tokens_decoder
    ids = []
    for s in CONTROL_STRINGS:
        enc = tok.encode(s, add_special_tokens=False)
        assert len(enc) == 1, (s, enc)
        ids.append(enc[0])
        assert decoder[enc[0]].content == s
        assert decoder[enc[0]].special == (s in (ENDOFTEXT, IM_START, IM_END))
    assert len(set(ids)) == len(ids)
    # Special tokens are dropped by skip_special_tokens; tool tags (special=False) are kept.
    text = f"{IM_START}assistant\n{CALL_TEXT}{IM_END}"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == f"assistant\n{CALL_TEXT}"
    assert tok.eos_token_id == tok.convert_tokens_to_ids(IM_END)
    assert tok.pad_token_id == tok.convert_tokens_to_ids(ENDOFTEXT)
    assert tok.bos_token_id is None
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)  # no BOS/EOS added


def test_call_body_start_is_one_plain_token(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    ids = tok.encode('<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {}}')
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[:6] == ["<|im_start|>", "assistant", "Ċ", "<tool_call>", "Ċ", '{"'], pieces
    assert ids[5] not in tok.added_tokens_decoder  # a BPE token, not an added one


@pytest.mark.parametrize("vocab_size", [270, 400])
def test_call_body_start_forced_when_not_learned(vocab_size: int) -> None:
    # no '{"' in the corpus; 270: the vocabulary fills up (the merge takes the last slot),
    # 400: it does not (the merge is appended)
    text = "the quick brown fox jumps over the lazy dog while seven wizards quietly hum. " * 20
    tok = build_tokenizer([text], vocab_size=vocab_size)
    pieces = tok.convert_ids_to_tokens(tok.encode(TOOL_CALL_OPEN + '\n{"name": "f"}'))
    assert pieces[:3] == ["<tool_call>", "Ċ", '{"']
    assert (len(tok) == vocab_size) == (vocab_size == 270)
    assert len(tok) <= vocab_size
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize(
    ("messages", "tools", "gen"),
    [c[1:] for c in CONVERSATIONS],
    ids=[c[0] for c in CONVERSATIONS],
)
def test_chat_template_equals_render_chat(tiny_model_dir: Path, messages, tools, gen) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    via_template = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)
    assert via_template == render_chat(messages, tools=tools, add_generation_prompt=gen)


def test_tiny_config_sizes() -> None:
    tok = build_tokenizer(["some text {\"a\": 1}"] * 5, vocab_size=300)
    cfg = tiny_config(tok)
    assert cfg.model_type == "qwen2"
    assert cfg.vocab_size % 64 == 0 and cfg.vocab_size >= len(tok) > cfg.vocab_size - 64
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (128, 4, 4)
    assert (cfg.num_key_value_heads, cfg.intermediate_size) == (2, 384)
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 2048
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}
    assert rope["rope_theta"] == 10000.0
    assert cfg.eos_token_id == tok.convert_tokens_to_ids(IM_END)
    assert cfg.pad_token_id == tok.convert_tokens_to_ids(ENDOFTEXT)
    small = tiny_config(tok, size="small")
    assert (small.hidden_size, small.num_hidden_layers) == (256, 6)
    with pytest.raises(ValueError):
        tiny_config(tok, size="huge")


def test_built_directory(tiny_model_dir: Path) -> None:
    info = json.loads((tiny_model_dir / MODEL_INFO_FILE).read_text())
    assert info["size"] == "tiny" and info["seed"] == 0 and info["vocab_size"] == 2048
    assert info["n_params"] > 0
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    assert gen["eos_token_id"] == [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)]
    assert (tiny_model_dir / "model.safetensors").is_file()
    # vocab_size is an upper bound: the environment's vocabulary saturates the BPE earlier
    assert len(tok) == info["tokenizer_len"] <= 2048
    assert info["model_vocab_size"] == cfg["vocab_size"] == -(-len(tok) // 64) * 64
    assert info["corpus"] == "diagnose.tasks.tokenizer_corpus()"
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in tiny_model_dir.iterdir())
    # built atomically: no temporary siblings left behind
    assert [p.name for p in tiny_model_dir.parent.iterdir()] == [tiny_model_dir.name]


def test_model_round_trip_identical_logits(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    assert not model.training
    prompt = render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()

    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", local_files_only=True).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)

    # the saved weights are exactly a fresh seeded init of the same config
    torch.manual_seed(0)
    fresh = type(model)(model.config).eval()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, logits)


def test_forward_and_greedy_generate(tiny_model_dir: Path) -> None:
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS, add_generation_prompt=True,
        tokenize=False,
    )
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert out.shape[0] == 1 and enc["input_ids"].shape[1] < out.shape[1] <= enc["input_ids"].shape[1] + 8
    assert torch.equal(out[0, : enc["input_ids"].shape[1]], enc["input_ids"][0])
    out2 = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, out2)
    assert isinstance(tok.decode(out[0, enc["input_ids"].shape[1]:]), str)


def test_load_dtype(tiny_model_dir: Path) -> None:
    model, _ = load_model_and_tokenizer(tiny_model_dir, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="nope"):
        load_model_and_tokenizer(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_model_and_tokenizer(empty)
    with pytest.raises(ValueError, match="no-such-org/no-such-model"):
        load_model_and_tokenizer("no-such-org/no-such-model")  # not cached: no download attempt


SMALL_TEXTS = [render_chat(m, tools=t, add_generation_prompt=g) for _, m, t, g in CONVERSATIONS] * 4


def test_build_is_deterministic(tmp_path: Path) -> None:
    a = build_tiny_model(tmp_path / "a", texts=SMALL_TEXTS, vocab_size=600, seed=3)
    b = build_tiny_model(tmp_path / "b", texts=SMALL_TEXTS, vocab_size=600, seed=3)
    c = build_tiny_model(tmp_path / "c", texts=SMALL_TEXTS, vocab_size=600, seed=4)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    # rebuilding over an existing directory replaces it atomically
    build_tiny_model(a, texts=SMALL_TEXTS, vocab_size=600, seed=4)
    assert all(torch.equal(load_file(a / "model.safetensors")[k], wc[k]) for k in wc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_tokenizer_training_deterministic_across_processes(tmp_path: Path) -> None:
    """Rust hash maps are seeded per process: the vocabulary must not depend on that."""
    script = (
        "import json, sys\n"
        "from diagnose.model.tokenizer import build_tokenizer\n"
        "texts = json.loads(sys.stdin.read())\n"
        "tok = build_tokenizer(texts, vocab_size=600)\n"
        "print(tok.backend_tokenizer.to_str())\n"
    )
    root = Path(__file__).resolve().parents[1]
    outs = [
        subprocess.run(
            [sys.executable, "-c", script], input=json.dumps(SMALL_TEXTS), capture_output=True,
            text=True, check=True, cwd=root,
        ).stdout
        for _ in range(2)
    ]
    assert outs[0] == outs[1]
    assert outs[0] == build_tokenizer(SMALL_TEXTS, vocab_size=600).backend_tokenizer.to_str() + "\n"


def test_default_model_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DIAGNOSE_HOME", str(tmp_path))
    assert default_model_dir() == tmp_path / "tiny-qwen2-v1"
    monkeypatch.delenv("DIAGNOSE_HOME")
    assert default_model_dir() == Path.home() / ".cache" / "collapse-diagnostics" / "tiny-qwen2-v1"


def test_ensure_default_model_builds_once_under_lock(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DIAGNOSE_HOME", str(tmp_path))
    calls = []
    real_build = model_build.build_tiny_model

    def slow_small_build(out_dir, **kw):
        calls.append(out_dir)
        time.sleep(0.3)  # give the other thread time to reach the lock
        return real_build(out_dir, texts=SMALL_TEXTS, vocab_size=600)

    monkeypatch.setattr(model_build, "build_tiny_model", slow_small_build)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_default_model())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [tmp_path / "tiny-qwen2-v1"] * 3
    assert ensure_default_model() == tmp_path / "tiny-qwen2-v1" and len(calls) == 1
    # "tiny" resolves to the default
    model, tok = load_model_and_tokenizer("tiny")
    assert model.config.model_type == "qwen2" and len(tok) <= 600


# ---------------------------------------------------------------- the embedded base model


@pytest.fixture(scope="module")
def base_home(tmp_path_factory):
    """A private DIAGNOSE_HOME, so the base model is assembled from scratch here."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIAGNOSE_HOME", str(home))
        yield home


def test_base_model_has_the_skill(base_home):
    """The shipped weights fit the locally built tokenizer and solve held-out tasks greedily
    (the untrained default solves none: tests/test_tasks.py, docs/models.md)."""
    from diagnose.model.generation import hf_policy
    from diagnose.tasks import make_tasks, run_episode
    from diagnose.model.build import ensure_base_model

    path = ensure_base_model()
    assert path.parent == base_home and (path / "model.safetensors").is_file()
    model, tok = load_model_and_tokenizer("tiny-base")
    policy = hf_policy(model, tok, greedy=True, max_new_tokens=64)
    eps = [run_episode(t, policy, max_turns=4) for t in make_tasks("test", 8, seed=4242)]
    calls_right = sum(e.score.calls_right for e in eps) / len(eps)
    assert calls_right >= 0.5, [e.messages[-1]["content"][:80] for e in eps]


def test_base_model_refuses_a_different_tokenizer(base_home, tmp_path, monkeypatch):
    import json
    import shutil


    fake = tmp_path / "tiny_base"
    shutil.copytree(model_build.BASE_WEIGHTS_DIR, fake)
    meta = json.loads((fake / "base.json").read_text())
    meta["tokenizer_sha256"] = "0" * 64
    (fake / "base.json").write_text(json.dumps(meta))
    monkeypatch.setattr(model_build, "BASE_WEIGHTS_DIR", fake)
    monkeypatch.setattr(model_build, "base_model_dir", lambda: tmp_path / "assembled")
    with pytest.raises(model_build.BaseModelError, match="tokenizer.json"):
        model_build.ensure_base_model()


def test_base_model_is_reassembled_when_the_shipped_weights_change(base_home, tmp_path, monkeypatch):
    """A package update with new base weights must not keep serving the old assembled copy."""
    import json
    import shutil


    path = model_build.ensure_base_model()
    fake = tmp_path / "tiny_base"
    shutil.copytree(model_build.BASE_WEIGHTS_DIR, fake)
    meta = json.loads((fake / "base.json").read_text())
    meta["weights_sha256"] = "f" * 64
    (fake / "base.json").write_text(json.dumps(meta))
    monkeypatch.setattr(model_build, "BASE_WEIGHTS_DIR", fake)
    assert model_build.ensure_base_model() == path
    assert json.loads((path / model_build.MODEL_INFO_FILE).read_text())["base"] == meta
