"""Small realistic runs in other trainers' layouts, with an optional collapse at a known step.

Used by the adapter tests and by the scan tests. Each writer returns a `ForeignRun` with the
path to hand to `diagnose.adapters.load_run` and the ground truth of what it wrote.

* `write_trl_run`: a TRL GRPOTrainer ``output_dir`` as TRL 1.16 writes it (`diagnose.synth.trl_run`,
  `diagnose.synth.trl`): ``completions/completions_<step:05d>.parquet`` (``step, prompt,
  completion, <reward function>..., <log_extra column>..., advantage``; prompts/completions as
  message lists or decoded text) and ``checkpoint-<step>/trainer_state.json``;
* `write_verl_run`: a verl launch folder as verl writes it (`diagnose.synth.verl`):
  ``rollout_data/<step>.jsonl`` dumps from step 1 (``input, output, gts, score, step, acc, pred``;
  tool-agent episodes decoded with special tokens skipped), ``validation_data/<step>.jsonl`` (with
  ``reward``, from step 0) and the file logger's ``<project>/<experiment>.jsonl``;
* `write_open_instruct_run`: open-instruct's ``<dir>/<run_name>_rollouts_<shard>.jsonl`` traces
  and ``<run_name>_metadata.jsonl`` as ``open_instruct/rl_utils.py`` writes them (token ids only,
  tool outputs appended with log-prob 0.0, ``request_info``; see `diagnose.synth.open_instruct`),
  ids from a given tokenizer or a toy one that gives the chat control strings their Qwen2.5 ids;
* `write_conversation_run`: conversation JSONL, one file per step (``step-000010.jsonl`` or
  another name pattern) or one file with a ``step`` field per line.

The rollouts are gold trajectories of the tool-use environment (`diagnose.tasks`), GRPO groups
of ``group_size`` samples per prompt (`Sampling`). Healthy samples succeed with probability 0.7 (else the
final answer is wrong, reward 0); 10% have text after the first call (a polluted turn, reward
0). From ``collapse_at`` on, a ``collapse_rate`` share of samples (0.8) is one collapsed turn --
a bare ``<tool_call>`` (60%) or an empty turn (40%) -- with reward 0. Before ``collapse_at``
no turn is collapsed. TRL samples are single-turn (the first assistant turn); verl, open-instruct
and conversation samples are whole multi-turn episodes.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diagnose.chat import ENDOFTEXT, IM_END, IM_START, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, render_chat

__all__ = [
    "ForeignRun",
    "Sampling",
    "write_conversation_run",
    "write_open_instruct_run",
    "write_trl_run",
    "write_verl_run",
]

COLLAPSED_TURNS = ("<tool_call>", "")
POLLUTION = "\nI will wait for the result before answering."
WRONG_ANSWER = "Sorry, I could not find that."

#: Qwen2.5 ids of the chat control strings (toy tokenizer of the open-instruct writer).
QWEN_IDS = {ENDOFTEXT: 151643, IM_START: 151644, IM_END: 151645, TOOL_CALL_OPEN: 151657, TOOL_CALL_CLOSE: 151658}
_PIECES = re.compile(r"<\|[a-z_]+\|>|</?tool_call>|\w+|\s+|[^\w\s]")


@dataclass
class ForeignRun:
    """What a writer wrote: ``path`` to load, and the ground truth per step."""

    path: Path
    format: str
    steps: list[int]
    collapse_at: int | None
    group_size: int
    prompts_per_step: int
    #: step -> number of samples that are one collapsed turn
    collapsed: dict[int, int] = field(default_factory=dict)
    #: step -> mean reward as the adapter should compute it (TRL: sum of the reward columns)
    reward: dict[int, float] = field(default_factory=dict)
    #: step -> count of every assistant turn state written
    turn_states: dict[int, Counter] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    #: open-instruct: step -> the turn states written for each sample (in sample_idx order)
    sample_states: dict[int, list[list[str]]] = field(default_factory=dict)
    #: open-instruct: step -> sampled (not tool-output) tokens of each sample (sample_idx order)
    sample_generated: dict[int, list[int]] = field(default_factory=dict)

    @property
    def samples_per_step(self) -> int:
        return self.group_size * self.prompts_per_step

    def collapsed_share(self, step: int) -> float:
        """Share of assistant turns written collapsed at ``step``."""
        c = self.turn_states[step]
        return c["collapsed"] / max(sum(c.values()), 1)


@dataclass
class _Sample:
    task: int
    prompt_messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    turns: list[str]  # assistant texts
    observations: list[list[str]]  # tool outputs after each turn
    states: list[str]  # expected state of each turn
    success: bool
    polluted: bool
    collapsed: bool
    gold_answer: str

    @property
    def reward(self) -> float:
        return float(self.success and not self.polluted and not self.collapsed)


def _steps(steps: int | Iterable[int]) -> list[int]:
    if isinstance(steps, int):
        return list(range(steps))
    out = sorted({int(s) for s in steps})
    if any(s < 0 for s in out):
        raise ValueError("steps must be >= 0")
    return out


def _trajectories(n: int, seed: int) -> list[tuple[Any, list[str], list[list[str]]]]:
    from diagnose.tasks import gold_messages, make_tasks

    out = []
    for task in make_tasks("train", n, seed=seed):
        turns: list[str] = []
        obs: list[list[str]] = []
        for m in gold_messages(task)[len(task.messages):]:
            if m["role"] == "assistant":
                turns.append(m.get("content") or "")
                obs.append([])
            elif m["role"] == "tool" and obs:
                obs[-1].append(m.get("content") or "")
        out.append((task, turns, obs))
    return out


@dataclass(frozen=True)
class Sampling:
    """What a writer samples per step: ``prompts_per_step`` prompts, ``group_size`` samples each
    (a GRPO group); from ``collapse_at`` on, a ``collapse_rate`` share of samples is one
    collapsed turn."""

    group_size: int = 4
    prompts_per_step: int = 4
    collapse_rate: float = 0.8


def _plan(steps: list[int], collapse_at: int | None, seed: int, sampling: Sampling,
          multi_turn: bool) -> dict[int, list[list[_Sample]]]:
    group_size, prompts_per_step = sampling.group_size, sampling.prompts_per_step
    if group_size < 1 or prompts_per_step < 1:
        raise ValueError("group_size and prompts_per_step must be >= 1")
    rng = random.Random(seed)
    pool = _trajectories(max(3 * prompts_per_step, 8), seed)
    plan: dict[int, list[list[_Sample]]] = {}
    for step in steps:
        groups = []
        for t in rng.sample(range(len(pool)), prompts_per_step):
            task, gold, obs = pool[t]
            group = []
            for _ in range(group_size):
                collapsed = collapse_at is not None and step >= collapse_at and rng.random() < sampling.collapse_rate
                if collapsed:
                    text = COLLAPSED_TURNS[0] if rng.random() < 0.6 else COLLAPSED_TURNS[1]
                    s = _Sample(t, task.messages, task.tools, [text], [[]], ["collapsed"], False, False, True,
                                task.gold_answer)
                else:
                    turns = list(gold) if multi_turn else gold[:1]
                    observations = [list(o) for o in (obs if multi_turn else obs[:1])]
                    success = rng.random() < 0.7
                    if multi_turn and not success:
                        turns[-1] = WRONG_ANSWER
                    polluted = rng.random() < 0.1
                    if polluted:
                        turns[0] = turns[0] + POLLUTION
                    states = ["healthy_call" if x.startswith(TOOL_CALL_OPEN) else "healthy_response" for x in turns]
                    if polluted:
                        states[0] = "polluted"
                    s = _Sample(t, task.messages, task.tools, turns, observations, states, success, polluted,
                                False, task.gold_answer)
                group.append(s)
            groups.append(group)
        plan[step] = groups
    return plan


def _truth(run: ForeignRun, plan: dict[int, list[list[_Sample]]], rewards: dict[int, list[float]]) -> ForeignRun:
    for step, groups in plan.items():
        samples = [s for g in groups for s in g]
        run.collapsed[step] = sum(s.collapsed for s in samples)
        run.turn_states[step] = Counter(st for s in samples for st in s.states)
        run.reward[step] = float(np.mean(rewards[step]))
    return run




def _start(path: Path, fmt: str, steps: list[int], collapse_at: int | None, seed: int,
           sampling: Sampling) -> tuple[ForeignRun, dict[int, list[list[_Sample]]]]:
    """The run to fill in and what each of its steps samples (multi-turn episodes)."""
    plan = _plan(steps, collapse_at, seed, sampling, multi_turn=True)
    return ForeignRun(path, fmt, steps, collapse_at, sampling.group_size, sampling.prompts_per_step), plan


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")




def _health(plan_step: list[list[_Sample]]) -> float:
    samples = [s for g in plan_step for s in g]
    return 1.0 - sum(s.collapsed for s in samples) / len(samples)


# ---- TRL ----------------------------------------------------------------------------


def write_trl_run(dir: str | os.PathLike[str], steps: int = 10, collapse_at: int | None = None,  # noqa: A002
                  seed: int = 0, **options: Any) -> ForeignRun:
    """A TRL GRPOTrainer output directory as ``GRPOTrainer.train`` writes it (TRL 1.16
    ``trl/trainer/grpo_trainer.py``): see `diagnose.synth.trl_run.write_trl_run` for the options
    (message-list or decoded-text completions, ``logging_steps``, ``num_iterations``, eval,
    ``log_extra`` columns). Global steps run from 1 to ``steps``."""
    from diagnose.synth.trl_run import write_trl_run as write

    return write(dir, steps, collapse_at, seed, **options)


# ---- verl ---------------------------------------------------------------------------


def write_verl_run(
    dir: str | os.PathLike[str],  # noqa: A002
    steps: int | Iterable[int] = 10,
    collapse_at: int | None = None,
    seed: int = 0,
    *,
    sampling: Sampling = Sampling(),
    metrics: bool = True,
    rollouts: bool = True,
    validation: bool = True,
    project: str = "verl_grpo_tooluse",
    experiment: str = "qwen2.5_grpo_tooluse",
    test_freq: int = 5,
) -> ForeignRun:
    """A verl run launched in ``dir``, laid out as verl 0.8.0.dev writes it (`diagnose.synth.verl`
    names the verl function behind each piece): ``rollout_data/<step>.jsonl`` dumps for steps
    1..N (``trainer.rollout_data_dir=rollout_data``; multi-turn tool-agent episodes decoded with
    special tokens skipped), ``validation_data/<step>.jsonl`` at step 0, every ``test_freq`` steps
    and the last (with the ``reward`` key), and the file logger's
    ``<project>/<experiment>.jsonl``. ``steps``: a count (steps 1..N) or the step numbers (>= 1:
    verl's training starts at step 1; step 0 is the validation before training)."""
    from diagnose.synth import verl as vs

    root = Path(dir)
    step_list = list(range(1, steps + 1)) if isinstance(steps, int) else _steps(steps)
    if any(s < 1 for s in step_list):
        raise ValueError("verl training steps start at 1")
    run, plan = _start(root, "verl", step_list, collapse_at, seed, sampling)
    rewards: dict[int, list[float]] = {}
    nrng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    logger = vs.FileLogger(project, experiment, root=root) if metrics else None

    def dump(folder: Path, step: int, samples: list[_Sample], val: bool) -> list[float]:
        texts = [vs.verl_dump_text(_verl_prompt(s), s.tools, s.turns, s.observations) for s in samples]
        scores = [s.reward for s in samples]
        extra: dict[str, list[Any]] = {"reward": scores} if val else {}
        extra.update({"acc": [bool(s.success and not s.collapsed) for s in samples],
                      "pred": [s.turns[-1][:80] for s in samples]})
        run.files.append(vs.dump_generations(folder, step, [t[0] for t in texts], [t[1] for t in texts],
                                             [s.gold_answer for s in samples], scores, extra))
        return [float(t[2]) for t in texts]

    def validate(step: int) -> None:
        if validation:
            first = [g[0] for g in plan[step_list[0] if step == 0 else step]]
            dump(root / "validation_data", step, first, val=True)

    validate(0)
    if logger is not None:
        logger.log({"val-core/tooluse/acc/mean@1": float(np.mean([g[0].success for g in plan[step_list[0]]]))}, 0)
    for step in step_list:
        samples = [s for g in plan[step] for s in g]
        rewards[step] = [s.reward for s in samples]
        turns = [0.0]
        if rollouts:
            turns = dump(root / "rollout_data", step, samples, val=False)
        if step == step_list[-1] or step % test_freq == 0:
            validate(step)
        health = _health(plan[step])
        lengths = [sum(len(t) for t in s.turns) / 3.5 for s in samples]
        score = float(np.mean(rewards[step]))
        if logger is not None:
            logger.log({
                "actor/entropy": float(0.05 + 0.6 * health + nrng.random() * 0.02),
                "actor/pg_clipfrac": float(0.001 + (1 - health) * 0.05),
                "actor/ppo_kl": float(1e-4 + (1 - health) * 0.01),
                "actor/kl_loss": float(0.001 * (step + 1)),
                "actor/pg_loss": float(nrng.normal(0, 0.01)),
                "actor/grad_norm": float(0.3 + (1 - health) * 4),
                "actor/lr": 1e-6,
                "critic/score/mean": score,
                "critic/score/max": float(np.max(rewards[step])),
                "critic/score/min": float(np.min(rewards[step])),
                "critic/rewards/mean": score,
                "critic/advantages/mean": 0.0,
                "response_length/mean": float(np.mean(lengths)),
                "response_length/max": float(np.max(lengths)),
                "response_length/min": float(np.min(lengths)),
                "response_length/clip_ratio": 0.0,
                "num_turns/mean": float(np.mean(turns)),
                "training/rollout_probs_diff_mean": float(0.002 + (1 - health) * 0.03),
                "timing_s/gen": float(10 + nrng.random()),
                "training/global_step": step,
            }, step)
    if logger is not None:
        logger.finish()
        run.files.append(logger.filepath)
    return _truth(run, plan, rewards)


def _verl_prompt(s: _Sample) -> list[dict[str, Any]]:
    """The dataset's ``raw_prompt``: the system instruction without the tools block (verl passes
    the tool schemas to the chat template) and the user turn."""
    msgs = [dict(m) for m in s.prompt_messages]
    if msgs and msgs[0].get("role") == "system":
        msgs[0]["content"] = str(msgs[0].get("content", "")).split("\n\n# Tools")[0]
    return msgs


# ---- open-instruct ------------------------------------------------------------------


def toy_tokenize(text: str) -> list[int]:
    """Deterministic toy token ids: chat control strings get their Qwen2.5 ids, other pieces
    (words, spaces, punctuation) a hash in [1000, 151000)."""
    return [QWEN_IDS.get(p, 1000 + zlib.crc32(p.encode()) % 150000) for p in _PIECES.findall(text)]


def _turn_logprobs(rng: np.random.Generator, ids: Sequence[int], collapsed: bool) -> list[float]:
    """Sampled-token log-probs: mostly small negatives, a quarter exactly 0.0 (vLLM gives 0.0
    for a token sampled with probability 1 in float32, so 0.0 alone does not mark a tool
    token); a collapsed turn's closing <|im_end|> has a sizeable probability."""
    lps = -np.abs(rng.normal(0, 0.5, len(ids)))
    lps[rng.random(len(ids)) < 0.25] = 0.0
    if collapsed and len(ids):
        lps[-1] = math.log(rng.uniform(0.3, 0.9))
    return [round(float(x), 5) for x in lps]


def write_open_instruct_run(
    dir: str | os.PathLike[str],  # noqa: A002
    steps: int | Iterable[int] = 10,
    collapse_at: int | None = None,
    seed: int = 0,
    *,
    sampling: Sampling = Sampling(),
    run_name: str = "grpo_tooluse__1__1767225600",
    tokenizer: Any = None,
    model_name: str | None = "Qwen/Qwen2.5-7B-Instruct",
    shard_size: int = 10000,
) -> ForeignRun:
    """open-instruct rollout traces as its own code writes them (`diagnose.synth.open_instruct`
    names the source of each piece): ``<run_name>_metadata.jsonl`` and
    ``<run_name>_rollouts_<shard:06d>.jsonl`` with token ids only (no text), multi-turn
    responses with the tool outputs appended (log-prob 0.0), ``request_info``.

    ``tokenizer``: encodes the text (``encode(text, add_special_tokens=False)``, e.g. the
    offline Qwen2.5 tokenizer) so the ids are real; None: toy ids (`toy_tokenize`) that no
    tokenizer decodes. A collapsed sample is one turn, ``<tool_call>\\n<|im_end|>`` or an empty
    ``<|im_end|>``. ``ForeignRun.sample_states[step]`` lists each sample's written turn states."""
    from diagnose.synth import open_instruct as oi

    if tokenizer is None:
        encode = toy_tokenize
    else:
        def encode(text: str) -> list[int]:
            out = tokenizer.encode(text, add_special_tokens=False)
            return [int(i) for i in getattr(out, "ids", out)]
    root = Path(dir)
    step_list = _steps(steps)
    run, plan = _start(root, "open_instruct", step_list, collapse_at, seed, sampling)
    writer = oi.TraceWriter(root, run_name, model_name=model_name, shard_size=shard_size)
    rng = np.random.default_rng(seed)
    rewards: dict[int, list[float]] = {}
    prompts: dict[int, list[int]] = {}
    for step in step_list:
        samples = [s for g in plan[step] for s in g]
        scores = [s.reward for s in samples]
        advs = oi.advantages(scores, sampling.group_size)
        records = []
        run.sample_generated[step] = []
        for i, s in enumerate(samples):
            if s.task not in prompts:
                prompts[s.task] = encode(render_chat(s.prompt_messages, add_generation_prompt=True))
            resp = oi.Response()
            outputs: list[str] = []
            for k, (turn, obs) in enumerate(zip(s.turns, s.observations)):
                text = turn + "\n" if s.collapsed and turn == TOOL_CALL_OPEN else turn
                ids = encode(text + IM_END)
                resp.add_model_turn(ids, _turn_logprobs(rng, ids, s.collapsed))
                if k < len(s.turns) - 1:
                    for o in obs:
                        resp.add_observation(encode, o)
                        outputs.append(o)
            resp.finish(QWEN_IDS[IM_END])
            run.sample_generated[step].append(sum(resp.masks))
            records.append(oi.rollout_record(
                step=step, sample_idx=i, num_samples_per_prompt=sampling.group_size, prompt_tokens=prompts[s.task],
                response=resp, reward=s.reward, advantage=advs[i], dataset="tool_use",
                ground_truth=s.gold_answer, info=oi.request_info(outputs, runtimes=[0.01] * len(outputs)),
            ))
        writer.write_batch(records)
        rewards[step] = scores
        run.sample_states[step] = [list(s.states) for s in samples]
    run.files = [*writer.close(), root / oi.metadata_name(run_name)]
    return _truth(run, plan, rewards)


# ---- conversations ------------------------------------------------------------------


def _messages(s: _Sample) -> list[dict[str, Any]]:
    msgs = [dict(m) for m in s.prompt_messages]
    for turn, obs in zip(s.turns, s.observations):
        msgs.append({"role": "assistant", "content": turn})
        msgs.extend({"role": "tool", "content": o} for o in obs)
    return msgs


def write_conversation_run(
    path: str | os.PathLike[str],
    steps: int | Iterable[int] = 10,
    collapse_at: int | None = None,
    seed: int = 0,
    *,
    sampling: Sampling = Sampling(),
    layout: str = "dir",
    naming: str = "step-{step:06d}.jsonl",
) -> ForeignRun:
    """Conversation JSONL (``{"id", "messages", "tools", "reward", ...}`` per line).

    ``layout="dir"``: ``path`` is a folder with one file per step named by ``naming``
    (``"{step}.jsonl"``, ``"step_{step}.jsonl"`` or ``"step-{step:06d}.jsonl"``), lines without
    a ``step`` field. ``layout="file"``: ``path`` is one JSONL file (``path/conversations.jsonl``
    if ``path`` is an existing folder) whose lines carry ``step``."""
    if layout not in ("dir", "file"):
        raise ValueError("layout must be 'dir' or 'file'")
    step_list = _steps(steps)
    target = Path(path)
    if layout == "file" and target.is_dir():
        target = target / "conversations.jsonl"
    run, plan = _start(target, "conversations", step_list, collapse_at, seed, sampling)
    rewards: dict[int, list[float]] = {}
    all_lines = []
    for step in step_list:
        lines = []
        for gi, group in enumerate(plan[step]):
            for k, s in enumerate(group):
                line: dict[str, Any] = {"id": f"s{step}-g{gi}-{k}"}
                if layout == "file":
                    line["step"] = step
                line.update({"messages": _messages(s), "tools": s.tools, "reward": s.reward,
                             "task_index": s.task})
                lines.append(line)
        rewards[step] = [ln["reward"] for ln in lines]
        if layout == "dir":
            f = target / naming.format(step=step)
            _write_jsonl(f, lines)
            run.files.append(f)
        else:
            all_lines.extend(lines)
    if layout == "file":
        _write_jsonl(target, all_lines)
        run.files.append(target)
    return _truth(run, plan, rewards)
