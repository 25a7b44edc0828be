"""The fixed control-token probe: teacher-forced on a fixed set of gold trajectories, the
log-probability of the gold next token and of every registered control token at every
position of the completion.

Why fixed inputs: rollouts change as the policy changes, so their token statistics mix "the
model changed" with "the inputs changed". On identical inputs, p(`<|im_end|>` | `...<tool_call>\\n`)
can be followed step by step, and its rise can be dated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from diagnose.chat import TOOL_CALL_CLOSE
from diagnose.control_tokens import ControlTokenRegistry, key_contexts
from diagnose.rundir.schema import ctrl_column
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


def label_contexts(ids: list[int], patterns: dict[str, list[int]], before_close: int | None = None) -> list[str]:
    """Label predicting position t with the key context whose token ids end at t (longest wins).

    ``after_call_body`` ends in a placeholder body in `key_contexts`, so on real sequences it is
    recognised by what follows instead: the gold next token is ``</tool_call>`` (id ``before_close``).
    """
    labels = [""] * len(ids)
    best = [0] * len(ids)
    for name, pat in patterns.items():
        m = len(pat)
        for t in range(m - 1, len(ids)):
            if m > best[t] and ids[t - m + 1 : t + 1] == pat:
                labels[t], best[t] = name, m
    if before_close is not None:
        for t in range(len(ids) - 1):
            if ids[t + 1] == before_close:
                labels[t] = "after_call_body"
    return labels


def context_patterns(tokenizer: Any) -> dict[str, list[int]]:
    return {name: encode(tokenizer, text) for name, text in key_contexts().items() if name != "after_call_body"}


def build_probe_set(tokenizer: Any, tasks: list[Task]) -> ProbeSet:
    import torch

    patterns = context_patterns(tokenizer)
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
        labels = label_contexts(s.ids, patterns, tokenizer.convert_tokens_to_ids(TOOL_CALL_CLOSE))
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
    """One row per (probe sequence, predicting position): ``lp_gold`` and ``lp_ctrl_<name>``."""
    import torch

    from diagnose.model.logits import token_stats

    was_training = model.training
    model.eval()
    # Only positions from the earliest probed one on are scored: the prompt (system prompt with the
    # tool schemas) is most of each sequence, and a Qwen-size vocabulary makes its logits the
    # largest tensor of the pass. Where the model supports it, they are not even computed.
    first = min(probe.start)
    with torch.no_grad():
        ids = probe.ids.to(model.device)
        kw = _keep_kwargs(model, ids.shape[1] - first)
        logits = model(input_ids=ids, attention_mask=probe.attention.to(model.device), **kw).logits
        logits = logits[:, -(ids.shape[1] - first):-1]  # predicting ids[:, first + 1:]
        ctrl_ids = torch.tensor(registry.ids, dtype=torch.long)
        st = token_stats(logits, ids[:, first + 1:], ctrl_ids, with_entropy=False)
    model.train(was_training)
    lp = st.logprob.cpu().numpy()
    ctrl = st.ctrl_logprob.cpu().numpy()
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
    return pl.DataFrame(data)


def probe_summary(frame: pl.DataFrame, names: Sequence[str]) -> dict[str, float]:
    """Mean probability per key context of the gold token and of each control token, as flat
    metric names ``probe/<context>/<token>`` (``gold`` for the gold next token)."""
    cols = [pl.col("lp_gold").exp().mean().alias("gold")] + [
        pl.col(ctrl_column(n)).exp().mean().alias(n) for n in names
    ]
    agg = frame.filter(pl.col("context") != "").group_by("context").agg(cols)
    out: dict[str, float] = {}
    for row in agg.iter_rows(named=True):
        ctx = row.pop("context")
        for name, v in row.items():
            out[f"probe/{ctx}/{name}"] = float(v)
    return out
