"""Synthetic runs in our run-directory format v1, with a known collapse (or none).

:func:`write_synthetic_run` writes ``metrics.jsonl``, ``rollouts/``, ``tokens/`` (with an
``lp_ctrl_<name>`` column per control token of a Qwen2.5-like registry) and ``probe/`` through
:class:`diagnose.rundir.RunWriter`, and returns the ground truth (:class:`SyntheticTruth`).

What a collapse looks like (modelled on real GRPO collapses of Qwen2.5 tool-calling agents):

* ``lead`` (3) steps before the onset, the probability of the spike token at its key context
  (by default p(``<|im_end|>``) right after ``<|im_start|>assistant\\n<tool_call>\\n``, where
  ``{"`` belongs) starts rising from ~1e-3: 5e-3, 2.5e-2, 0.1, then 0.6 at the onset and 0.9
  after it. Over the same steps the GRPO groups polarise (``group_reward_std`` falls while the
  mean reward holds), entropy falls, KL and the spike token's logit attribution grow.
* At the onset step the reward drops abruptly: 75% of the rollouts, then 93%, end in a collapsed
  turn, i.e. the context prefix followed by the spike token (``<tool_call>\\n<|im_end|>``, a bare
  ``<tool_call>`` turn). Reward falls from ~0.64 to < 30% of its peak.
* ``recover_at``: the spike probability and the collapsed share go back down within two steps.

Turn states and format errors are never hard-coded: every distinct turn text is classified by
:func:`diagnose.turns.classify_turn`. Each step is generated with numpy (no per-token Python) and
written before the next one, so memory stays bounded by one step; a 50M-token-row run takes
about half a minute. The kinds of rollout a step mixes are in :mod:`diagnose.synth.native_kinds`,
the latent state and the log-probs drawn from it in :mod:`diagnose.synth.native_signals`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diagnose.chat import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_RESPONSE_CLOSE,
    TOOL_RESPONSE_OPEN,
)
from diagnose.control_tokens import KEY_CONTEXT_ROLES, KEY_CONTEXTS
from diagnose.model.ctrl_probe import probe_summary
from diagnose.rundir import RunWriter
from diagnose.synth.native_kinds import (
    CONTEXT_PREFIX,
    CTX_CODE,
    build_templates,
    kind_table,
    rollout_metrics,
    rollouts_frame,
    sample_kinds,
)
from diagnose.synth.native_signals import (
    LEAD_STEPS,
    latent,
    optimiser_metrics,
    probe_fixed,
    probe_frame,
    token_columns,
)
from diagnose.turns import TurnState

__all__ = ["QWEN_LIKE_CONTROL_TOKENS", "SyntheticTruth", "write_synthetic_run"]

#: A Qwen2.5-like registry (real Qwen2.5 ids; ``<tool_response>`` ids as in Qwen3, where they are
#: single tokens), in :class:`diagnose.control_tokens.ControlTokenRegistry` order.
QWEN_LIKE_CONTROL_TOKENS: tuple[dict[str, Any], ...] = (
    {"name": "im_start", "text": IM_START, "token_id": 151644, "role": "turn_start"},
    {"name": "im_end", "text": IM_END, "token_id": 151645, "role": "turn_end"},
    {"name": "endoftext", "text": ENDOFTEXT, "token_id": 151643, "role": "eos"},
    {"name": "tool_call_open", "text": TOOL_CALL_OPEN, "token_id": 151657, "role": "call_open"},
    {"name": "tool_call_close", "text": TOOL_CALL_CLOSE, "token_id": 151658, "role": "call_close"},
    {"name": "tool_response_open", "text": TOOL_RESPONSE_OPEN, "token_id": 151665, "role": "response_open"},
    {"name": "tool_response_close", "text": TOOL_RESPONSE_CLOSE, "token_id": 151666, "role": "response_close"},
    {"name": "call_open_newline", "text": "\n", "token_id": 198, "role": "call_newline"},
    {"name": "call_body_start", "text": '{"', "token_id": 5212, "role": "call_body_start"},
)

GROUP_SIZE = 8


@dataclass(frozen=True)
class SyntheticTruth:
    """Ground truth of a synthetic run."""

    path: Path
    steps: int  # steps 0 .. steps-1 were written
    onset_step: int | None  # first step of the reward drop; None: stable run
    recovery_step: int | None  # first step back to a healthy reward level
    implicated_token: str | None  # the spike token (None for a stable run)
    context: str | None  # its key context (diagnose.control_tokens.KEY_CONTEXTS)
    lead_steps: int  # how many steps before the onset the spike probability starts rising
    collapsed_turn_state: str | None  # classify_turn's state of the collapsed turn text
    control_tokens: tuple[dict[str, Any], ...]
    n_token_rows: int
    n_rollouts: int
    seconds: float

    @property
    def spike_rise_step(self) -> int | None:
        return None if self.onset_step is None else self.onset_step - self.lead_steps


# ---------------------------------------------------------------------------------------------
# the writer
# ---------------------------------------------------------------------------------------------


def write_synthetic_run(
    out_dir: str | Path,
    *,
    steps: int = 60,
    collapse_at: int | None = 30,
    recover_at: int | None = None,
    seed: int = 0,
    samples_per_step: int = 32,
    tokens_per_sample: int = 64,
    noise: float = 1.0,
    spike_token: str = "im_end",
    spike_context: str = "after_call_open",
    tokens: bool = True,
    probe: bool = True,
    rollouts: bool = True,
    probe_every: int = 1,
    n_probes: int = 8,
    nan_logprobs_at: Sequence[int] = (),
    group_size: int = GROUP_SIZE,
    compression_level: int | None = 1,
    fsync: bool = False,
) -> SyntheticTruth:
    """Write a synthetic run to ``out_dir`` (must not hold a run) and return its ground truth.

    Steps are ``0 .. steps-1``. ``collapse_at=None`` gives a stable run (ordinary noise only).
    ``tokens_per_sample`` is the token count of a healthy rollout (collapsed ones are shorter),
    so a healthy step has about ``samples_per_step * tokens_per_sample`` token rows.
    ``noise`` scales the step-to-step jitter of every signal (sampling noise of the rollouts
    comes on top). ``spike_token`` is a registry name, ``spike_context`` a key context
    (``diagnose.control_tokens.KEY_CONTEXTS``). ``nan_logprobs_at``: steps where 1% of the
    generated tokens get a NaN ``logprob``.
    """
    t_start = time.perf_counter()
    names = [t["name"] for t in QWEN_LIKE_CONTROL_TOKENS]
    if spike_token not in names:
        raise ValueError(f"spike_token {spike_token!r} is not a control token; expected one of {names}")
    if spike_context not in KEY_CONTEXTS:
        raise ValueError(f"spike_context {spike_context!r} is not a key context; expected one of {list(KEY_CONTEXTS)}")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if collapse_at is not None and not 0 <= collapse_at < steps:
        raise ValueError(f"collapse_at must be in [0, {steps}), got {collapse_at}")
    if recover_at is not None and (collapse_at is None or recover_at <= collapse_at):
        raise ValueError("recover_at needs a collapse_at before it")
    if samples_per_step < 1 or group_size < 1:
        raise ValueError("samples_per_step and group_size must be >= 1")
    if tokens_per_sample < 48:
        raise ValueError("tokens_per_sample must be >= 48 (room for two calls, their outputs and an answer)")
    rng = np.random.default_rng(seed)
    ids = {t["name"]: t["token_id"] for t in QWEN_LIKE_CONTROL_TOKENS}
    ctrl_ids = np.array([ids[n] for n in names], np.int64)
    K = len(names)
    spike_idx = names.index(spike_token)
    role_of = {t["role"]: t["name"] for t in QWEN_LIKE_CONTROL_TOKENS}
    expected_idx = {  # context code -> index of the healthy next token
        CTX_CODE[ctx]: names.index(role_of[r["expected"]]) for ctx, r in KEY_CONTEXT_ROLES.items()
    }
    collapsed_text = CONTEXT_PREFIX[spike_context] + next(
        t["text"] for t in QWEN_LIKE_CONTROL_TOKENS if t["name"] == spike_token)
    tpl = build_templates(ids, spike_token, spike_context, tokens_per_sample)
    table = kind_table(collapsed_text)
    lat = latent(steps, collapse_at, recover_at, noise, rng)
    nan_steps = {int(s) for s in nan_logprobs_at}
    states = [s.value for s in TurnState]

    config = {
        "synthetic": True, "steps": steps, "collapse_at": collapse_at, "recover_at": recover_at, "seed": seed,
        "samples_per_step": samples_per_step, "tokens_per_sample": tokens_per_sample, "noise": noise,
        "spike_token": spike_token, "spike_context": spike_context, "group_size": group_size,
        "probe_every": probe_every, "nan_logprobs_at": sorted(nan_steps),
    }
    writer = RunWriter(out_dir, config=config, model={"name": "synthetic", "architecture": "none"},
                       tokenizer={"name_or_path": "synthetic-qwen2.5-like", "vocab_size": 151936},
                       control_tokens=list(QWEN_LIKE_CONTROL_TOKENS), seeds={"seed": seed},
                       fsync=fsync, compression_level=compression_level)
    fixed = probe_fixed(tpl, K, n_probes, rng) if probe else None
    n_rows_total = n_rollouts_total = 0
    n = samples_per_step
    group_id = np.arange(n) // group_size
    # Generation (numpy) of step t+1 overlaps the Parquet writes of step t (polars releases the
    # GIL); one step in flight at a time keeps memory bounded.
    pool = ThreadPoolExecutor(max_workers=1)
    pending: Future | None = None
    try:
        for step in range(steps):
            out: dict[str, Any] = {}
            # ---- rollouts: kind of each sample
            kind, variant, reward, accuracy = sample_kinds(lat.q[step], lat.success[step], lat.polarise[step],
                                                           group_id, rng)
            lengths = tpl.length[kind]
            gen_tokens = (tpl.gen[kind] & (np.arange(tpl.tok.shape[1]) < lengths[:, None])).sum(1)
            metrics: dict[str, Any] = {"phase": "grpo", "skipped_update": False}
            metrics.update(rollout_metrics(kind, reward, accuracy, group_id, table, states, gen_tokens))
            if rollouts:
                out["rollouts"] = rollouts_frame(step, kind, variant, reward, accuracy, group_id, table)
            n_rollouts_total += n

            # ---- tokens
            ent_mean = lat.entropy[step]
            if tokens:
                cols, mm = token_columns(step, kind, lengths, tpl, ctrl_ids, spike_idx, CTX_CODE[spike_context],
                                         expected_idx, lat.p_spike[step], ent_mean, step in nan_steps, rng)
                out["tokens"] = cols
                n_rows_total += len(cols["sample_id"])
                metrics["entropy"] = mm["entropy"]
                metrics["mismatch/abs_logprob_diff"] = mm["mismatch"]
            else:
                metrics["entropy"] = float(ent_mean)
                metrics["mismatch/abs_logprob_diff"] = float(0.024 * (1 + 0.05 * rng.normal()))

            # ---- probe
            if fixed is not None and (step % max(probe_every, 1) == 0):
                pf = probe_frame(step, fixed, ctrl_ids, names, spike_idx, expected_idx, spike_context,
                                 lat.p_probe[step], noise, rng)
                out["probe"] = pf
                metrics.update(probe_summary(pf, names))

            metrics.update(optimiser_metrics(lat.stress[step], names, spike_idx,
                                             collapse_at is not None and step == collapse_at, noise, rng))
            if pending is not None:
                pending.result()
            pending = pool.submit(_write_step, writer, step, out, metrics)
        if pending is not None:
            pending.result()
    finally:
        pool.shutdown(wait=True)
        writer.close()

    recovery = None
    if recover_at is not None and collapse_at is not None:
        recovery = recover_at
    return SyntheticTruth(
        path=Path(out_dir), steps=steps, onset_step=collapse_at, recovery_step=recovery,
        implicated_token=spike_token if collapse_at is not None else None,
        context=spike_context if collapse_at is not None else None, lead_steps=LEAD_STEPS,
        collapsed_turn_state=table.collapsed_state if collapse_at is not None else None,
        control_tokens=QWEN_LIKE_CONTROL_TOKENS, n_token_rows=n_rows_total, n_rollouts=n_rollouts_total,
        seconds=time.perf_counter() - t_start,
    )


def _write_step(writer: RunWriter, step: int, tables: dict[str, Any], metrics: dict[str, Any]) -> None:
    if "rollouts" in tables:
        writer.write_rollouts(step, tables["rollouts"])
    if "tokens" in tables:
        writer.write_tokens(step, tables["tokens"])
    if "probe" in tables:
        writer.write_probe(step, tables["probe"])
    writer.log_metrics(step, metrics)
