"""The embedded default model: a tiny, randomly initialised Qwen2 causal LM with a byte-level BPE
tokenizer trained locally on rendered tool-use conversations.

Nothing is downloaded. The tokenizer is trained in seconds with the ``tokenizers`` library using
Qwen2's pre-tokenization, carries Qwen2.5's control strings (from :mod:`diagnose.chat`) as
single added tokens with Qwen's special flags, and uses the same chat template as Qwen2.5
(:data:`diagnose.chat.CHAT_TEMPLATE`). The model is a standard ``Qwen2ForCausalLM``, so every
code path that works on it works on a real Qwen2.5 checkpoint given by path.

Public API::

    build_tokenizer(texts, vocab_size=2048) -> PreTrainedTokenizerFast
    tiny_config(tokenizer, size="tiny") -> Qwen2Config
    build_tiny_model(out_dir, *, texts=None, vocab_size=2048, size="tiny", seed=0) -> Path
    default_model_dir() -> Path
    ensure_default_model() -> Path
    resolve_model_path(path_or_name) -> Path
    load_model_and_tokenizer(path_or_name, *, dtype=None, device="cpu") -> (model, tokenizer)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from diagnose.chat import (
    CHAT_TEMPLATE,
    CONTROL_STRINGS,
    ENDOFTEXT,
    IM_END,
    IM_START,
    TOOL_CALL_OPEN,
)

__all__ = [
    "CALL_BODY_START",
    "DEFAULT_MODEL_SUBDIR",
    "DEFAULT_VOCAB_SIZE",
    "MODEL_INFO_FILE",
    "BaseModelError",
    "ensure_base_model",
    "QWEN2_PRETOKENIZE_REGEX",
    "SIZES",
    "SPECIAL_CONTROL_STRINGS",
    "build_tiny_model",
    "build_tokenizer",
    "default_model_dir",
    "ensure_default_model",
    "load_model_and_tokenizer",
    "resolve_model_path",
    "tiny_config",
]

#: Qwen2 / Qwen2.5 pre-tokenization regex (digits split one by one, punctuation runs kept whole,
#: newlines isolated), applied before the byte-level mapping.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Control strings that are ``special=True`` in Qwen2.5 (skipped by ``skip_special_tokens``);
#: the tool-call / tool-response tags are added tokens with ``special=False``.
SPECIAL_CONTROL_STRINGS: frozenset[str] = frozenset({ENDOFTEXT, IM_START, IM_END})

#: First token of a Hermes call body (``{"name": ...``); a single BPE token in Qwen2.5 and,
#: guaranteed by :func:`build_tokenizer`, in the embedded tokenizer.
CALL_BODY_START = '{"'

DEFAULT_VOCAB_SIZE = 2048
DEFAULT_MODEL_SUBDIR = "tiny-qwen2-v1"
MODEL_INFO_FILE = "diagnose_model.json"
MODEL_MAX_LENGTH = 2048
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

_CONTROL_SPLIT = re.compile("|".join(re.escape(s) for s in CONTROL_STRINGS))


# --------------------------------------------------------------------------------------------
# tokenizer


def _split_on_control(texts: Iterable[str]) -> Iterator[str]:
    """Yield the text between control strings: added tokens are never seen by the BPE trainer
    (exactly what happens to them at encode time), so no merge spans a control string."""
    for text in texts:
        for piece in _CONTROL_SPLIT.split(text):
            if piece:
                yield piece


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / Qwen byte -> printable character map used by the ByteLevel pre-tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _byte_level_alphabet() -> list[str]:
    """The 256 byte symbols in GPT-2 / Qwen vocabulary order (printable bytes first)."""
    return list(_bytes_to_unicode().values())


def _make_backend(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """A ``tokenizers.Tokenizer`` with Qwen2's normalizer, pre-tokenizer and decoder."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False)
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def _count_words(texts: Iterable[str]) -> dict[str, int]:
    """Pre-token (word) frequencies, byte-level mapped, in first-occurrence order."""
    pre = _make_backend({s: i for i, s in enumerate(_byte_level_alphabet())}, [])
    normalizer, pre_tokenizer = pre.normalizer, pre.pre_tokenizer
    pieces: dict[str, int] = {}  # rendered conversations repeat most pieces: split each once
    for piece in _split_on_control(texts):
        pieces[piece] = pieces.get(piece, 0) + 1
    counts: dict[str, int] = {}
    for piece, k in pieces.items():
        for word, _span in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(piece)):
            counts[word] = counts.get(word, 0) + k
    return counts


