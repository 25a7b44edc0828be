"""Batched multi-turn rollouts with HF ``generate`` (KV cache), keeping the sampler's own
log-probs so the training/inference mismatch can be measured.

Every active episode generates its next assistant turn in one batched ``generate`` call; tool
outputs are executed by the environment and appended as masked observation tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from diagnose.chat import IM_END
from diagnose.model.generation import Sampling, generate_batch
from diagnose.tasks import Episode, Rollout, Task, gold_messages, with_hint
from diagnose.tasks.episode import OnMalformed

from diagnose.model.sequences import Sequence, encode, encode_conversation, observation_text, prompt_text

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


def rollout_episodes(
    model: Any, tokenizer: Any, items: list[tuple[Task, int, Kind]], *, max_turns: int, sampling: Sampling,
    on_malformed: OnMalformed = "end",
    generate: Callable[[list[list[int]], Sampling], list[tuple[list[int], list[float], bool]]] | None = None,
) -> list[Trajectory]:
    """Roll out ``(task, group, kind)`` items. ``hint`` items are sampled with the hint in the
    system prompt but their training sequence uses the plain prompt; ``gold`` items are the
    ground-truth trajectory (off-policy, no sampler log-probs). ``generate``: the rollout
    engine, ``(contexts, sampling) -> [(ids, sampler log-probs, stopped)]`` (default: HF
    ``generate`` on ``model``; `train_minimal.vllm_rollout.VLLMEngine.generate` for vLLM).
    ``on_malformed``: what the environment does with a turn whose call attempts are all malformed
    (`diagnose.tasks.Rollout`)."""
    if generate is None:
        def generate(contexts: list[list[int]], s: Sampling) -> list[tuple[list[int], list[float], bool]]:
            return generate_batch(model, tokenizer, contexts, s)
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
        live.append((i, Rollout(task, max_turns=max_turns, on_malformed=on_malformed), ctx, seq))

    truncated: set[int] = set()
    turn = 0
    while live:
        outs = generate([c for _, _, c, _ in live], sampling)
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
