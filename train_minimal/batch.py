"""Token sequences -> padded tensors aligned to next-token targets.

Position ``p`` of every ``[B, L-1]`` tensor predicts token ``p + 1`` of the sequence.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np
import torch

from diagnose.model.sequences import Sequence


@dataclass
class Batch:
    ids: torch.Tensor  # [B, L] right-padded
    attention: torch.Tensor  # [B, L]
    loss_mask: torch.Tensor  # [B, L-1] float: target token is trained on
    sampler_logprob: torch.Tensor  # [B, L-1] sampler log-prob of the target (NaN: none)
    turn: torch.Tensor  # [B, L-1] turn of the target token
    lengths: list[int]
    prompt_lengths: list[int]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def to(self, device: str | torch.device) -> "Batch":
        return Batch(self.ids.to(device), self.attention.to(device), self.loss_mask.to(device),
                     self.sampler_logprob.to(device), self.turn.to(device), self.lengths, self.prompt_lengths)

    def rows(self, idx: slice) -> "Batch":
        """A micro-batch, trimmed to its own longest sequence."""
        lens = self.lengths[idx]
        width = max(lens)
        return Batch(self.ids[idx, :width], self.attention[idx, :width], self.loss_mask[idx, : width - 1],
                     self.sampler_logprob[idx, : width - 1], self.turn[idx, : width - 1], lens, self.prompt_lengths[idx])

    def completion_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(row, position) of every predicting position in the completions: from the last prompt
        token to the second-to-last token, i.e. every completion token is a target once."""
        rows = np.concatenate([np.full(n - p, i) for i, (p, n) in enumerate(zip(self.prompt_lengths, self.lengths))])
        pos = np.concatenate([np.arange(p - 1, n - 1) for p, n in zip(self.prompt_lengths, self.lengths)])
        return rows, pos


def make_batch(seqs: Seq[Sequence], pad_id: int) -> Batch:
    lengths = [len(s) for s in seqs]
    width = max(lengths)
    B = len(seqs)
    ids = np.full((B, width), pad_id, dtype=np.int64)
    att = np.zeros((B, width), dtype=np.int64)
    mask = np.zeros((B, width), dtype=np.float32)
    slp = np.full((B, width), np.nan, dtype=np.float32)
    turn = np.full((B, width), -1, dtype=np.int64)
    prompt = []
    for i, s in enumerate(seqs):
        n = len(s)
        ids[i, :n] = s.ids
        att[i, :n] = 1
        mask[i, :n] = s.loss_mask
        slp[i, :n] = s.sampler_logprob
        turn[i, :n] = s.turn
        prompt.append(next((j for j, t in enumerate(s.turn) if t >= 0), n))
    return Batch(
        ids=torch.from_numpy(ids), attention=torch.from_numpy(att),
        loss_mask=torch.from_numpy(mask[:, 1:]), sampler_logprob=torch.from_numpy(slp[:, 1:]),
        turn=torch.from_numpy(turn[:, 1:]), lengths=lengths, prompt_lengths=prompt,
    )


def micro_slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]
