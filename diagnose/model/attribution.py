"""The logit-gradient attribution of control tokens: how a policy-gradient step pushes a watched
token's logit, split into "self" (positions where that token was sampled) and "other" (positions
where another token was), from tensors any trainer's loss already has.

Gradient descent on ``-A log p(y_t)`` moves the logit of token k at position t by
``lr * A * (1[k = y_t] - p_k,t)``. Summed over positions: "self" = ``sum A (1 - p_k)`` where k was
sampled, "other" = ``-sum A p_k`` where it was not. The paper's mechanism (a control token spiking
at ``<tool_call>\\n``) is a question about *where* the push on ``<|im_end|>`` comes from: from the
call-open positions themselves (``at=`` a context mask), or from the other contexts where
``<|im_end|>`` is sampled (every turn end), reaching the call-open context through shared weights.

Used by our trainer (`train_minimal.instrument.Attribution`, every step) and for TRL runs by
experiments/smollm2_grpo.py (the policy's logits captured in the GRPO loss); model-agnostic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["after_sequence", "logit_push"]


@torch.no_grad()
def logit_push(targets: torch.Tensor, ctrl_logprob: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
               ctrl_ids: torch.Tensor, *, per_token: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(self, other)``, each [K]: the push on each token of ``ctrl_ids`` [K] summed over the
    batch. ``targets`` [B, T] are the sampled tokens, ``ctrl_logprob`` [B, T, K] the policy's
    log-probs of the K tokens at each position, ``mask`` [B, T] the positions in the loss (or a
    context within them), ``advantages`` [B]. ``per_token``: weight each sample's positions by
    1 / its number of masked positions (a token-mean per sample, as our trainer's metric);
    False: raw ``A`` per position (the push the sum of the loss terms puts there)."""
    p = ctrl_logprob.detach().float().exp()
    m = mask.float()
    onehot = targets.unsqueeze(-1) == ctrl_ids.to(targets.device)  # [B, T, K]
    w = advantages.float().view(-1, 1) * m
    if per_token:
        w = w / m.sum(1, keepdim=True).clamp(min=1)
    w = w.unsqueeze(-1)
    return (w * onehot * (1 - p)).sum((0, 1)), -(w * ~onehot * p).sum((0, 1))


def after_sequence(ids: torch.Tensor, seq: Sequence[int]) -> torch.Tensor:
    """[B, T] bool: the positions t of ``ids`` [B, T] whose ``len(seq)`` preceding tokens are
    ``seq`` (e.g. ``<tool_call>\\n``, five tokens plus the newline in SmolLM2, two in Qwen2.5):
    where the next token (``ids[:, t]``) is chosen in that context."""
    b, t = ids.shape
    n = len(seq)
    out = torch.zeros(b, t, dtype=torch.bool, device=ids.device)
    if n == 0 or n >= t:
        return out
    want = torch.tensor(list(seq), dtype=ids.dtype, device=ids.device)
    match = (ids.unfold(1, n, 1) == want).all(-1)  # [B, T-n+1]: ids[:, i:i+n] == seq
    out[:, n:] = match[:, : t - n]
    return out
