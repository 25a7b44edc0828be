"""Probe one model on one task set: every measure, as rows of ``RESULT_SCHEMA``.

Generation measures are greedy rollouts where all tasks advance together turn by turn: each
turn of every live episode is one batched HF ``generate`` call (``diagnose.model.generation``), the
environment's step-wise ``Rollout`` executes the calls, and the episode's context keeps the
generated token ids (no re-tokenisation of generated text), as in ``train_minimal/rollout.py``.
vLLM is not used: HF generate on the probed checkpoint is enough for held-out sets of a few
hundred tasks, and avoids a second inference stack whose numerics differ.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diagnose.capability.config import ProbeConfig
from diagnose.capability.interventions import Repairs
from diagnose.capability.likelihood import build_steps, score_steps
from diagnose.capability.tasksets import resyntax
from diagnose.chat import IM_END
from diagnose.control_tokens import ControlTokenRegistry
from diagnose.error_line import error_line
from diagnose.model.files import ModelFileError, check_model_files
from diagnose.model.generation import Sampling, generate_batch, stop_token_ids
from diagnose.model.sequences import encode, observation_text, prompt_text
from diagnose.tasks import Rollout, Task
from diagnose.toolcall import CallSyntax
from diagnose.turns import TurnState

#: Roles the probe needs from a tokenizer: turn delimiters, stop tokens and the call tags.
PROBE_ROLES: tuple[str, ...] = ("turn_start", "turn_end", "eos", "call_open", "call_close")

#: progress(measure, episodes_done_increment)
Progress = Callable[[str, int], None]


class ProbeInputError(ValueError):
    """The model or tokenizer cannot be probed (e.g. no ChatML / Hermes control tokens)."""


@dataclass
class EpisodeRecord:
    task_id: str
    reward: float
    calls_right: float
    turn_states: list[str]
    fired: bool = False
    truncated: bool = False
    turn_tokens: list[list[int]] = field(default_factory=list)  # generated ids per turn


@dataclass
class ModelProbe:
    """Result rows of one model plus details kept for ``meta.json``."""

    rows: list[dict[str, Any]]
    likelihood_chance: float | None = None
    likelihood_by_kind: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    episodes: dict[str, list[EpisodeRecord]] = field(default_factory=dict)


def _has_tokenizer(path: Path) -> bool:
    """Whether ``path`` holds tokenizer files (broken ones too: they are named, not replaced)."""
    return os.path.lexists(path / "tokenizer.json") or os.path.lexists(path / "tokenizer_config.json")


def load_checkpoint(path: str | os.PathLike[str], *, tokenizer_path: str | os.PathLike[str] | None = None,
                    device: str = "cpu", base: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a HF model directory or a PEFT adapter folder (merged into its
    base: ``base``, else the one its ``adapter_config.json`` names; `diagnose.model.lora`),
    safetensors weights only (nothing is ever unpickled). The tokenizer comes from the directory,
    or from ``tokenizer_path`` (else an adapter's base) when the directory has none (checkpoints
    saved without one). Raises ProbeInputError with a message naming the file for anything that
    is not loadable."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diagnose.model.resolve import quiet_loading

    from diagnose.model.lora import AdapterError, adapter_base, adapter_problem, is_adapter_dir, load_adapter_model

    p = Path(path)
    if not p.is_dir():
        raise ProbeInputError(f"{p}: not a directory")
    adapter = is_adapter_dir(p)
    base_dir = None
    if adapter:
        why = adapter_problem(p)
        if why:
            raise ProbeInputError(f"{p}: {why}")
        try:
            base_dir = adapter_base(p, base)
        except AdapterError as e:
            raise ProbeInputError(str(e)) from None
        weights = [p / "adapter_model.safetensors"]
    else:
        if not os.path.lexists(p / "config.json"):
            raise ProbeInputError(f"{p / 'config.json'}: missing (not a Hugging Face model directory)")
        weights = sorted(p.glob("*.safetensors"))
        if not weights:
            raise ProbeInputError(f"{p}: no *.safetensors weights (the probe never unpickles .bin / .pt files)")
    fallback = tokenizer_path if tokenizer_path is not None else base_dir
    tok_dir = p if _has_tokenizer(p) or fallback is None else Path(fallback)
    try:  # each file transformers reads, named when broken (its own errors do not say which)
        if not adapter:
            check_model_files(p, tokenizer=tok_dir == p)
        if tok_dir != p or adapter:
            check_model_files(tok_dir, model=False)
    except ModelFileError as e:
        raise ProbeInputError(str(e)) from None
    with quiet_loading():
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure is reported with the file
            raise ProbeInputError(f"{tok_dir}: tokenizer does not load ({error_line(e)})") from None
        try:
            check_tokenizer(tokenizer)
        except ProbeInputError as e:
            tok_file = tok_dir / "tokenizer.json" if (tok_dir / "tokenizer.json").is_file() else tok_dir
            raise ProbeInputError(f"{tok_file}: {e}") from None
        kw: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
        if device != "cpu":
            kw["dtype"] = "auto"
        try:
            if adapter:
                model = load_adapter_model(p, base=base_dir, dtype=kw.get("dtype"))
            else:
                model = AutoModelForCausalLM.from_pretrained(p, **kw)
            model.to(device)
        except Exception as e:  # noqa: BLE001
            where = weights[0] if len(weights) == 1 else p
            raise ProbeInputError(f"{where}: model does not load ({error_line(e)})") from None
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:  # a diverged checkpoint: any score of it would be noise, not a finding
        where = weights[0] if len(weights) == 1 else p
        raise ProbeInputError(f"{where}: non-finite weights (NaN/inf) in {len(bad)} tensor(s), e.g. {bad[0]}; "
                              "not probed")
    model.eval()
    return model, tokenizer


def check_tokenizer(tokenizer: Any) -> ControlTokenRegistry:
    """The tokenizer's control-token registry; raises ProbeInputError naming the missing roles."""
    registry = ControlTokenRegistry.from_tokenizer(tokenizer)
    missing = [r for r in PROBE_ROLES if r not in registry.roles]
    if missing:
        raise ProbeInputError(
            "tokenizer lacks the ChatML / Hermes control tokens the probe needs "
            f"(missing roles: {', '.join(missing)}; each must be a single token)")
    return registry


