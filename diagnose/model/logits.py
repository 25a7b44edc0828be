"""Per-position statistics from logits, in one pass: the sampled token's log-prob, the entropy,
the log-prob of every watched control token (of its first token, for a multi-token one), and,
where the targets themselves continue with a multi-token control sequence, that whole sequence's
log-prob (the sum of the targets' log-probs along it: no extra forward pass).

Why one function: the trainer's loss, its token traces, the fixed control-token probe and the
capability probes all need the same numbers; computing them together costs one logsumexp.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TokenStats:
    logprob: torch.Tensor  # [B, T] log p(target)
    entropy: torch.Tensor  # [B, T] entropy of the next-token distribution (nats)
    ctrl_logprob: torch.Tensor  # [B, T, K] log p(control token k)
    # [B, T, M] log p(whole sequence m | prefix up to t) where targets[t:t+len] is sequence m,
    # NaN elsewhere; None unless ``ctrl_seqs`` was given
    ctrl_seq_logprob: torch.Tensor | None = None


def sequence_logprob(logprob: torch.Tensor, targets: torch.Tensor, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """[B, T, M]: at position t, the log-prob of ``seqs[m]`` as the continuation from t, where
    ``targets[:, t:t+len]`` is that sequence (the sum of the targets' log-probs along it), NaN
    where it is not (finding it there would take a forward pass over the sequence)."""
    b, t = targets.shape
    out = torch.full((b, t, len(seqs)), float("nan"), dtype=logprob.dtype, device=logprob.device)
    lp = logprob.detach()
    for m, seq in enumerate(seqs):
        n = len(seq)
        if n == 0 or n > t:
            continue
        want = torch.tensor(list(seq), dtype=targets.dtype, device=targets.device)
        match = (targets.unfold(1, n, 1) == want).all(-1)  # [B, T-n+1]
        out[:, : t - n + 1, m] = torch.where(match, lp.unfold(1, n, 1).sum(-1), out[:, : t - n + 1, m])
    return out


def token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ctrl_ids: torch.Tensor | None = None,
    *,
    with_entropy: bool = True,
    ctrl_seqs: Sequence[Sequence[int]] | None = None,
) -> TokenStats:
    """``logits`` [B, T, V] predicting ``targets`` [B, T]; ``ctrl_ids`` [K] watched token ids
    (first ids of multi-token ones); ``ctrl_seqs``: id sequences whose whole log-prob to record
    where the targets continue with them (:func:`sequence_logprob`).

    Computed in float32 whatever the model dtype (bf16 log-probs are too coarse to compare
    training and sampler log-probs). Entropy gradients are not needed by any caller, so the
    entropy is computed without building a graph.
    """
    logits = logits.float()
    logz = torch.logsumexp(logits, dim=-1)  # [B, T]
    logprob = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    if with_entropy:
        with torch.no_grad():
            probs = torch.softmax(logits, dim=-1)
            entropy = logz - (probs * logits).sum(-1)
    else:
        entropy = torch.zeros_like(logprob)
    if ctrl_ids is not None and ctrl_ids.numel():
        ctrl = logits.index_select(-1, ctrl_ids.to(logits.device)) - logz.unsqueeze(-1)
    else:
        ctrl = logits.new_zeros(*logits.shape[:2], 0)
    seq = sequence_logprob(logprob, targets, ctrl_seqs) if ctrl_seqs else None
    return TokenStats(logprob, entropy, ctrl, seq)
