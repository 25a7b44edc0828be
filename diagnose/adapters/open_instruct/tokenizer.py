"""A tokenizer for formats that save token ids only (open-instruct): loaded from a local path,
never downloaded, and wrapped so that every adapter decodes the same way (special tokens kept).

Why a wrapper: the ids come from a ``tokenizers.Tokenizer`` (a folder's ``tokenizer.json``, the
fast path: no transformers import) or a transformers tokenizer (folders without one); both
decode and encode with slightly different signatures.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LoadedTokenizer", "TokenizerError", "load_tokenizer", "tokenizer_hint"]


class TokenizerError(ValueError):
    """A tokenizer path that cannot be used; the message says why and what to do."""


def tokenizer_hint(model: str | None = None) -> str:
    """How to give the scan a tokenizer (quoted in notes and issues)."""
    for_model = f" of {model}" if model else ""
    return (f"pass the tokenizer{for_model} as `diagnose scan RUN --tokenizer PATH` (a local folder with "
            "tokenizer.json, e.g. the model's checkpoint folder; nothing is downloaded); for Qwen2.5 build "
            "one offline with `diagnose tokenizer qwen2.5 --out DIR` (needs the [qwen] extra)")


@dataclass
class LoadedTokenizer:
    """``decode(ids)`` with special tokens kept, ``encode(text)`` without added BOS/EOS, and the
    files it was read from (part of the scan cache's fingerprint: another tokenizer, another
    reading)."""

    backend: Any
    source: str
    files: list[Path] = field(default_factory=list)

    def encode(self, text: str) -> list[int]:
        out = self.backend.encode(text, add_special_tokens=False)
        return [int(i) for i in getattr(out, "ids", out)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(ids if isinstance(ids, list) else [int(i) for i in ids], skip_special_tokens=False)

    def single_id(self, text: str) -> int | None:
        """The id of ``text`` if it is exactly one token, else None."""
        ids = self.encode(text)
        return ids[0] if len(ids) == 1 and self.decode(ids) == text else None

    @functools.cached_property
    def vocab_size(self) -> int | None:
        for name in ("get_vocab_size", "__len__"):
            fn = getattr(self.backend, name, None)
            if callable(fn):
                try:
                    return int(fn())
                except (TypeError, ValueError):
                    continue
        return None


def load_tokenizer(spec: Any) -> LoadedTokenizer:
    """``spec``: a tokenizer object (anything with ``encode``/``decode``), a folder (with
    ``tokenizer.json``, or any layout transformers loads offline), a ``tokenizer.json`` file, or
    a hub id (``Qwen/Qwen2.5-7B-Instruct``) whose tokenizer.json is in the local Hugging Face
    cache. Raises `TokenizerError` naming the path and what is wrong."""
    if hasattr(spec, "decode") and hasattr(spec, "encode") and not isinstance(spec, (str, os.PathLike)):
        return LoadedTokenizer(spec, type(spec).__name__)
    p = Path(spec).expanduser()
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except OSError as e:
        raise TokenizerError(f"tokenizer {p}: cannot access ({e})") from None
    if not exists:
        cached = _hub_cache(str(spec))
        if cached is None:
            raise TokenizerError(f"tokenizer {p}: no such file or directory (nor a hub id with a tokenizer.json "
                                 "in the local Hugging Face cache)")
        p, is_dir = cached, False
    tj = p / "tokenizer.json" if is_dir else p
    if tj.is_file() and tj.suffix == ".json":
        try:
            st = tj.stat()
            return LoadedTokenizer(_from_file(str(tj.resolve()), st.st_size, st.st_mtime_ns), str(tj), [tj])
        except ImportError:
            raise TokenizerError("reading a tokenizer needs the `tokenizers` package "
                                 "(pip install 'collapse-diagnostics[model]')") from None
        except Exception as e:  # noqa: BLE001 - a corrupt tokenizer.json raises the Rust side's errors
            raise TokenizerError(f"tokenizer {tj}: not a readable tokenizer.json ({_short(e)})") from None
    if not is_dir:
        raise TokenizerError(f"tokenizer {p}: expected a folder with tokenizer.json, or a tokenizer.json file")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TokenizerError(f"tokenizer {p}: no tokenizer.json, and reading other tokenizer layouts needs "
                             "transformers (pip install 'collapse-diagnostics[model]')") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a bad folder
        raise TokenizerError(f"tokenizer {p}: transformers cannot load it offline ({_short(e)})") from None
    files = [f for f in sorted(p.iterdir()) if f.is_file() and ("token" in f.name or f.suffix in (".model", ".txt"))]
    return LoadedTokenizer(tok, str(p), files)


@functools.lru_cache(maxsize=4)
def _from_file(path: str, size: int, mtime_ns: int) -> Any:
    """A ``tokenizer.json`` read once per content (size and mtime in the key): a 151k-token BPE
    takes a second or two to build, and a dashboard or a re-scan loads the same one again."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def _hub_cache(repo_id: str) -> Path | None:
    """``tokenizer.json`` of a hub id already in the local Hugging Face cache (no download)."""
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        hit = try_to_load_from_cache(repo_id, "tokenizer.json")
    except Exception:  # noqa: BLE001 - an invalid repo id raises a validation error
        return None
    return Path(hit) if isinstance(hit, str) else None


def _short(e: BaseException, n: int = 200) -> str:
    from diagnose.error_line import error_line

    return error_line(e, limit=n)