def auto_max_new_tokens(tokenizer: Any, tasks: list[Task], syntaxes: tuple[CallSyntax, ...] = tuple(CallSyntax)) -> int:
    """Token limit per turn from the task set: the longest gold assistant turn (in any probed
    syntax) plus slack, so that a correct turn always fits while a babbling one stops early."""
    from diagnose.tasks import gold_assistant_texts

    longest = 0
    for task in tasks:
        for syntax in syntaxes:
            for text in gold_assistant_texts(resyntax(task, syntax)):
                longest = max(longest, len(encode(tokenizer, text)) + 1)
    return min(512, max(32, int(1.25 * longest) + 16))


def rollout_greedy(model: Any, tokenizer: Any, tasks: list[Task], cfg: ProbeConfig,
                   processor: Callable[[], Any] | None = None, progress: Progress | None = None,
                   measure: str = "") -> list[EpisodeRecord]:
    """Greedy episodes of every task, batched turn by turn. ``processor`` makes a fresh logits
    processor (with a ``fired_list()``) for each generate call."""
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    sampling = Sampling(max_new_tokens=cfg.max_new_tokens, greedy=True, max_context=cfg.max_context)
    records: list[EpisodeRecord | None] = [None] * len(tasks)
    fired = [False] * len(tasks)
    truncated = [False] * len(tasks)
    turn_tokens: list[list[list[int]]] = [[] for _ in tasks]
    live: list[tuple[int, Rollout, list[int]]] = []
    for i, task in enumerate(tasks):
        live.append((i, Rollout(task, max_turns=cfg.max_turns), encode(tokenizer, prompt_text(task.messages))))

    def finish(i: int, r: Rollout) -> None:
        ep = r.episode()
        records[i] = EpisodeRecord(ep.task_id, ep.score.reward, ep.score.calls_right,
                                   [str(s) for s in ep.turn_states], fired[i], truncated[i], turn_tokens[i])
        if progress is not None:
            progress(measure, 1)

    # episodes whose prompt alone leaves no room for a turn end at once, unfinished
    still = []
    for i, r, ctx in live:
        if len(ctx) + cfg.max_new_tokens > cfg.max_context:
            truncated[i] = True
            finish(i, r)
        else:
            still.append((i, r, ctx))
    live = still
    while live:
        nxt: list[tuple[int, Rollout, list[int]]] = []
        for at in range(0, len(live), cfg.batch_size):
            chunk = live[at: at + cfg.batch_size]
            proc = processor() if processor is not None else None
            outs = generate_batch(model, tokenizer, [c for _, _, c in chunk], sampling, logits_processor=proc)
            flags = proc.fired_list() if proc is not None else [False] * len(chunk)
            for (i, r, ctx), (gen, _lp, stopped), f in zip(chunk, outs, flags):
                fired[i] = fired[i] or f
                turn_tokens[i].append(list(gen))
                text = tokenizer.decode(gen[:-1] if stopped else gen, skip_special_tokens=False)
                ctx.extend(gen)
                if not stopped:  # close the turn ourselves
                    truncated[i] = True
                    ctx.append(im_end)
                tool_msgs = r.step(text)
                if not r.done:
                    obs = encode(tokenizer, observation_text(r.messages[: len(r.messages) - len(tool_msgs)], tool_msgs))
                    if len(ctx) + len(obs) + cfg.max_new_tokens <= cfg.max_context:
                        ctx.extend(obs)
                        nxt.append((i, r, ctx))
                        continue
                    truncated[i] = True  # out of context: the episode ends here, unfinished
                finish(i, r)
        live = nxt
    return [r for r in records if r is not None]


