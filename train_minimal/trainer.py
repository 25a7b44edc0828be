"""The training loop: an optional SFT warm start, then GRPO on multi-turn tool use with the
supervisory signals of `SupervisionConfig`. Every step writes run-directory format v1 so that
`diagnose scan` can say why a run collapsed.

Read `train()` (the loop), `setup()` (what a run is built from) and `train_step()` (one global
step); the helpers above them are one concern each.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from diagnose.atomic import atomic_write_json
from diagnose.chat import TOOL_CALL_OPEN
from diagnose.control_tokens import ControlTokenRegistry
from diagnose.model.ctrl_probe import build_probe_set, probe_summary, run_probe
from diagnose.model.logits import token_stats
from diagnose.rundir import RunReader, RunWriter
from diagnose.model.sequences import encode_conversation
from diagnose.tasks import Task, fit_context, gold_messages, load_task_file, make_tasks
from diagnose.regular_file import read_text
from diagnose.model.resolve import load_model_and_tokenizer, resolve_model_path

from train_minimal.batch import make_batch, micro_slices
from train_minimal.config import TrainConfig
from train_minimal.resume import load_latest_usable, resumable_checkpoints
from train_minimal.instrument import Attribution, TraceCollector, rollout_metrics, rollout_rows
from train_minimal.losses import grpo_loss, group_advantages, sft_loss
from train_minimal.rollout import Kind, Sampling, Trajectory, rollout_episodes

EVAL_SPLITS = ("test", "content_ood", "format_ood")


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. non-finite losses step after step); the message says why."""


def seed_for(*parts: Any) -> int:
    """A stable 31-bit seed from parts (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


def pick_device_dtype(cfg: TrainConfig) -> tuple[str, torch.dtype]:
    device = cfg.model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype = names.get(cfg.model.dtype) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    return device, dtype


def lr_at(step_in_phase: int, base: float, warmup: int, total: int = 0, schedule: str = "constant") -> float:
    """Linear warm-up over ``warmup`` steps, then constant, or decaying towards 0 over the
    phase's ``total`` steps (``linear``: TRL's default scheduler; ``cosine``). The last step's lr
    is above 0 (a step at lr 0 would be wasted)."""
    s = step_in_phase
    f = min(1.0, s / max(warmup, 1))
    if schedule != "constant" and total > warmup and s > warmup:
        progress = (s - warmup) / (total - warmup + 1)
        f = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return base * f


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs."""

    step: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # task id -> last RL step it failed at
    nonfinite_streak: int = 0


# ------------------------------------------------------------------------------ phases


def phase_of(step: int, cfg: TrainConfig) -> str:
    """'sft' (warm start or an interleaved SFT phase) or 'rl' for a global step (1-based)."""
    if step <= cfg.sft.steps:
        return "sft"
    s = cfg.supervision
    if s.sft_schedule == "interleaved":
        k = (step - cfg.sft.steps - 1) % (s.interleave_rl_steps + s.interleave_sft_steps)
        return "rl" if k < s.interleave_rl_steps else "sft_supervision"
    return "rl"


def supervision_tasks(cfg: TrainConfig, state: TrainState, pool: list[Task], step: int) -> list[Task]:
    """Gold data for the SFT signal: recently failed tasks (erroneous-example supervision) or
    random training tasks."""
    s = cfg.supervision
    rng = random.Random(seed_for(cfg.seed, step, "sft"))
    if s.sft_data == "failed":
        recent = sorted(t for t, at in state.failed.items() if step - at <= s.failed_window)
        by_id = {t.id: t for t in pool}
        chosen = rng.sample(recent, min(len(recent), s.sft_batch_size))
        return [by_id[t] for t in chosen if t in by_id]
    return rng.sample(pool, min(len(pool), s.sft_batch_size))


# ------------------------------------------------------------------------------ model passes


def truncated_at_call(msgs: list[dict], k: int) -> list[dict]:
    """The conversation up to its ``k``-th assistant call turn (modulo their number), which is cut
    to a bare ``<tool_call>\n`` that ends the turn; unchanged if it has no call turn."""
    calls = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and TOOL_CALL_OPEN in m["content"]]
    if not calls:
        return msgs
    i = calls[k % len(calls)]
    return msgs[:i] + [{"role": "assistant", "content": f"{TOOL_CALL_OPEN}\n"}]


