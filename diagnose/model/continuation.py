"""Log-probabilities of short id sequences as continuations of prefixes of a batch.

Why: a multi-token control string (SmolLM2's ``<tool_call>`` is five tokens) has a probability at
a decisive position even where the gold text does not continue with it. Scoring it takes a
forward pass over the sequence after the prefix. With the batch's own KV cache (from the pass
that produced the batch's logits) that pass is over the few sequence tokens only, not over the
prefix again (a system prompt with tool schemas is most of each probe sequence), and requests
at different positions share one pass (each prefix right-aligned, the left padding masked).

Both functions return, per request, log p(seq[1:] | prefix, seq[0]): the caller adds the first
token's log-prob, which the batch's logits already hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Continuation", "output_cache", "rest_logprobs_cached", "rest_logprobs_full"]


@dataclass(frozen=True)
class Continuation:
    """Score ``seq`` after ``ids[row, : position + 1]`` (``position`` is the predicting position
    whose logits give ``seq[0]``)."""

    row: int
    position: int
    seq: tuple[int, ...]


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, [B, H, T, D], from a transformers cache (or legacy tuples)."""
    return [(item[0], item[1]) for item in cache]


def output_cache(out: Any) -> Any:
    """The KV cache of a model output (``cache`` in recent transformers, ``past_key_values``
    before), or None."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _cache_kwarg(model: Any) -> str:
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _sum_rest(logits: torch.Tensor, reqs: Sequence[Continuation], offset: Sequence[int]) -> list[float]:
    """Sum over j >= 1 of log p(seq[j]) read at ``offset[i] + j - 1`` of ``logits[i]``."""
    lsm = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for i, r in enumerate(reqs):
        pos = torch.arange(len(r.seq) - 1, device=lsm.device) + offset[i]
        tgt = torch.tensor(r.seq[1:], device=lsm.device)
        out.append(float(lsm[i, pos, tgt].sum()))
    return out


def rest_logprobs_cached(model: Any, cache: Any, requests: Sequence[Continuation],
                         max_cache_bytes: int = 512 * 2**20) -> list[float]:
    """Score each request from ``cache`` (the KV cache of a forward pass over the batch, right
    padded). Requests are batched by prefix length into chunks whose gathered cache fits
    ``max_cache_bytes``; in a chunk each prefix is right-aligned (left padding masked out, explicit
    positions), so one small forward over ``len(seq) - 1`` tokens serves the whole chunk."""
    from transformers import DynamicCache

    layers = _layers(cache)
    out = [0.0] * len(requests)
    todo = sorted((i for i, r in enumerate(requests) if len(r.seq) > 1), key=lambda i: requests[i].position)
    if not todo or not layers:
        return out
    k0 = layers[0][0]
    per_token = sum(k.shape[1] * k.shape[3] * k.element_size() * 2 for k, _ in layers)
    device = k0.device
    a = 0
    while a < len(todo):
        # grow the chunk while its gathered cache (size x longest prefix) fits the budget
        b = a + 1
        while b < len(todo) and (b + 1 - a) * (requests[todo[b]].position + 1) * per_token <= max_cache_bytes:
            b += 1
        idx = todo[a:b]
        reqs = [requests[i] for i in idx]
        n = max(r.position + 1 for r in reqs)
        width = max(len(r.seq) - 1 for r in reqs)
        kv = []
        for k, v in layers:
            kk = k.new_zeros((len(reqs), k.shape[1], n, k.shape[3]))
            vv = v.new_zeros((len(reqs), v.shape[1], n, v.shape[3]))
            for j, r in enumerate(reqs):
                kk[j, :, n - r.position - 1 :] = k[r.row, :, : r.position + 1]
                vv[j, :, n - r.position - 1 :] = v[r.row, :, : r.position + 1]
            kv.append((kk, vv))
        inp = torch.zeros((len(reqs), width), dtype=torch.long, device=device)
        att = torch.ones((len(reqs), n + width), dtype=torch.long, device=device)
        pos = torch.zeros((len(reqs), width), dtype=torch.long, device=device)
        for j, r in enumerate(reqs):
            inp[j, : len(r.seq) - 1] = torch.tensor(r.seq[:-1])
            att[j, : n - r.position - 1] = 0
            pos[j] = torch.arange(r.position + 1, r.position + 1 + width)
        logits = model(input_ids=inp, attention_mask=att, position_ids=pos, use_cache=True,
                       **{_cache_kwarg(model): DynamicCache(kv)}).logits
        for i, val in zip(idx, _sum_rest(logits, reqs, [0] * len(reqs))):
            out[i] = val
        a = b
    return out


def rest_logprobs_full(model: Any, ids: torch.Tensor, requests: Sequence[Continuation], batch_size: int = 16) -> list[float]:
    """The same without a cache: a forward pass over prefix + ``seq[:-1]`` per request (the
    reference the cached path is tested against, and the path for models without a cache)."""
    out: list[float] = []
    for a in range(0, len(requests), batch_size):
        reqs = list(requests[a : a + batch_size])
        lens = [r.position + len(r.seq) for r in reqs]
        inp = torch.zeros((len(reqs), max(lens)), dtype=torch.long, device=ids.device)
        att = torch.zeros_like(inp)
        for i, r in enumerate(reqs):
            seq = torch.cat([ids[r.row, : r.position + 1], torch.tensor(r.seq[:-1], device=ids.device)])
            inp[i, : len(seq)] = seq
            att[i, : len(seq)] = 1
        logits = model(input_ids=inp, attention_mask=att).logits
        out.extend(_sum_rest(logits, reqs, [r.position + 1 for r in reqs]))
    return out