def repaired_rollouts(model: Any, tokenizer: Any, tasks: list[Task], cfg: ProbeConfig, native: list[EpisodeRecord],
                      factory: Callable[[], Any], progress: Progress | None = None,
                      measure: str = "") -> list[EpisodeRecord]:
    """Greedy episodes with a repair. An episode in which the repair would not change a single
    greedy choice of the native episode *is* the native episode, so only the others are rolled
    out again (on a healthy checkpoint the repairs cost next to nothing)."""
    check = factory()
    redo = [i for i, rec in enumerate(native) if check.would_fire(rec.turn_tokens)]
    again = rollout_greedy(model, tokenizer, [tasks[i] for i in redo], cfg, factory, progress, measure)
    out = [EpisodeRecord(r.task_id, r.reward, r.calls_right, list(r.turn_states), False, r.truncated, r.turn_tokens)
           for r in native]
    for i, rec in zip(redo, again):
        rec.fired = True  # by construction: it changes a greedy choice of the native episode
        out[i] = rec
    if progress is not None:
        progress(measure, len(tasks) - len(redo))
    return out


def result_row(measure: str, records: list[EpisodeRecord], *, with_fired: bool) -> dict[str, Any]:
    """One ``RESULT_SCHEMA`` row (without checkpoint / step) from a measure's episodes."""
    n = len(records)
    turns = [s for r in records for s in r.turn_states]
    row: dict[str, Any] = {
        "measure": measure,
        "accuracy": sum(r.reward for r in records) / n if n else None,
        "n": n,
        "fired_rate": (sum(r.fired for r in records) / n if n else None) if with_fired else None,
    }
    for state in TurnState:
        row[str(state)] = (sum(s == str(state) for s in turns) / len(turns)) if turns else None
    return row


def probe_model(model: Any, tokenizer: Any, tasks: list[Task], cfg: ProbeConfig,
                progress: Progress | None = None) -> ModelProbe:
    """Every measure of ``cfg.measures`` on ``tasks``. Raises ProbeInputError for a tokenizer
    without the control tokens."""
    registry = check_tokenizer(tokenizer)
    stop_ids = stop_token_ids(tokenizer)
    repairs = Repairs(tokenizer, registry, stop_ids)
    out = ModelProbe(rows=[])
    was_training = model.training
    model.eval()
    native: list[EpisodeRecord] | None = None
    # native first: the repairs reuse its episodes where they would not fire
    order = sorted(cfg.measures, key=lambda m: m != "native")
    try:
        for measure in order:
            if measure == "likelihood":
                res = score_steps(model, tokenizer, tasks, build_steps(tasks, cfg), cfg)
                out.rows.append({"measure": "likelihood", "accuracy": res.accuracy, "n": res.n_steps})
                out.likelihood_chance, out.likelihood_by_kind = res.chance, res.by_kind
                if progress is not None:
                    progress(measure, len(tasks))
                continue
            task_set, factory = tasks, None
            if measure == "repair_forbid":
                factory = repairs.forbid
            elif measure == "repair_prefill":
                factory = repairs.prefill
            elif measure == "alt_pythonic":
                task_set = [resyntax(t, CallSyntax.PYTHONIC) for t in tasks]
            elif measure == "alt_json":
                task_set = [resyntax(t, CallSyntax.JSON) for t in tasks]
            if factory is not None and factory() is None:
                out.notes.append(f"{measure}: not available for this tokenizer (no single-token call prefix)")
                out.rows.append({"measure": measure, "accuracy": None, "n": 0})
                if progress is not None:
                    progress(measure, len(tasks))
                continue
            if factory is not None:
                if native is None:
                    native = rollout_greedy(model, tokenizer, tasks, cfg)
                records = repaired_rollouts(model, tokenizer, tasks, cfg, native, factory, progress, measure)
            else:
                records = rollout_greedy(model, tokenizer, task_set, cfg, None, progress, measure)
                if measure == "native":
                    native = records
            out.episodes[measure] = records
            out.rows.append(result_row(measure, records, with_fired=factory is not None))
    finally:
        model.train(was_training)
    out.rows.sort(key=lambda r: cfg.measures.index(r["measure"]))
    return out
