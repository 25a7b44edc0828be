"""The fixed control-token probe: teacher-forced on a fixed set of gold trajectories, the
log-probability of the gold next token and of every registered control token at every
position of the completion.

Why fixed inputs: rollouts change as the policy changes, so their token statistics mix "the
model changed" with "the inputs changed". On identical inputs, p(`<|im_end|>` | `...<tool_call>\\n`)
can be followed step by step, and its rise can be dated.

Multi-token control strings (SmolLM2's ``<tool_call>``) get a second column,
``lpseq_ctrl_<name>``: the log-prob of the whole sequence from the predicting position. Where the
gold text continues with the sequence it is the sum of the gold tokens' log-probs along it; at the
key contexts, where it does not, the call tags (:func:`scored_roles`) are scored as a continuation
from the pass's own KV cache (:mod:`diagnose.model.continuation`); elsewhere it is null. ``lp_ctrl_<name>`` stays the
first token's log-prob at every position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from diagnose.control_tokens import ControlTokenRegistry
from diagnose.rundir.schema import ctrl_column, ctrl_seq_column
from diagnose.model.sequences import encode, encode_conversation
from diagnose.tasks import Task, gold_messages

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that run the model: the probe's *tables* (summary,
# labels) are read by torch-free code (scan, synthetic runs, dashboards)


@dataclass
class ProbeSet:
    """Right-padded gold sequences and, per predicting position, its context label."""

    ids: "torch.Tensor"  # [N, L]
    attention: "torch.Tensor"  # [N, L]
    start: list[int]  # first predicting position per row (last prompt token)
    length: list[int]
    contexts: list[list[str]]  # per row, per predicting position t in [start, length-1): label or ""
    task_ids: list[str]


def label_contexts(ids: list[int], patterns: dict[str, list[int]],
                   before_close: int | Sequence[int] | None = None) -> list[str]:
    """Label predicting position t with the key context whose token ids end at t (longest wins).

    ``after_call_body`` ends in a placeholder body in `key_contexts`, so on real sequences it is
    recognised by what follows instead: the gold continuation is ``</tool_call>`` (its id, or its
    id sequence where it is several tokens: ``before_close``).
    """
    labels = [""] * len(ids)
    best = [0] * len(ids)
    for name, pat in patterns.items():
        m = len(pat)
        for t in range(m - 1, len(ids)):
            if m > best[t] and ids[t - m + 1 : t + 1] == pat:
                labels[t], best[t] = name, m
    if before_close is not None:
        close = [before_close] if isinstance(before_close, int) else list(before_close)
        n = len(close)
        for t in range(len(ids) - n):
            if close and ids[t + 1 : t + 1 + n] == close:
                labels[t] = "after_call_body"
    return labels


def context_patterns(tokenizer: Any, registry: ControlTokenRegistry | None = None) -> dict[str, list[int]]:
    """Token ids of the key contexts of the tokenizer's chat family (the registry's)."""
    registry = registry if registry is not None else ControlTokenRegistry.from_tokenizer(tokenizer)
    return {name: encode(tokenizer, text) for name, text in registry.key_contexts().items() if name != "after_call_body"}


def build_probe_set(tokenizer: Any, tasks: list[Task], registry: ControlTokenRegistry | None = None) -> ProbeSet:
    import torch

    registry = registry if registry is not None else ControlTokenRegistry.from_tokenizer(tokenizer)
    patterns = context_patterns(tokenizer, registry)
    close = registry.by_role("call_close")
    before_close = close[0].token_ids if close else None
    seqs = [encode_conversation(tokenizer, gold_messages(t), len(t.messages)) for t in tasks]
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    starts, lengths, contexts = [], [], []
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s.ids)
        att[i, : len(s)] = 1
        start = s.loss_mask.index(True) - 1
        labels = label_contexts(s.ids, patterns, before_close)
        starts.append(start)
        lengths.append(len(s))
        contexts.append(labels[start : len(s) - 1])
    return ProbeSet(ids, att, starts, lengths, contexts, [t.id for t in tasks])


def _keep_kwargs(model: Any, keep: int) -> dict[str, int]:
    """``logits_to_keep`` (``num_logits_to_keep`` in older transformers) when the model's
    forward takes it: logits for the last ``keep`` positions only."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: keep}
    return {}