def sft_pass(model: Any, tokenizer: Any, tasks: list[Task], micro: int, scale: float, *,
             keep_system: list[bool] | None = None, context_weight: float = 0.0,
             truncate: list[int | None] | None = None) -> float:
    """Backward the SFT loss on the tasks' gold trajectories: assistant tokens, plus the other
    tokens (user, tool outputs) at ``context_weight``; ``keep_system[i]`` False drops task i's
    system prompt (pretraining-style warm start); ``truncate[i] = k`` cuts task i's conversation
    at its k-th call turn (`truncated_at_call`)."""
    seqs = []
    for i, t in enumerate(tasks):
        msgs, n_prompt = gold_messages(t), len(t.messages)
        if truncate is not None and truncate[i] is not None:
            msgs = truncated_at_call(msgs, truncate[i])
        if keep_system is not None and not keep_system[i] and msgs and msgs[0]["role"] == "system":
            msgs, n_prompt = msgs[1:], n_prompt - 1
        seqs.append(encode_conversation(tokenizer, msgs, n_prompt))
    # sorted by length, so that micro-batches (each trimmed to its longest row) carry little padding
    seqs.sort(key=len)
    batch = make_batch(seqs, tokenizer.pad_token_id)
    weights = batch.loss_mask.float()
    if context_weight > 0:
        weights = weights + context_weight * (batch.attention[:, 1:].float() - weights).clamp(min=0)
    n_tokens = float(weights.sum())
    total = 0.0
    for sl in micro_slices(len(batch), micro):
        mb = batch.rows(sl).to(model.device)
        logits = model(input_ids=mb.ids, attention_mask=mb.attention).logits[:, :-1]
        st = token_stats(logits, mb.ids[:, 1:], with_entropy=False)
        loss = sft_loss(st.logprob, weights[sl, : mb.ids.shape[1] - 1].to(model.device), n_tokens)
        (scale * loss).backward()
        total += float(loss.detach())
    return total


def clip_and_step(model: Any, opt: torch.optim.Optimizer, max_norm: float) -> tuple[float, bool]:
    """Clip gradients and step; a non-finite gradient skips the update (never corrupts weights)."""
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    ok = math.isfinite(norm)
    if ok:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm, ok


def group_items(tasks: list[Task], cfg: TrainConfig) -> list[tuple[Task, int, Kind]]:
    """Group members: k gold (off-policy), k hinted, the rest sampled from the policy."""
    s, n = cfg.supervision, cfg.rollout.group_size
    kinds: list[Kind] = ["gold"] * s.off_policy_k + ["hint"] * s.hint_k
    kinds += ["policy"] * (n - len(kinds))
    return [(task, g, kind) for g, task in enumerate(tasks) for kind in kinds]


