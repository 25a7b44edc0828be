"""GRPO and SFT losses, written out so each term is visible.

The GRPO loss is a token-mean over the loss mask (assistant tokens only; prompts and tool outputs
masked) by default, which is what TRL calls ``loss_type="dapo"`` and verl ``token-mean``; with
``agg="seq-mean-token-mean"`` (verl's mode of that name, TRL's ``"grpo"``) each sequence's tokens
are averaged first, so a short sequence weighs as much as a long one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: reward minus its group mean, divided by the group std when ``scale``.

    ``rewards`` is [G * group_size], grouped contiguously.
    """
    r = rewards.view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


@dataclass
class LossStats:
    loss: torch.Tensor
    pg_loss: float
    kl: float
    clip_ratio: float
    ratio_mean: float


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def grpo_loss(
    logprob: torch.Tensor,  # [B, T] current policy, with grad
    old_logprob: torch.Tensor,  # [B, T] behaviour policy (rollout time), no grad
    advantages: torch.Tensor,  # [B] one per sequence
    mask: torch.Tensor,  # [B, T] float, 1 on trained tokens
    *,
    epsilon: float,
    epsilon_high: float,
    ref_logprob: torch.Tensor | None = None,
    beta: float = 0.0,
    off_policy: torch.Tensor | None = None,  # [B] bool: rows that are gold trajectories
    gamma: float = 0.1,
    agg: str = "token-mean",  # or "seq-mean-token-mean": the mean over rows of each row's token-mean
) -> LossStats:
    """Clipped-ratio policy gradient (PPO/GRPO) with optional k3 KL to a reference.

    Off-policy rows (gold trajectories placed in the group) have no behaviour log-probs, so
    their term is not a clipped ratio but LUFFY's shaped importance weight
    ``f(p) = p / (p + gamma)`` with ``p = pi_theta(token)``: its gradient ``gamma / (p+gamma)^2``
    boosts low-probability gold tokens instead of letting the clip ignore them.
    """
    adv = advantages.unsqueeze(1)
    log_ratio = (logprob - old_logprob).clamp(-20, 20)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    is_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    if off_policy is not None and bool(off_policy.any()):
        p = torch.exp(logprob)
        shaped = -(p / (p + gamma)) * adv
        rows = off_policy.view(-1, 1)
        per_token = torch.where(rows, shaped, per_token)
        is_clipped = is_clipped & ~rows
    kl_val = 0.0
    if ref_logprob is not None and beta > 0:
        d = ref_logprob - logprob
        kl = torch.exp(d) - d - 1  # k3: unbiased, low variance, >= 0
        per_token = per_token + beta * kl
        kl_val = float(masked_mean(kl.detach(), mask))
    if agg == "seq-mean-token-mean":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    else:
        loss = masked_mean(per_token, mask)
    return LossStats(
        loss=loss,
        pg_loss=float(loss.detach()),
        kl=kl_val,
        clip_ratio=float(masked_mean(is_clipped.float(), mask)),
        ratio_mean=float(masked_mean(ratio.detach(), mask)),
    )


def sft_loss(logprob: torch.Tensor, mask: torch.Tensor, n_tokens: float | None = None) -> torch.Tensor:
    """Negative log-likelihood, token-mean over assistant tokens (``n_tokens``: the token count
    of the whole batch, when this is one micro-batch of it)."""
    if n_tokens is None:
        return -masked_mean(logprob, mask)
    return -(logprob * mask).sum() / n_tokens
