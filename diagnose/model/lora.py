"""PEFT adapter checkpoints (LoRA) as models: find their base, load base + adapter, merge.

Why: most RL practitioners train with LoRA, and a TRL run with ``peft_config`` saves every
``checkpoint-N/`` as an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``,
`peft.PeftModel.save_pretrained`), not as a model. The base comes from ``adapter_config.json``'s
``base_model_name_or_path`` (a local folder, a hub id already in the local HF cache, or one of our
model names) or from ``base=`` when that path is not on this machine (the run was trained
elsewhere). The adapter is merged into the base (`merge_and_unload`) so scoring is a plain
forward pass. Only safetensors are read: an adapter saved as ``adapter_model.bin`` (a pickle)
is refused, never unpickled.

Public API::

    is_adapter_dir(path) -> bool
    adapter_base(path, base=None) -> Path
    load_adapter_model(path, *, base=None, dtype=None) -> model (merged, eval mode, on CPU)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterError", "adapter_base", "adapter_problem", "is_adapter_dir",
           "load_adapter_model"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"


class AdapterError(ValueError):
    """An adapter folder that cannot be loaded; one line naming the file and why."""


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    """A PEFT adapter folder: ``adapter_config.json`` and no full model (``config.json`` + weights
    make a merged checkpoint, loaded as a model)."""
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def adapter_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the adapter folder ``path`` cannot be loaded as it is (one line), or None."""
    p = Path(path)
    if not (p / ADAPTER_WEIGHTS).is_file():
        if (p / ADAPTER_PICKLE).is_file():
            return f"{ADAPTER_PICKLE} is a pickle and is never loaded; save the adapter with safetensors"
        return f"no {ADAPTER_WEIGHTS} beside {ADAPTER_CONFIG}"
    return None


def _config(path: Path) -> dict[str, Any]:
    cfg_file = path / ADAPTER_CONFIG
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AdapterError(f"{cfg_file}: not readable as JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_file}: not a JSON object")
    return cfg


def adapter_base(path: str | os.PathLike[str], base: str | os.PathLike[str] | None = None) -> Path:
    """The base model folder of adapter ``path``: ``base`` when given, else its
    ``base_model_name_or_path`` resolved locally (`resolve_model_path`: a folder, a cached hub
    id, ``tiny``/``tiny-base``/a GGUF model name). Raises `AdapterError` saying to pass a base
    when the recorded one is not on this machine."""
    from diagnose.model.resolve import resolve_model_path

    p = Path(path)
    if base is not None:
        try:
            return resolve_model_path(base)
        except ValueError as e:
            raise AdapterError(f"base model {base}: {e}") from None
    name = _config(p).get("base_model_name_or_path")
    if not isinstance(name, str) or not name.strip():
        raise AdapterError(f"{p / ADAPTER_CONFIG}: no base_model_name_or_path; pass the base model folder (--base DIR)")
    try:
        return resolve_model_path(name)
    except ValueError:
        raise AdapterError(f"{p / ADAPTER_CONFIG}: its base model {name!r} is not on this machine (not a local "
                           "model folder, not in the local HF cache); pass the base model folder (--base DIR)") from None


def load_adapter_model(path: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None,
                       dtype: Any = None) -> Any:
    """The base model with the adapter of ``path`` merged in, in eval mode on CPU (``dtype``: a
    torch dtype or None for float32). Base weights are read from safetensors only."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    p = Path(path)
    why = adapter_problem(p)
    if why:
        raise AdapterError(f"{p}: {why}")
    base_dir = adapter_base(p, base)
    kw: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    if dtype is not None:
        kw["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kw)
    # adapter_model.safetensors (checked above, so peft never falls back to the .bin); merged for a plain forward
    model = PeftModel.from_pretrained(model, str(p), is_trainable=False)
    model = model.merge_and_unload()
    model.eval()
    return model
