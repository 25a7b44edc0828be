"""Building the embedded models: the tiny, randomly initialised Qwen2 causal LM (the default,
built locally on first use) and the base model (the default's tokenizer and config with the
weights shipped in ``diagnose/models/tiny_base/``).

The model is a standard ``Qwen2ForCausalLM``, so every code path that works on it works on a
real Qwen2.5 checkpoint given by path.

Public API::

    tiny_config(tokenizer, size="tiny") -> Qwen2Config
    build_tiny_model(out_dir, *, texts=None, vocab_size=2048, size="tiny", seed=0) -> Path
    default_model_dir() -> Path
    ensure_default_model() -> Path
    ensure_base_model() -> Path
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from diagnose.chat import ENDOFTEXT, IM_END
from diagnose.model.tokenizer import DEFAULT_VOCAB_SIZE, MODEL_MAX_LENGTH, build_tokenizer

__all__ = [
    "BASE_NAMES",
    "BASE_WEIGHTS_DIR",
    "DEFAULT_MODEL_SUBDIR",
    "MODEL_INFO_FILE",
    "SIZES",
    "BaseModelError",
    "base_model_dir",
    "build_tiny_model",
    "default_model_dir",
    "ensure_base_model",
    "ensure_default_model",
    "sha256_file",
    "tiny_config",
]

DEFAULT_MODEL_SUBDIR = "tiny-qwen2-v1"
MODEL_INFO_FILE = "diagnose_model.json"
FORMAT_VERSION = 1

#: Architecture sizes. head_dim = hidden / heads = 32 in both.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=384,
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=768,
    ),
}


# --------------------------------------------------------------------------------------------
# model


def tiny_config(tokenizer, size: str = "tiny"):
    """A Qwen2 config sized ``size`` ("tiny" or "small") for ``tokenizer``.

    The embedding matrix has ``len(tokenizer)`` rounded up to a multiple of 64 rows (Qwen pads
    its vocabulary the same way); ``bos_token_id`` follows Qwen2.5 (``<|endoftext|>``) since the
    tokenizer itself adds no BOS.
    """
    from transformers import Qwen2Config

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    vocab = -(-len(tokenizer) // 64) * 64
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        bos_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    return Qwen2Config(
        vocab_size=vocab,
        max_position_embeddings=MODEL_MAX_LENGTH,
        rope_theta=10000.0,  # transformers 5 stores it as rope_parameters["rope_theta"]
        tie_word_embeddings=True,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        use_sliding_window=False,
        attention_dropout=0.0,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **SIZES[size],
    )


def _default_texts() -> list[str]:
    from diagnose.tasks import tokenizer_corpus

    return list(tokenizer_corpus())


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    *,
    texts: Iterable[str] | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    size: str = "tiny",
    seed: int = 0,
) -> Path:
    """Build tokenizer + randomly initialised ``Qwen2ForCausalLM`` and save both to ``out_dir``.

    ``texts`` defaults to ``diagnose.tasks.tokenizer_corpus()`` (rendered gold conversations).
    The directory is assembled in a temporary sibling and renamed into place, so ``out_dir``
    either does not exist or is complete; an existing ``out_dir`` is replaced. Same arguments
    give the same vocabulary and bit-identical weights.
    """
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    out = Path(out_dir).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    corpus = list(texts) if texts is not None else _default_texts()
    if not corpus:
        raise ValueError("build_tiny_model: empty tokenizer corpus")
    tokenizer = build_tokenizer(corpus, vocab_size=vocab_size)
    config = tiny_config(tokenizer, size=size)

    with _torch_seed(seed):
        model = Qwen2ForCausalLM(config)
    model.eval()
    endoftext_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[im_end_id, endoftext_id],
        pad_token_id=endoftext_id,
        do_sample=False,
    )
    n_params = sum(p.numel() for p in model.parameters())

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with _no_progress_bars():
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {
            "format_version": FORMAT_VERSION,
            "kind": "diagnose-tiny-qwen2",
            "architecture": "Qwen2ForCausalLM",
            "size": size,
            **SIZES[size],
            "vocab_size": vocab_size,
            "tokenizer_len": len(tokenizer),
            "model_vocab_size": config.vocab_size,
            "seed": seed,
            "n_params": n_params,
            "n_corpus_texts": len(corpus),
            "corpus": "diagnose.tasks.tokenizer_corpus()" if texts is None else "custom",
            "build_seconds": round(time.perf_counter() - t0, 3),
            "torch_version": torch.__version__,
        }
        (tmp / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        # mkdtemp makes the directory 0700 and some writers create 0600 files: make the model
        # readable like any other cache entry.
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@contextlib.contextmanager
def _no_progress_bars():
    """Silence transformers' progress bars (e.g. "Writing model shards") for the block."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _torch_seed(seed: int):
    """Seed torch's CPU generator for the block and restore its previous state afterwards."""
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move directory ``src`` to ``dst``; an existing ``dst`` is moved aside first, then deleted."""
    try:
        os.rename(src, dst)
        return
    except OSError:
        if not dst.exists():
            raise
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.rename(dst, old / dst.name)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# the embedded default


def default_model_dir() -> Path:
    """``$DIAGNOSE_HOME/tiny-qwen2-v1``, or ``~/.cache/collapse-diagnostics/tiny-qwen2-v1``."""
    home = os.environ.get("DIAGNOSE_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "collapse-diagnostics"
    return base / DEFAULT_MODEL_SUBDIR


def _is_built(path: Path) -> bool:
    return (path / MODEL_INFO_FILE).is_file() and (path / "config.json").is_file()


@contextlib.contextmanager
def _file_lock(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX: the atomic rename still protects
            yield
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_default_model() -> Path:
    """Return :func:`default_model_dir`, building the embedded default there first if missing.

    A lock file beside the directory keeps concurrent processes from building it twice.
    """
    path = default_model_dir()
    if _is_built(path):
        return path
    with _file_lock(path.parent / f"{path.name}.lock"):
        if not _is_built(path):
            build_tiny_model(path)
    return path


# --------------------------------------------------------------------------------------------
# the embedded base model: the tiny model with the skill, weights shipped with the package

BASE_MODEL_SUBDIR = "tiny-qwen2-base-v1"
BASE_WEIGHTS_DIR = Path(__file__).parents[1] / "models" / "tiny_base"  # model.safetensors + base.json
BASE_NAMES = ("tiny-base",)


class BaseModelError(RuntimeError):
    """The shipped base weights are missing or do not fit the locally built tokenizer."""


def sha256_file(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def base_model_dir() -> Path:
    return default_model_dir().parent / BASE_MODEL_SUBDIR


def _base_assembled(path: Path, meta: dict[str, Any]) -> bool:
    """``path`` holds the base model assembled from *these* shipped weights (``meta``: their
    ``base.json``), so a package update with new weights re-assembles it."""
    if not (_is_built(path) and (path / "model.safetensors").is_file()):
        return False
    try:
        return json.loads((path / MODEL_INFO_FILE).read_text()).get("base") == meta
    except (OSError, ValueError):
        return False


def ensure_base_model() -> Path:
    """The embedded *base* model: the default's tokenizer and config with the shipped weights
    (``diagnose/models/tiny_base/``, produced by ``train-minimal sft --preset base``; see
    docs/models.md). Why shipped: the tiny model needs ~700 SFT steps (~25 min on a CPU core) to
    learn to copy ids and names from its context; every RL run starts from a pretrained model,
    and ours should too, without that wait. The tokenizer is rebuilt locally (deterministic) and
    checked against the hash recorded when the weights were trained."""
    weights, meta_file = BASE_WEIGHTS_DIR / "model.safetensors", BASE_WEIGHTS_DIR / "base.json"
    if not weights.is_file() or not meta_file.is_file():
        raise BaseModelError(f"{BASE_WEIGHTS_DIR}: the shipped base weights are missing (a broken install?)")
    meta = json.loads(meta_file.read_text())
    path = base_model_dir()
    if _base_assembled(path, meta):
        return path
    src = ensure_default_model()
    got = sha256_file(src / "tokenizer.json")
    if got != meta.get("tokenizer_sha256"):
        raise BaseModelError(
            f"{src / 'tokenizer.json'}: the locally built tokenizer (sha256 {got[:12]}) differs from the one "
            f"the base weights were trained with ({str(meta.get('tokenizer_sha256'))[:12]}); rebuild with "
            "`diagnose build-model` or retrain the base (`train-minimal sft --preset base`)")
    with _file_lock(path.parent / f"{path.name}.lock"):
        if not _base_assembled(path, meta):
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
            for f in src.iterdir():
                if f.is_file() and f.suffix != ".lock" and f.name != "model.safetensors":
                    shutil.copy2(f, tmp / f.name)
            shutil.copy2(weights, tmp / "model.safetensors")
            info = json.loads((tmp / MODEL_INFO_FILE).read_text())
            info["base"] = meta
            (tmp / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2))
            _replace_dir(tmp, path)
    return path

