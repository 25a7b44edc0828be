"""The embedded tokenizer: a Qwen2-like byte-level BPE trained locally on rendered tool-use
conversations, with Qwen2.5's control strings as single added tokens and its chat template.

Nothing is downloaded. The tokenizer is trained in seconds with the ``tokenizers`` library using
Qwen2's pre-tokenization, carries Qwen2.5's control strings (from :mod:`diagnose.chat`) as
single added tokens with Qwen's special flags, and uses the same chat template as Qwen2.5
(:data:`diagnose.chat.CHAT_TEMPLATE`).

Public API::

    build_tokenizer(texts, vocab_size=2048) -> PreTrainedTokenizerFast
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

from diagnose.chat import CHAT_TEMPLATE, CONTROL_STRINGS, ENDOFTEXT, IM_END, SPECIAL_STRINGS, TOOL_CALL_OPEN

__all__ = [
    "CALL_BODY_START",
    "DEFAULT_VOCAB_SIZE",
    "MODEL_MAX_LENGTH",
    "QWEN2_PRETOKENIZE_REGEX",
    "SPECIAL_CONTROL_STRINGS",
    "build_tokenizer",
]

#: Qwen2 / Qwen2.5 pre-tokenization regex (digits split one by one, punctuation runs kept whole,
#: newlines isolated), applied before the byte-level mapping.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Control strings that are ``special=True`` in Qwen2.5 (`diagnose.chat.SPECIAL_STRINGS`).
SPECIAL_CONTROL_STRINGS: frozenset[str] = frozenset(SPECIAL_STRINGS)

#: First token of a Hermes call body (``{"name": ...``); a single BPE token in Qwen2.5 and,
#: guaranteed by :func:`build_tokenizer`, in the embedded tokenizer.
CALL_BODY_START = '{"'

DEFAULT_VOCAB_SIZE = 2048
MODEL_MAX_LENGTH = 2048

_CONTROL_SPLIT = re.compile("|".join(re.escape(s) for s in CONTROL_STRINGS))


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