def run_probe(model: Any, probe: ProbeSet, registry: ControlTokenRegistry, step: int) -> pl.DataFrame:
    """One row per (probe sequence, predicting position): ``lp_gold`` and ``lp_ctrl_<name>``, and
    ``lpseq_ctrl_<name>`` for each multi-token control string (module docstring)."""
    import torch

    from diagnose.model.continuation import output_cache
    from diagnose.model.logits import token_stats

    multi = [(k, t) for k, t in enumerate(registry) if t.multi]
    was_training = model.training
    model.eval()
    # Only positions from the earliest probed one on are scored: the prompt (system prompt with the
    # tool schemas) is most of each sequence, and a Qwen-size vocabulary makes its logits the
    # largest tensor of the pass. Where the model supports it, they are not even computed.
    first = min(probe.start)
    with torch.no_grad():
        ids = probe.ids.to(model.device)
        kw = _keep_kwargs(model, ids.shape[1] - first)
        out = model(input_ids=ids, attention_mask=probe.attention.to(model.device), use_cache=bool(multi), **kw)
        logits = out.logits[:, -(ids.shape[1] - first):-1]  # predicting ids[:, first + 1:]
        ctrl_ids = torch.tensor(registry.ids, dtype=torch.long)
        st = token_stats(logits, ids[:, first + 1:], ctrl_ids, with_entropy=False,
                         ctrl_seqs=[t.token_ids for _, t in multi] or None)
        ctrl = st.ctrl_logprob.cpu().numpy()
        seq = st.ctrl_seq_logprob.cpu().numpy() if multi else None
        if multi:
            _score_at_key_contexts(model, ids, output_cache(out), probe, multi, first, ctrl, seq,
                                   scored_roles(registry))
    model.train(was_training)
    lp = st.logprob.cpu().numpy()
    rows_idx = np.concatenate([np.full(n - 1 - s, i) for i, (s, n) in enumerate(zip(probe.start, probe.length))])
    pos_idx = np.concatenate([np.arange(s, n - 1) for s, n in zip(probe.start, probe.length)])
    col_idx = pos_idx - first
    data: dict[str, Any] = {
        "step": np.full(len(rows_idx), step, dtype=np.int64),
        "probe_id": rows_idx.astype(np.int32),
        "position": pos_idx.astype(np.int32),
        "token_id": probe.ids[:, 1:].numpy()[rows_idx, pos_idx].astype(np.int32),
        "lp_gold": lp[rows_idx, col_idx].astype(np.float32),
        "context": [c for row in probe.contexts for c in row],
    }
    for k, name in enumerate(registry.names):
        data[ctrl_column(name)] = ctrl[rows_idx, col_idx, k].astype(np.float32)
    frame = pl.DataFrame(data)
    if multi:  # unknown (NaN) -> null: the sequence was neither the gold text nor scored there
        frame = frame.with_columns(
            pl.Series(ctrl_seq_column(t.name), seq[rows_idx, col_idx, m].astype(np.float32)).fill_nan(None)
            for m, (_, t) in enumerate(multi)
        )
    return frame


def scored_roles(registry: ControlTokenRegistry) -> set[str]:
    """Roles whose multi-token strings the probe scores as continuations at the key contexts: the
    call tags and the family's expected / collapse roles there. A tool-response tag is written by
    the environment, not the policy: its sequence is recorded only where it is the gold text."""
    ctx_roles = registry.chat_family.key_context_roles.values()
    return {"call_open", "call_close"} | {r for c in ctx_roles for r in c.values() if r}


def _score_at_key_contexts(model: Any, ids: Any, cache: Any, probe: ProbeSet, multi: list, first: int,
                           ctrl: np.ndarray, seq: np.ndarray, roles: set[str]) -> None:
    """Fill ``seq`` (in place) at the key-context positions where the gold text does not continue
    with the sequence: first token's log-prob (``ctrl``) + the rest, scored as a continuation."""
    from diagnose.model.continuation import Continuation, rest_logprobs_cached, rest_logprobs_full

    todo = [m for m, (_, t) in enumerate(multi) if t.role in roles]
    reqs, where = [], []
    for i, (s, labels) in enumerate(zip(probe.start, probe.contexts)):
        for j, label in enumerate(labels):
            if not label:
                continue
            pos = s + j
            for m in todo:
                t = multi[m][1]
                if np.isnan(seq[i, pos - first, m]):
                    reqs.append(Continuation(i, pos, t.token_ids))
                    where.append((i, pos - first, m))
    if not reqs:
        return
    rest = rest_logprobs_cached(model, cache, reqs) if cache is not None else rest_logprobs_full(model, ids, reqs)
    for (i, c, m), r in zip(where, rest):
        seq[i, c, m] = ctrl[i, c, multi[m][0]] + r


def _prob_column(columns: Sequence[str], name: str) -> str:
    """The column holding control string ``name``'s probability: the whole sequence's where it
    is several tokens (``lpseq_ctrl_<name>``), else its one token's."""
    return ctrl_seq_column(name) if ctrl_seq_column(name) in columns else ctrl_column(name)


def probe_summary(frame: pl.DataFrame, names: Sequence[str]) -> dict[str, float]:
    """Mean probability per key context of the gold token and of each control token (of the
    whole sequence, for a multi-token one), as flat metric names ``probe/<context>/<token>``
    (``gold`` for the gold next token)."""
    cols = [pl.col("lp_gold").exp().mean().alias("gold")] + [
        pl.col(_prob_column(frame.columns, n)).exp().mean().alias(n) for n in names
    ]
    agg = frame.filter(pl.col("context") != "").group_by("context").agg(cols)
    out: dict[str, float] = {}
    for row in agg.iter_rows(named=True):
        ctx = row.pop("context")
        for name, v in row.items():
            if v is not None:  # a multi-token string not scored at this context
                out[f"probe/{ctx}/{name}"] = float(v)
    return out
