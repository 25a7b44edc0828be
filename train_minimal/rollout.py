"""Batched multi-turn rollouts with HF ``generate`` (KV cache), keeping the sampler's own
log-probs so the training/inference mismatch can be measured.

Every active episode generates its next assistant turn in one batched ``generate`` call; tool
outputs are executed by the environment and appended as masked observation tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from diagnose.chat import ENDOFTEXT, IM_END
from diagnose.tasks import Episode, Rollout, Task, gold_messages, with_hint

from diagnose.sequences import Sequence, encode, encode_conversation, observation_text, prompt_text

Kind = Literal["policy", "hint", "gold"]


@dataclass
class Trajectory:
    """One member of a GRPO group: its tokens (trained on the un-hinted prompt) and its episode."""

    task: Task
    group: int
    kind: Kind
    seq: Sequence
    episode: Episode
    truncated: bool = False  # a turn hit max_new_tokens or the context limit

    @property
    def reward(self) -> float:
        return self.episode.score.reward


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    max_context: int = 2048


def _left_pad(seqs: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_batch(model: Any, tokenizer: Any, contexts: list[list[int]], s: Sampling) -> list[tuple[list[int], list[float], bool]]:
    """For each context: (generated ids up to and including the stop token, sampler log-probs of
    those ids, whether a stop token was reached)."""
    stop = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[1]
    ids, mask = _left_pad(contexts, pad, model.device)
    kw: dict[str, Any] = dict(do_sample=False) if s.greedy else dict(
        do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=s.max_new_tokens, eos_token_id=stop,
        pad_token_id=pad, output_scores=True, return_dict_in_generate=True, **kw)
    gen = out.sequences[:, ids.shape[1]:]
    # scores are the processed logits the token was drawn from (temperature/top-p applied)
    lps = torch.stack([torch.log_softmax(sc.float(), -1).gather(-1, gen[:, t:t + 1]).squeeze(-1)
                       for t, sc in enumerate(out.scores)], dim=1)
    results = []
    for row, lp in zip(gen.tolist(), lps.tolist()):
        n = len(row)
        for j, t in enumerate(row):
            if t in stop:
                n = j + 1
                break
        stopped = n <= len(row) and n > 0 and row[n - 1] in stop
        results.append((row[:n], lp[:n], stopped))
    return results


def rollout_episodes(
    model: Any, tokenizer: Any, items: list[tuple[Task, int, Kind]], *, max_turns: int, sampling: Sampling,
) -> list[Trajectory]:
    """Roll out ``(task, group, kind)`` items. ``hint`` items are sampled with the hint in the
    system prompt but their training sequence uses the plain prompt; ``gold`` items are the
    ground-truth trajectory (off-policy, no sampler log-probs)."""
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    trajs: list[Trajectory | None] = [None] * len(items)
    live: list[tuple[int, Rollout, list[int], Sequence]] = []  # (index, env rollout, context ids, train seq)
    for i, (task, group, kind) in enumerate(items):
        if kind == "gold":
            msgs = gold_messages(task)
            seq = encode_conversation(tokenizer, msgs, len(task.messages))
            r = Rollout(task, max_turns=max(max_turns, len(task.gold_turns)))
            for m in msgs[len(task.messages):]:
                if m["role"] == "assistant":
                    r.step(m["content"])
            trajs[i] = Trajectory(task, group, kind, seq, r.episode())
            continue
        plain = encode(tokenizer, prompt_text(task.messages))
        ctx = encode(tokenizer, prompt_text(with_hint(task).messages)) if kind == "hint" else list(plain)
        seq = Sequence()
        seq.add(plain, train=False, turn=-1)
        live.append((i, Rollout(task, max_turns=max_turns), ctx, seq))

    truncated: set[int] = set()
    turn = 0
    while live:
        outs = generate_batch(model, tokenizer, [c for _, _, c, _ in live], sampling)
        still = []
        for (i, r, ctx, seq), (gen, lp, stopped) in zip(live, outs):
            text = tokenizer.decode(gen[:-1] if stopped else gen, skip_special_tokens=False)
            seq.add(gen, train=True, turn=turn, logprobs=lp)
            ctx.extend(gen)
            if not stopped:  # close the turn ourselves; this token is not the model's, not trained
                truncated.add(i)
                seq.add([im_end], train=False, turn=turn)
                ctx.append(im_end)
            tool_msgs = r.step(text)
            if not r.done:
                obs = encode(tokenizer, observation_text(r.messages[: len(r.messages) - len(tool_msgs)], tool_msgs))
                if len(ctx) + len(obs) + sampling.max_new_tokens <= sampling.max_context:
                    seq.add(obs, train=False, turn=turn)
                    ctx.extend(obs)
                    still.append((i, r, ctx, seq))
                    continue
                truncated.add(i)  # out of context: the episode ends here, unfinished
            task, group, kind = items[i]
            trajs[i] = Trajectory(task, group, kind, seq, r.episode(), truncated=i in truncated)
        live = still
        turn += 1
    assert all(t is not None for t in trajs)
    return trajs  # type: ignore[return-value]