def _train_bpe(word_counts: dict[str, int], n_merges: int, min_frequency: int = 2) -> list[tuple[str, str]]:
    """Classic BPE merge learning, deterministic: the most frequent adjacent pair is merged
    next, ties broken by the smaller (left, right) strings. (The ``tokenizers`` trainer breaks
    ties by hash order, so its vocabulary can differ from one process to the next.)"""
    import heapq

    words = [list(w) for w in word_counts]
    freqs = list(word_counts.values())
    pair_counts: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}
    for i, (sym, f) in enumerate(zip(words, freqs)):
        for pair in zip(sym, sym[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + f
            where.setdefault(pair, set()).add(i)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    done: set[tuple[str, str]] = set()
    while len(merges) < n_merges and heap:
        neg, a, b = heapq.heappop(heap)
        count = pair_counts.get((a, b), 0)
        if count != -neg:  # stale entry: re-push with the current count
            if count > 0:
                heapq.heappush(heap, (-count, a, b))
            continue
        if count < min_frequency:
            break
        if (a, b) not in done:  # a pair can re-form if a later merge spells an existing symbol
            merges.append((a, b))
            done.add((a, b))
        merged = a + b
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop((a, b), ())):
            sym, f = words[i], freqs[i]
            if len(sym) < 2:
                continue
            for pair in zip(sym, sym[1:]):
                pair_counts[pair] -= f
                changed.add(pair)
            out, j = [], 0
            while j < len(sym):
                if j + 1 < len(sym) and sym[j] == a and sym[j + 1] == b:
                    out.append(merged)
                    j += 2
                else:
                    out.append(sym[j])
                    j += 1
            words[i] = out
            for pair in zip(out, out[1:]):
                pair_counts[pair] = pair_counts.get(pair, 0) + f
                where.setdefault(pair, set()).add(i)
                changed.add(pair)
        pair_counts.pop((a, b), None)
        for pair in sorted(changed):
            c = pair_counts.get(pair, 0)
            if c > 0:
                heapq.heappush(heap, (-c, *pair))
            else:
                pair_counts.pop(pair, None)
                where.pop(pair, None)
    return merges


def _ensure_merge(model: dict[str, Any], left: str, right: str, max_size: int) -> bool:
    """Make ``left + right`` a token of a BPE ``{"vocab": {...}, "merges": [(l, r), ...]}``
    model if it is not one already.

    It becomes the lowest-priority merge. If the vocabulary already has ``max_size`` tokens, it
    takes the place of the last-learned merge (the highest id; no other merge can use it), so
    the size is unchanged. Returns True if the model was changed.
    """
    vocab: dict[str, int] = model["vocab"]
    merges: list[tuple[str, str]] = model["merges"]
    merged = left + right
    if merged in vocab:
        return False
    if left not in vocab or right not in vocab:  # pragma: no cover - bytes are always present
        raise ValueError(f"cannot add merge {left!r}+{right!r}: parts are not in the vocabulary")
    max_id = max(vocab.values())
    last = merges[-1] if merges else None
    if (
        len(vocab) >= max_size
        and last is not None
        and vocab.get(last[0] + last[1]) == max_id
        and sum(a + b == last[0] + last[1] for a, b in merges) == 1
    ):
        merges.pop()
        new_id = vocab.pop(last[0] + last[1])
    else:
        new_id = max_id + 1
    vocab[merged] = new_id
    merges.append((left, right))
    return True


def build_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Train a Qwen2-like byte-level BPE on ``texts`` and wrap it as a transformers tokenizer.

    ``vocab_size`` is the total size (256 bytes + merges + the 7 control tokens) and an upper
    bound: training stops earlier when no pair occurs twice (a templated corpus saturates
    quickly). The control strings of :data:`diagnose.chat.CONTROL_STRINGS` are appended as
    added tokens with Qwen's flags (Qwen places them after the BPE vocabulary too), ``{"`` is
    guaranteed to be a single BPE token, and the chat template is
    :data:`diagnose.chat.CHAT_TEMPLATE`. Deterministic in ``texts`` (also across processes).
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    n_control = len(CONTROL_STRINGS)
    alphabet = _byte_level_alphabet()
    if vocab_size < len(alphabet) + n_control + 1:
        raise ValueError(f"vocab_size must be at least {len(alphabet) + n_control + 1}, got {vocab_size}")
    max_bpe = vocab_size - n_control

    merges = _train_bpe(_count_words(texts), n_merges=max_bpe - len(alphabet))
    # Guarantee '{"' (the call-body start, one token in Qwen2.5) is a single BPE token. Inside a
    # call body it is always its own pre-token ('\n' and 'name' are split off by the regex), so
    # a lowest-priority merge of the two bytes suffices and changes nothing else.
    model = {"vocab": {}, "merges": merges}
    for sym in alphabet:
        model["vocab"][sym] = len(model["vocab"])
    for a, b in merges:
        model["vocab"].setdefault(a + b, len(model["vocab"]))
    _ensure_merge(model, "{", '"', max_size=max_bpe)
    tok = _make_backend(model["vocab"], [tuple(m) for m in model["merges"]])

    tok.add_tokens(
        [
            AddedToken(s, single_word=False, lstrip=False, rstrip=False, normalized=False,
                       special=s in SPECIAL_CONTROL_STRINGS)
            for s in CONTROL_STRINGS
        ]
    )

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        bos_token=None,
        unk_token=None,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
    hf.chat_template = CHAT_TEMPLATE
    _check_tokenizer(hf)
    return hf


def _check_tokenizer(tokenizer) -> None:
    for s in CONTROL_STRINGS:
        ids = tokenizer.encode(s, add_special_tokens=False)
        if len(ids) != 1:  # pragma: no cover - guaranteed by construction
            raise RuntimeError(f"control string {s!r} is not a single token: {ids}")
    body = tokenizer.encode(f"{TOOL_CALL_OPEN}\n{CALL_BODY_START}name", add_special_tokens=False)
    if tokenizer.convert_ids_to_tokens(body[2]) != CALL_BODY_START:  # pragma: no cover
        raise RuntimeError(f"'{{\"' is not a single token after '<tool_call>\\n': {body}")


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
BASE_WEIGHTS_DIR = Path(__file__).parent / "models" / "tiny_base"  # model.safetensors + base.json
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
    path = Path(name).expanduser()
    if not path.exists():
        cached = _cached_hub_snapshot(name)
        if cached is not None:
            return cached
        raise ValueError(
            f"model path does not exist: {name!r} (give a local Hugging Face model directory, "
            "a hub id already in the local cache, or 'tiny' for the embedded default)"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(f"not a Hugging Face model directory (no config.json): {name!r}")
    return path


def load_model_and_tokenizer(
    path_or_name: str | os.PathLike[str],
    *,
    dtype: Any = None,
    device: str = "cpu",
):
    """Load ``(model, tokenizer)`` with ``AutoModelForCausalLM`` / ``AutoTokenizer``.

    ``path_or_name`` is resolved by :func:`resolve_model_path` (``"tiny"`` = the embedded
    default). ``dtype`` is passed to ``from_pretrained`` (a ``torch.dtype``, ``"auto"``, or None
    for float32). Nothing is ever downloaded (``local_files_only=True``). The model is returned
    in eval mode on ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(path_or_name)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.to(device)
    model.eval()
    return model, tokenizer
