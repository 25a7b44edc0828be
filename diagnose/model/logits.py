"""Per-position statistics from logits, in one pass: the sampled token's log-prob, the entropy,
and the log-prob of every watched control token.

Why one function: the trainer's loss, its token traces, the fixed control-token probe and the
capability probes all need the same numbers; computing them together costs one logsumexp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenStats:
    logprob: torch.Tensor  # [B, T] log p(target)
    entropy: torch.Tensor  # [B, T] entropy of the next-token distribution (nats)
    ctrl_logprob: torch.Tensor  # [B, T, K] log p(control token k)


def token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ctrl_ids: torch.Tensor | None = None,
    *,
    with_entropy: bool = True,
) -> TokenStats:
    """``logits`` [B, T, V] predicting ``targets`` [B, T]; ``ctrl_ids`` [K] watched token ids.

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
    return TokenStats(logprob, entropy, ctrl)