def grpo_pass(model: Any, ref: Any, tokenizer: Any, trajs: list[Trajectory], cfg: TrainConfig,
              registry: ControlTokenRegistry, step: int, traces: bool, attribution: bool) -> dict[str, Any]:
    """Backward the GRPO loss on one step's trajectories; returns stats, traces, attribution."""
    g = cfg.grpo
    rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float32)
    adv = group_advantages(rewards, cfg.rollout.group_size, scale=g.scale_rewards)
    is_gold = torch.tensor([t.kind == "gold" for t in trajs])
    is_policy = torch.tensor([t.kind == "policy" for t in trajs])
    batch = make_batch([t.seq for t in trajs], tokenizer.pad_token_id)
    n_tokens = float(batch.loss_mask.sum())
    ctrl_ids = torch.tensor(registry.ids, dtype=torch.long, device=model.device)
    collector = TraceCollector(registry, step, is_gold.tolist()) if traces else None
    attr = Attribution(registry) if attribution else None
    sums = {"loss": 0.0, "kl": 0.0, "clip_ratio": 0.0}
    ent_sum, ent_n, mism_sum, mism_n = 0.0, 0.0, 0.0, 0.0
    for sl in micro_slices(len(batch), g.micro_batch_size):
        mb = batch.rows(sl).to(model.device)
        logits = model(input_ids=mb.ids, attention_mask=mb.attention).logits[:, :-1]
        st = token_stats(logits, mb.ids[:, 1:], ctrl_ids)
        lp_now = st.logprob.detach()
        sampled = is_policy[sl].to(model.device).view(-1, 1) & ~torch.isnan(mb.sampler_logprob)
        # behaviour log-probs: the sampler's for on-policy tokens; hinted rows were sampled under
        # another prompt, so their ratio starts at 1 on the un-hinted context
        old = torch.where(sampled, mb.sampler_logprob, lp_now)
        ref_lp = None
        if ref is not None and g.beta > 0:
            with torch.no_grad():
                ref_logits = ref(input_ids=mb.ids, attention_mask=mb.attention).logits[:, :-1]
                ref_lp = token_stats(ref_logits, mb.ids[:, 1:], with_entropy=False).logprob
        mask = mb.loss_mask
        # the micro-batch's share of the step: its tokens (token-mean) or its rows (seq-mean), so the
        # mean is over the whole step, not per micro-batch
        frac = float(mask.sum()) / n_tokens if g.loss_agg == "token-mean" else len(mb) / len(batch)
        ls = grpo_loss(st.logprob, old, adv[sl].to(model.device), mask, epsilon=g.epsilon,
                       epsilon_high=g.epsilon_high, ref_logprob=ref_lp, beta=g.beta,
                       off_policy=is_gold[sl].to(model.device), gamma=cfg.supervision.off_policy_gamma,
                       agg=g.loss_agg)
        (ls.loss * frac).backward()
        sums["loss"] += ls.pg_loss * frac
        sums["kl"] += ls.kl * frac
        sums["clip_ratio"] += ls.clip_ratio * frac
        gen = mask * sampled.float()
        ent_sum += float((st.entropy * gen).sum())
        ent_n += float(gen.sum())
        diff = (lp_now - mb.sampler_logprob).abs().nan_to_num(0.0)
        mism_sum += float((diff * gen).sum())
        mism_n += float(gen.sum())
        if collector is not None:
            collector.add(mb.to("cpu"), sl.start, st)
        if attr is not None:
            attr.add(mb.to("cpu"), st, adv[sl])
    out: dict[str, Any] = {
        "loss": sums["loss"], "kl": sums["kl"], "clip_ratio": sums["clip_ratio"],
        "entropy": ent_sum / max(ent_n, 1.0),
        "mismatch/abs_logprob_diff": mism_sum / max(mism_n, 1.0),
        "advantage/abs_mean": float(adv.abs().mean()),
    }
    if attr is not None:
        out.update(attr.metrics())
    out["_tokens"] = collector.columns() if collector is not None else None
    return out


@torch.no_grad()
def evaluate(model: Any, tokenizer: Any, sets: dict[str, list[Task]], cfg: TrainConfig) -> dict[str, float]:
    """Greedy rollouts on the held-out splits: accuracy and collapsed-turn rate per split."""
    out = {}
    s = Sampling(max_new_tokens=cfg.rollout.max_new_tokens, greedy=True)
    for split, tasks in sets.items():
        trajs = rollout_episodes(model, tokenizer, [(t, i, "policy") for i, t in enumerate(tasks)],
                                 max_turns=cfg.rollout.max_turns, sampling=s, on_malformed=cfg.rollout.on_malformed)
        m = rollout_metrics(trajs, 1)
        out[f"eval/{split}/accuracy"] = m["accuracy"]
        out[f"eval/{split}/turn_state/collapsed"] = m["turn_state/collapsed"]
        out[f"eval/{split}/turn_state/healthy_call"] = m["turn_state/healthy_call"]
    return out


# ------------------------------------------------------------------------------ checkpoints


def save_checkpoint(writer: RunWriter, step: int, model: Any, tokenizer: Any, opt: torch.optim.Optimizer,
                    state: TrainState, keep: int) -> Path:
    with writer.checkpoint(step) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        atomic_write_json(tmp / "trainer_state.json", {"step": step, "failed": state.failed,
                                                       "nonfinite_streak": state.nonfinite_streak}, fsync=False)
    ckpts = RunReader(writer.run_dir).checkpoints()
    for _, path in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    return writer.checkpoint_dir(step)


