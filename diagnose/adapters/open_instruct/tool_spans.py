"""Where the tool outputs are in a response that open-instruct assembled from model turns and
tool outputs (``open_instruct/vllm_utils.py`` ``process_request``), so that they are not read
as generated text.

open-instruct saves no mask. A tool output's tokens carry log-prob exactly ``0.0``, but so does
any token the model sampled with probability 1 (in float32), so the 0.0 alone is not enough.
With the tokenizer the structure decides: a Hermes/ChatML tool output (``VLLM_PARSERS`` in
``environments/tools/parsers.py``) starts with ``<|im_start|>`` right after the model's
``<|im_end|>`` (vLLM stops generating at that EOS, so nothing the model sampled follows it; or
after another EOS id of the model, `ChatIds.other_eos`) and
ends after the postfix ``<|im_start|>assistant\\n``; parallel calls repeat the whole block, and a
block cut by the token budget runs to the end. A known log-prob other than 0.0 inside a block
means the structure was misread: the block ends there (counted as suspect).

open-instruct's default parser (``legacy``) appends ``<output>\\n...\\n</output>\\n`` instead, after
the model's ``</tool_name>`` stop string: with the tokenizer, a 0.0 run that decodes to that.

Without a tokenizer only the log-probs are left: runs of at least `MIN_TOOL_RUN` exact 0.0
values in a response whose ``request_info`` says a tool was called (an approximation: a
confident generated token next to a tool output is counted with it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["ChatIds", "MIN_TOOL_RUN", "Segmentation", "segment_by_logprobs", "segment_chatml", "segment_legacy"]

#: shortest tool output without a tokenizer: ``<|im_start|>tool\n<tool_response>\n`` alone is 7
#: Qwen2.5 tokens, and the postfix 3 more
MIN_TOOL_RUN = 6


@dataclass(frozen=True)
class ChatIds:
    """The ids that frame a ChatML tool output: ``<|im_start|>``, ``<|im_end|>`` and the
    postfix that opens the next assistant turn (``<|im_start|>assistant\\n``)."""

    im_start: int
    im_end: int
    postfix: tuple[int, ...]
    #: ``<think>\\n``, which ``vllm_qwen3_xml`` adds to the postfix (when ``<think>`` is a token)
    think: tuple[int, ...] = ()
    #: other EOS ids a model turn may end with before a tool output: vLLM stops at any id of the
    #: model's ``generation_config`` ``eos_token_id`` (Qwen2.5-Instruct: ``<|im_end|>`` and
    #: ``<|endoftext|>``; a base model: ``<|endoftext|>`` only)
    other_eos: tuple[int, ...] = ()

    @classmethod
    def from_tokenizer(cls, tok) -> ChatIds | None:
        """None if the tokenizer has no single-token ``<|im_start|>`` / ``<|im_end|>``."""
        s, e = tok.single_id("<|im_start|>"), tok.single_id("<|im_end|>")
        if s is None or e is None:
            return None
        post = tuple(tok.encode("<|im_start|>assistant\n"))
        if not post or post[0] != s:
            return None
        think = tuple(tok.encode("<think>\n")) if tok.single_id("<think>") is not None else ()
        eot = tok.single_id("<|endoftext|>")
        return cls(s, e, post, think, () if eot is None or eot == e else (eot,))


@dataclass
class Segmentation:
    """Per token: ``is_tool`` and ``turn`` (tool tokens belong to the turn they answer);
    ``turns``: the ``(start, end)`` of each generated segment; ``suspect``: blocks cut short
    because a log-prob inside was not 0.0."""

    is_tool: np.ndarray
    turn: np.ndarray
    turns: list[tuple[int, int]]
    suspect: int = 0


def _finish(is_tool: np.ndarray, suspect: int = 0) -> Segmentation:
    n = len(is_tool)
    gen = ~is_tool
    if n == 0:
        return Segmentation(is_tool, np.zeros(0, np.int32), [], suspect)
    starts = gen.copy()
    starts[1:] &= is_tool[:-1]
    turn = np.cumsum(starts, dtype=np.int32)
    turn -= 1
    np.maximum(turn, 0, out=turn)
    s_idx = np.flatnonzero(starts)
    ends = gen.copy()
    ends[:-1] &= is_tool[1:]
    e_idx = np.flatnonzero(ends) + 1
    return Segmentation(is_tool, turn, list(zip(s_idx.tolist(), e_idx.tolist())), suspect)


def segment_chatml(ids: np.ndarray, lps: np.ndarray, known: np.ndarray, chat: ChatIds) -> Segmentation:
    """Tool-output blocks by ChatML structure, confirmed by their 0.0 log-probs.

    ``lps``: log-prob per token (float64), ``known``: whether it was saved (a trace written
    without log-probs has none; then the structure alone decides)."""
    n = len(ids)
    is_tool = np.zeros(n, dtype=bool)
    starts = np.flatnonzero(ids == chat.im_start)
    if len(starts) == 0:
        return _finish(is_tool)
    L = len(chat.postfix)
    ok = starts[starts + L <= n]
    hit = np.ones(len(ok), dtype=bool)
    for j in range(1, L):
        hit &= ids[ok + j] == chat.postfix[j]
    posts = ok[hit]
    zero_or_unknown = ~known | (lps == 0.0)
    pos, suspect = 0, 0
    for s in starts.tolist():
        if s < pos or s == 0:
            continue
        after_eos = ids[s - 1] == chat.im_end or ids[s - 1] in chat.other_eos
        if not (after_eos or is_tool[s - 1]) or not zero_or_unknown[s]:
            continue
        k = int(np.searchsorted(posts, s + 1))
        end = int(posts[k]) + L if k < len(posts) else n
        T = len(chat.think)
        if T and end + T <= n and tuple(ids[end:end + T].tolist()) == chat.think and zero_or_unknown[end:end + T].all():
            end += T  # the thinking opener of the vllm_qwen3_xml postfix
        bad = np.flatnonzero(~zero_or_unknown[s:end])
        if len(bad):
            end = s + int(bad[0])
            suspect += 1
        is_tool[s:end] = True
        pos = end
    return _finish(is_tool, suspect)


def segment_legacy(ids: np.ndarray, lps: np.ndarray, known: np.ndarray, decode: Callable[[list[int]], str],
                   wrap: str = "output") -> Segmentation:
    """Tool outputs of open-instruct's default parser (``OpenInstructLegacyToolParser``: the
    model's ``<tool_name>...</tool_name>`` stop string, then ``<output>\\n{output}\\n</output>\\n``
    per observation, log-prob 0.0): a run of exact 0.0 log-probs whose text starts with
    ``<output>``, up to its last ``</output>`` (a confident token sampled after it stays
    generated); a run without one was cut by the token budget and is all tool output."""
    n = len(ids)
    is_tool = np.zeros(n, dtype=bool)
    z = known & (lps == 0.0)
    edges = np.diff(np.concatenate([[0], z.astype(np.int8), [0]]))
    opener, closer = f"<{wrap}>", f"</{wrap}>"
    for a, b in zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()):
        if a == 0 or b - a < 3:
            continue
        text = decode(ids[a:b].tolist())
        if not text.lstrip("\n").startswith(opener):
            continue
        total = text.count(closer)
        end = b
        if total:
            lo, hi = a + 1, b  # smallest end whose text holds every closing tag
            while lo < hi:
                mid = (lo + hi) // 2
                if decode(ids[a:mid].tolist()).count(closer) >= total:
                    hi = mid
                else:
                    lo = mid + 1
            end = lo
            if end < b and decode([int(ids[end])]).strip() == "":
                end += 1  # the newline after the tag, when it is a token of its own
        is_tool[a:end] = True
    return _finish(is_tool)


def segment_by_logprobs(lps: np.ndarray, known: np.ndarray, called: bool | None) -> Segmentation:
    """Tool outputs without a tokenizer: runs of >= `MIN_TOOL_RUN` exact 0.0 log-probs, only
    when a tool was called (``called`` None: unknown, runs are taken)."""
    n = len(lps)
    is_tool = np.zeros(n, dtype=bool)
    if n and called is not False:
        z = known & (lps == 0.0)
        edges = np.diff(np.r_[0, z.astype(np.int8), 0])
        for a, b in zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()):
            if b - a >= MIN_TOOL_RUN and a > 0:
                is_tool[a:b] = True
    return _finish(is_tool)