class GracefulStop:
    """SIGINT/SIGTERM finish the current step, checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------------ the loop


@dataclass
class Session:
    """Everything a training step needs, built once by `setup`."""

    cfg: TrainConfig
    model: Any
    tokenizer: Any
    ref: Any  # frozen reference for the KL term, or None
    registry: ControlTokenRegistry
    engine: Any  # the vLLM engine, or None (HF generate on `model`)
    sampling: Sampling
    pool: list[Task]
    eval_sets: dict[str, list[Task]]
    probe_set: Any
    writer: RunWriter
    opt: torch.optim.Optimizer
    state: TrainState
    ood_pool: list[Task] = field(default_factory=list)  # warm-start OOD examples (sft.ood_rate)

    @property
    def total(self) -> int:
        return self.cfg.sft.steps + self.cfg.grpo.steps


def setup(cfg: TrainConfig, out_dir: Path, *, resume: bool, console: Console, init_from: str | None) -> Session:
    """Model, tokenizer, control tokens, tasks, run directory and optimizer; on ``resume``, the
    latest checkpoint's weights, optimizer and trainer state."""
    device, dtype = pick_device_dtype(cfg)
    torch.manual_seed(cfg.seed)
    # ---- model, tokenizer, control tokens
    ckpt = None
    if resume:
        ckpts = resumable_checkpoints(out_dir, console)
        if not ckpts:
            raise TrainingError(f"{out_dir}: nothing to resume (no checkpoint)")
        ckpt, model, tokenizer = load_latest_usable(ckpts, dtype=dtype, device=device, console=console)
    model_path = str(ckpt) if ckpt else (init_from or cfg.model.path)
    if ckpt is None:
        model, tokenizer = load_model_and_tokenizer(model_path, dtype=dtype, device=device)
    sampling = Sampling(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                        top_p=cfg.rollout.top_p)
    engine = None  # rollouts by HF generate on `model`, unless vLLM is asked for
    if cfg.rollout.backend == "vllm":  # checked before the run directory is created
        from train_minimal.vllm_rollout import VLLMEngine, VLLMUnavailable

        try:
            engine = VLLMEngine(str(resolve_model_path(model_path)), tokenizer, seed=cfg.seed,
                                gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
                                max_context=sampling.max_context)
        except VLLMUnavailable as e:
            raise TrainingError(str(e)) from None
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    registry = ControlTokenRegistry.from_tokenizer(tokenizer)
    ref = None
    if cfg.grpo.beta > 0:
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    # ---- tasks: training pool, held-out eval sets, the fixed probe set
    if cfg.data.task_file:
        pool, errors = load_task_file(cfg.data.task_file)
        # a task longer than the context cannot be trained on whole
        pool, over = fit_context(pool, tokenizer, sampling.max_context, "max_context", cfg.data.task_file)
        errors += over
        for e in errors[:10]:
            console.print(f"[yellow]skipped[/] {e}")
        if not pool:
            raise TrainingError(f"{cfg.data.task_file}: no usable task")
    else:
        pool = make_tasks("train", cfg.data.train_tasks, seed=cfg.data.seed)
    eval_sets = {s: make_tasks(s, cfg.data.eval_tasks, seed=cfg.data.seed + 1000) for s in EVAL_SPLITS}
    ood_pool = []
    if cfg.sft.ood_rate > 0:  # other instances than the eval sets' and the probe's (`diagnose probe
        # --split S`, seed 0): another seed, and any request they share dropped
        held_out = {t.user for ts in eval_sets.values() for t in ts}
        held_out |= {t.user for split in ("content_ood", "format_ood") for t in make_tasks(split, 200, seed=0)}
        n = max(cfg.data.train_tasks // 4, 1)
        ood_pool = [t for split in ("content_ood", "format_ood")
                    for t in make_tasks(split, n, seed=cfg.data.seed + 7000) if t.user not in held_out]
    probe_set = build_probe_set(tokenizer, make_tasks("test", cfg.log.probe_tasks, seed=cfg.data.seed + 2000))
    # ---- run directory
    writer = RunWriter(
        out_dir, config=cfg.to_dict(),
        model={"path": str(resolve_model_path(cfg.model.path)), "init_from": init_from,
               "n_params": sum(p.numel() for p in model.parameters()), "dtype": str(dtype), "device": device,
               "architecture": type(model).__name__},
        tokenizer={"name_or_path": tokenizer.name_or_path, "vocab_size": len(tokenizer)},
        control_tokens=registry.to_json(), seeds={"seed": cfg.seed, "data_seed": cfg.data.seed}, resume=resume)
    # ---- optimizer (one AdamW; the lr follows the phase)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft.lr, weight_decay=cfg.grpo.weight_decay)
    state = TrainState()
    if ckpt is not None:
        try:
            opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
            raw = json.loads(read_text(ckpt / "trainer_state.json"))
            state = TrainState(step=int(raw["step"]), failed=dict(raw.get("failed", {})),
                               nonfinite_streak=int(raw.get("nonfinite_streak", 0)))
            writer.truncate_after(state.step)  # steps logged after the checkpoint are re-run: logged once
        except BaseException:
            writer.close()
            raise
    return Session(cfg, model, tokenizer, ref, registry, engine, sampling, pool, eval_sets, probe_set, writer,
                   opt, state, ood_pool)


def warm_start_batch(s: Session, step: int) -> tuple[list[Task], list[bool], list[int | None] | None]:
    """The warm start's examples for ``step``: random training tasks (a share ``sft.ood_rate`` of
    them from the OOD pool), whether each keeps its system prompt, and where each is cut
    (``sft.truncated_call_rate``; None: not cut)."""
    c = s.cfg.sft
    rng = random.Random(seed_for(s.cfg.seed, step, "warm"))
    tasks = rng.sample(s.pool, min(len(s.pool), c.batch_size))
    keep = [rng.random() < c.system_prompt_rate for _ in tasks]
    if c.ood_rate == 0 and c.truncated_call_rate == 0:  # the v1 recipe: same random stream as before
        return tasks, keep, None
    mix = random.Random(seed_for(s.cfg.seed, step, "warm-mix"))
    for i in range(len(tasks)):
        if s.ood_pool and mix.random() < c.ood_rate:
            tasks[i] = mix.choice(s.ood_pool)
            keep[i] = keep[i] or tasks[i].split == "format_ood"
    cut = [mix.randrange(8) if mix.random() < c.truncated_call_rate else None for _ in tasks]
    return tasks, keep, cut


def rl_step(s: Session, step: int, m: dict[str, Any]) -> None:
    """Rollouts, the GRPO loss (plus the synchronous SFT loss) backwarded; rollouts and token
    traces written. Fills ``m``."""
    cfg, state, t0 = s.cfg, s.state, time.perf_counter()
    rng = random.Random(seed_for(cfg.seed, step, "prompts"))
    tasks = rng.sample(s.pool, min(len(s.pool), cfg.rollout.prompts_per_step))
    torch.manual_seed(seed_for(cfg.seed, step, "sample"))
    s.model.eval()
    if s.engine is not None:
        s.engine.sync_weights(s.model)
    trajs = rollout_episodes(s.model, s.tokenizer, group_items(tasks, cfg), max_turns=cfg.rollout.max_turns,
                             sampling=s.sampling, generate=s.engine.generate if s.engine else None,
                             on_malformed=cfg.rollout.on_malformed)
    s.model.train()
    t_roll = time.perf_counter()
    for t in trajs:
        if t.kind == "policy" and t.reward < 1:
            state.failed[t.task.id] = step
    m.update(rollout_metrics(trajs, cfg.rollout.group_size))
    res = grpo_pass(s.model, s.ref, s.tokenizer, trajs, cfg, s.registry, step, cfg.log.traces, cfg.log.attribution)
    tokens = res.pop("_tokens")
    m.update(res)
    if cfg.supervision.sft_schedule == "synchronous" and cfg.supervision.sft_weight > 0:
        sup = supervision_tasks(cfg, state, s.pool, step)
        m["sft_examples"] = len(sup)
        if sup:
            m["sft_loss"] = sft_pass(s.model, s.tokenizer, sup, cfg.grpo.micro_batch_size, cfg.supervision.sft_weight)
    s.writer.write_rollouts(step, rollout_rows(trajs, step))
    if tokens is not None:
        s.writer.write_tokens(step, tokens)
    m["time/rollout"] = t_roll - t0


def train_step(s: Session, step: int) -> dict[str, Any]:
    """Global step ``step`` (1-based): its phase's loss, the optimizer step, the probe and the
    evaluation when due; the metrics are logged and returned."""
    cfg, model, t0 = s.cfg, s.model, time.perf_counter()
    phase = phase_of(step, cfg)
    m: dict[str, Any] = {"phase": phase}
    if phase == "sft":  # warm start: gold trajectories of random training tasks
        lr = lr_at(step, cfg.sft.lr, cfg.sft.warmup_steps)
        tasks, keep, cut = warm_start_batch(s, step)
        m["sft_loss"] = sft_pass(model, s.tokenizer, tasks, cfg.grpo.micro_batch_size, 1.0,
                                 keep_system=keep, context_weight=cfg.sft.context_loss_weight, truncate=cut)
    elif phase == "sft_supervision":  # interleaved SFT phase
        lr = lr_at(step - cfg.sft.steps, cfg.grpo.lr, cfg.grpo.warmup_steps, cfg.grpo.steps, cfg.grpo.lr_schedule)
        tasks = supervision_tasks(cfg, s.state, s.pool, step)
        m["sft_loss"] = sft_pass(model, s.tokenizer, tasks, cfg.grpo.micro_batch_size, 1.0) if tasks else 0.0
        m["sft_examples"] = len(tasks)
    else:  # GRPO
        lr = lr_at(step - cfg.sft.steps, cfg.grpo.lr, cfg.grpo.warmup_steps, cfg.grpo.steps, cfg.grpo.lr_schedule)
        rl_step(s, step, m)
    for group in s.opt.param_groups:
        group["lr"] = lr
    norm, ok = clip_and_step(model, s.opt, cfg.grpo.max_grad_norm)
    m.update({"lr": lr, "grad_norm": norm, "skipped_update": not ok})
    s.state.nonfinite_streak = 0 if ok else s.state.nonfinite_streak + 1
    if cfg.log.probe_every and (step % cfg.log.probe_every == 0 or step == 1):
        frame = run_probe(model, s.probe_set, s.registry, step)
        s.writer.write_probe(step, frame)
        m.update(probe_summary(frame, s.registry.names))
    if cfg.log.eval_every and (step % cfg.log.eval_every == 0 or step == s.total):
        model.eval()
        m.update(evaluate(model, s.tokenizer, s.eval_sets, cfg))
        model.train()
    m["time/step"] = time.perf_counter() - t0
    s.writer.log_metrics(step, m)
    s.state.step = step
    return m


def train(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False, console: Console | None = None,
          init_from: str | None = None, stop_after: int | None = None) -> Path:
    """Train per ``cfg`` into run directory ``out_dir``; returns it.

    ``resume`` continues from the latest checkpoint in ``out_dir`` with the same results as an
    uninterrupted run (rollouts and batches are seeded by step, not by a running RNG).
    ``stop_after`` stops (with a checkpoint) after that global step, as an interruption would.
    """
    console = console or Console()
    out_dir = Path(out_dir)
    s = setup(cfg, out_dir, resume=resume, console=console, init_from=init_from)
    state = s.state
    s.model.train()
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    # a bar on a terminal; elsewhere (a pipe, a CI log, where a bar only shows at the end) one line per step
    lines, t0 = not console.is_terminal, time.perf_counter()
    try:
        with GracefulStop() as stop, Progress(*columns, console=console, transient=False, disable=lines) as progress:
            bar = progress.add_task(cfg.name, total=s.total, completed=state.step, info="")
            while state.step < s.total and not stop.requested:
                step = state.step + 1
                m = train_step(s, step)
                info = f"{m['phase']} " + (f"reward {m['reward']:.2f} collapsed {m['turn_state/collapsed']:.0%}"
                                           if "reward" in m else f"sft_loss {m.get('sft_loss', 0):.3f}")
                progress.update(bar, completed=step, info=info)
                if lines:
                    elapsed = int(time.perf_counter() - t0)
                    console.print(f"{cfg.name} step {step}/{s.total} {info} ({elapsed // 60}:{elapsed % 60:02d})",
                                  highlight=False, markup=False)
                if state.nonfinite_streak >= 3:
                    save_checkpoint(s.writer, step, s.model, s.tokenizer, s.opt, state, cfg.log.keep_checkpoints)
                    raise TrainingError(f"step {step}: non-finite gradients 3 steps in a row; stopped "
                                        f"(checkpoint saved; lower the learning rate?)")
                if stop_after is not None and step >= stop_after:
                    stop.requested = True
                if step % cfg.log.checkpoint_every == 0 or step == s.total or stop.requested:
                    save_checkpoint(s.writer, step, s.model, s.tokenizer, s.opt, state, cfg.log.keep_checkpoints)
        if stop.requested:
            console.print(f"[yellow]interrupted[/]: stopped cleanly after step {state.step}; "
                          f"resume with --resume")
    finally:
        s.writer.close()
    return out_dir
