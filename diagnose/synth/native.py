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
about half a minute.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

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
from diagnose.turns import TurnState, classify_turn

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

LEAD_STEPS = 3
GROUP_SIZE = 8
_P_BASE = 1e-3
_P_LEAD = {-3: 5e-3, -2: 2.5e-2, -1: 0.1, 0: 0.6}  # spike probability, by step relative to onset
_P_COLLAPSED = 0.9
_Q_LEAD = {-1: 0.03, 0: 0.75}  # share of rollouts ending in a collapsed turn
_Q_COLLAPSED = 0.93
_P_RECOVER = {0: 0.02}
_P_RECOVERED = 3e-3
_Q_RECOVER = {0: 0.03}
_Q_RECOVERED = 0.01
_POLARISE = {-3: 0.15, -2: 0.25, -1: 0.3}  # group success-probability spread during the lead
_ENTROPY = {-3: 0.8, -2: 0.7, -1: 0.6}
_SUCCESS_P = 0.6
_POLLUTED_P = 0.04

_CTX_NAMES = ("", "turn_start", "after_call_open", "after_call_body", "after_call_close")
_CTX_CODE = {name: i for i, name in enumerate(_CTX_NAMES)}
_TEXT = -1  # template placeholder: an ordinary text token (random id)

# kinds of rollouts
_H2_OK, _H2_BAD, _H1_OK, _H1_BAD, _POL, _C1, _C2 = range(7)
_N_KINDS = 7
_N_VARIANTS = 4
_REWARD = np.array([1.0, 0.1, 1.0, 0.1, 0.05, 0.0, 0.0])
_ACCURACY = np.array([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])

_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant with tools.<|im_end|>\n"
    "<|im_start|>user\nFind the answer with the tools.<|im_end|>\n<|im_start|>assistant\n"
)
_CALLS = (
    ('search', '{"query": "weather in Paris"}'),
    ('lookup', '{"id": 42}'),
    ('get_price', '{"item": "apple", "currency": "EUR"}'),
    ('search', '{"query": "population of Lyon"}'),
)
_ANSWERS_OK = ("The answer is 42.", "It is 18 degrees in Paris.", "The price is 3 EUR.", "About 520000 people.")
_ANSWERS_BAD = ("I could not find it.", "The answer is 7.", "Sorry, no result.", "It is 5 degrees.")
_CONTEXT_PREFIX = {
    "turn_start": "",
    "after_call_open": TOOL_CALL_OPEN + "\n",
    "after_call_body": TOOL_CALL_OPEN + '\n{"name": "search", "arguments": {"query": "x"}}\n',
    "after_call_close": TOOL_CALL_OPEN + '\n{"name": "search", "arguments": {"query": "x"}}\n' + TOOL_CALL_CLOSE,
}


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
# templates: one token layout per kind of rollout
# ---------------------------------------------------------------------------------------------


@dataclass
class _Templates:
    tok: np.ndarray  # [kinds, maxlen] int64 (-1: text)
    gen: np.ndarray  # [kinds, maxlen] bool
    turn: np.ndarray  # [kinds, maxlen] int32
    ctx: np.ndarray  # [kinds, maxlen] int8 context code of the row (the row's token is predicted there)
    spike: np.ndarray  # [kinds, maxlen] bool: the sampled spike token
    length: np.ndarray  # [kinds] int64
    col: np.ndarray  # [kinds, maxlen] registry index of the (control) token, -1 for text
    names: list[str]  # registry names, in order


def _expand(rows: list[tuple[int, bool, int, int, bool]], target: int | None, stretch_default: int = 3) -> list:
    """Rows with ``tok == _TEXT`` and a ``stretch`` flag (5th field) are text segments: grow them
    evenly so that the template has ``target`` rows (or ``stretch_default`` rows each)."""
    fixed = [r for r in rows if not r[4]]
    n_stretch = len(rows) - len(fixed)
    if target is None or n_stretch == 0:
        sizes = [stretch_default] * n_stretch
    else:
        total = max(n_stretch, target - len(fixed))
        base, extra = divmod(total, n_stretch)
        sizes = [base + (1 if i < extra else 0) for i in range(n_stretch)]
    out, k = [], 0
    for tok, gen, turn, ctx, stretch in rows:
        if not stretch:
            out.append((tok, gen, turn, ctx, False))
            continue
        for j in range(sizes[k]):
            out.append((_TEXT, gen, turn, ctx if j == 0 else 0, False))
        k += 1
    return out


def _build_templates(ids: dict[str, int], spike: str, spike_context: str, tokens_per_sample: int) -> _Templates:
    OPEN, CLOSE, NL = ids["tool_call_open"], ids["tool_call_close"], ids["call_open_newline"]
    BODY, END, START = ids["call_body_start"], ids["im_end"], ids["im_start"]
    ROPEN, RCLOSE, SPIKE = ids["tool_response_open"], ids["tool_response_close"], ids[spike]
    c = _CTX_CODE

    def call(turn: int, close: bool = True) -> list:
        rows = [(OPEN, True, turn, c["turn_start"], False), (NL, True, turn, 0, False),
                (BODY, True, turn, c["after_call_open"], False), (_TEXT, True, turn, 0, True),
                (NL, True, turn, 0, False), (CLOSE, True, turn, c["after_call_body"], False)]
        if close:
            rows.append((END, True, turn, c["after_call_close"], False))
        return rows

    def tool(turn: int) -> list:
        return [(NL, False, turn, 0, False), (START, False, turn, 0, False), (_TEXT, False, turn, 0, False),
                (NL, False, turn, 0, False), (ROPEN, False, turn, 0, False), (_TEXT, False, turn, 0, True),
                (RCLOSE, False, turn, 0, False), (END, False, turn, 0, False), (NL, False, turn, 0, False),
                (START, False, turn, 0, False), (_TEXT, False, turn, 0, False), (NL, False, turn, 0, False)]

    def answer(turn: int) -> list:
        return [(_TEXT, True, turn, c["turn_start"], True), (END, True, turn, 0, False)]

    def polluted(turn: int) -> list:
        return call(turn, close=False) + [(_TEXT, True, turn, c["after_call_close"], True), (END, True, turn, 0, False)]

    def collapsed(turn: int) -> list:
        prefix = {
            "turn_start": [],
            "after_call_open": [(OPEN, True, turn, c["turn_start"], False), (NL, True, turn, 0, False)],
            "after_call_body": call(turn)[:5],
            "after_call_close": call(turn, close=False),
        }[spike_context]
        return prefix + [(SPIKE, True, turn, c[spike_context], False)]

    L = tokens_per_sample
    kinds: list[list] = [None] * _N_KINDS  # type: ignore[list-item]
    kinds[_H2_OK] = kinds[_H2_BAD] = _expand(call(0) + tool(0) + call(1) + tool(1) + answer(2), L)
    kinds[_H1_OK] = kinds[_H1_BAD] = _expand(call(0) + tool(0) + answer(1), L)
    kinds[_POL] = _expand(call(0) + tool(0) + polluted(1), L)
    kinds[_C1] = _expand(collapsed(0), None)
    kinds[_C2] = _expand(call(0) + tool(0) + collapsed(1), None)
    spike_at = {_C1: len(kinds[_C1]) - 1, _C2: len(kinds[_C2]) - 1}
    maxlen = max(len(k) for k in kinds)
    shape = (_N_KINDS, maxlen)
    names = list(ids)
    col_of = {tid: k for k, tid in enumerate(ids.values())}
    t = _Templates(np.full(shape, _TEXT, np.int64), np.zeros(shape, bool), np.zeros(shape, np.int32),
                   np.zeros(shape, np.int8), np.zeros(shape, bool), np.array([len(k) for k in kinds], np.int64),
                   np.full(shape, -1, np.int64), names)
    for k, rows in enumerate(kinds):
        for j, (tok, gen, turn, ctx, _) in enumerate(rows):
            t.tok[k, j], t.gen[k, j], t.turn[k, j], t.ctx[k, j] = tok, gen, turn, ctx
            t.col[k, j] = col_of.get(tok, -1)
    for k, j in spike_at.items():
        t.spike[k, j] = True
    return t


# ---------------------------------------------------------------------------------------------
# texts: one completion per (kind, variant), turn states from classify_turn
# ---------------------------------------------------------------------------------------------


def _call_text(v: int) -> str:
    name, args = _CALLS[v % len(_CALLS)]
    return f'{TOOL_CALL_OPEN}\n{{"name": "{name}", "arguments": {args}}}\n{TOOL_CALL_CLOSE}'


def _tool_block(v: int) -> str:
    return (f"\n{IM_START}user\n{TOOL_RESPONSE_OPEN}\n{{\"result\": \"r{v}\"}}\n{TOOL_RESPONSE_CLOSE}"
            f"{IM_END}\n{IM_START}assistant\n")


def _kind_turns(kind: int, v: int, collapsed_text: str) -> list[str]:
    """Raw assistant turns of a rollout of this kind, each with the token that ended it."""
    call2 = _call_text(v + 1)
    ok, bad = _ANSWERS_OK[v % 4], _ANSWERS_BAD[v % 4]
    end = IM_END
    return {
        _H2_OK: [_call_text(v) + end, call2 + end, ok + end],
        _H2_BAD: [_call_text(v) + end, call2 + end, bad + end],
        _H1_OK: [_call_text(v) + end, ok + end],
        _H1_BAD: [_call_text(v) + end, bad + end],
        _POL: [_call_text(v) + end, _call_text(v + 2) + " " + bad + end],
        _C1: [collapsed_text],
        _C2: [_call_text(v) + end, collapsed_text],
    }[kind]


@dataclass
class _KindTable:
    frame: pl.DataFrame  # kv (kind * variants + variant), completion, n_turns, turn_states, error_types
    n_turns: np.ndarray  # [kinds]
    state_counts: np.ndarray  # [kinds, 4] turns per TurnState
    error_counts: dict[str, np.ndarray]  # error -> [kinds] turns carrying it
    calls: np.ndarray  # [kinds] well-formed calls
    collapsed_state: str


def _kind_table(collapsed_text: str) -> _KindTable:
    cache: dict[str, Any] = {}

    def classify(text: str):
        if text not in cache:
            cache[text] = classify_turn(text)
        return cache[text]

    states = list(TurnState)
    rows = []
    n_turns = np.zeros(_N_KINDS, np.int64)
    state_counts = np.zeros((_N_KINDS, len(states)), np.int64)
    calls = np.zeros(_N_KINDS, np.int64)
    errors: dict[str, np.ndarray] = {}
    for kind in range(_N_KINDS):
        for v in range(_N_VARIANTS):
            turns = _kind_turns(kind, v, collapsed_text)
            cls = [classify(t) for t in turns]
            completion = "".join(t + (_tool_block(v) if i < len(turns) - 1 else "\n") for i, t in enumerate(turns))
            rows.append({
                "kv": kind * _N_VARIANTS + v,
                "completion": completion,
                "n_turns": len(turns),
                "turn_states": [c.state.value for c in cls],
                "error_types": [e.value for c in cls for e in c.errors],
            })
            if v == 0:
                n_turns[kind] = len(turns)
                calls[kind] = sum(len(c.calls) for c in cls)
                for c in cls:
                    state_counts[kind, states.index(c.state)] += 1
                    for e in c.errors:
                        errors.setdefault(e.value, np.zeros(_N_KINDS, np.int64))[kind] += 1
    frame = pl.DataFrame(rows, schema={"kv": pl.Int64, "completion": pl.String, "n_turns": pl.Int32,
                                       "turn_states": pl.List(pl.String), "error_types": pl.List(pl.String)})
    return _KindTable(frame, n_turns, state_counts, errors, calls, classify(collapsed_text).state.value)


# ---------------------------------------------------------------------------------------------
# per-step latent state
# ---------------------------------------------------------------------------------------------


@dataclass
class _Latent:
    p_spike: np.ndarray  # probability of the spike token at its context (policy, rollouts)
    p_probe: np.ndarray  # the same on the fixed probe inputs (small step noise)
    q: np.ndarray  # share of collapsed rollouts
    polarise: np.ndarray
    entropy: np.ndarray
    success: np.ndarray  # mean success probability
    stress: np.ndarray  # 0 healthy .. 1 collapsed: drives kl, clip_ratio, grad_norm, attribution


def _ramp(arr: np.ndarray, rel: np.ndarray, ramp: dict[int, float], hold_from: int, hold: float) -> None:
    """Set ``arr`` at steps ``rel == r`` to ``ramp[r]``, then to ``hold`` from ``rel >= hold_from``."""
    for r, v in ramp.items():
        arr[rel == r] = v
    arr[rel >= hold_from] = hold


def _latent(steps: int, collapse_at: int | None, recover_at: int | None, noise: float,
            rng: np.random.Generator) -> _Latent:
    t = np.arange(steps)
    p = np.full(steps, _P_BASE)
    q = np.zeros(steps)
    pol = np.zeros(steps)
    ent = np.full(steps, 0.9)
    stress = np.zeros(steps)
    if collapse_at is not None:
        rel = t - collapse_at
        _ramp(p, rel, _P_LEAD, 1, _P_COLLAPSED)
        _ramp(q, rel, _Q_LEAD, 1, _Q_COLLAPSED)
        _ramp(pol, rel, _POLARISE, 0, 0.3)
        _ramp(ent, rel, _ENTROPY, 0, 0.4)
        stress = np.clip((rel + LEAD_STEPS + 1) / (LEAD_STEPS + 2), 0.0, 1.0)
        if recover_at is not None:
            rr = t - recover_at
            _ramp(p, rr, _P_RECOVER, 1, _P_RECOVERED)
            _ramp(q, rr, _Q_RECOVER, 1, _Q_RECOVERED)
            pol[rr >= 0] = 0.05
            ent[rr == 0] = 0.6
            ent[rr >= 1] = 0.85
            stress = np.where(rr >= 0, np.clip(0.6 - 0.2 * rr, 0.1, 1.0), stress)
    jit = lambda s: rng.normal(0.0, s * noise, steps)  # noqa: E731
    return _Latent(
        p_spike=p,
        p_probe=np.clip(p * np.exp(jit(0.08)), 1e-7, 0.999),
        q=q,
        polarise=pol,
        entropy=np.clip(ent + jit(0.02), 0.05, None),
        success=np.clip(_SUCCESS_P + jit(0.03), 0.05, 0.95),
        stress=stress,
    )


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
        _CTX_CODE[ctx]: names.index(role_of[r["expected"]]) for ctx, r in KEY_CONTEXT_ROLES.items()
    }
    collapsed_text = _CONTEXT_PREFIX[spike_context] + next(
        t["text"] for t in QWEN_LIKE_CONTROL_TOKENS if t["name"] == spike_token)
    tpl = _build_templates(ids, spike_token, spike_context, tokens_per_sample)
    table = _kind_table(collapsed_text)
    lat = _latent(steps, collapse_at, recover_at, noise, rng)
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
    probe_fixed = _probe_fixed(tpl, K, n_probes, rng) if probe else None
    n_rows_total = n_rollouts_total = 0
    n = samples_per_step
    group_id = np.arange(n) // group_size
    n_groups = int(group_id[-1]) + 1
    # Generation (numpy) of step t+1 overlaps the Parquet writes of step t (polars releases the
    # GIL); one step in flight at a time keeps memory bounded.
    pool = ThreadPoolExecutor(max_workers=1)
    pending: Future | None = None
    try:
        for step in range(steps):
            out: dict[str, Any] = {}
            # ---- rollouts: kind of each sample
            p_s, q = lat.p_spike[step], lat.q[step]
            sign = rng.choice(np.array([-1.0, 1.0]), n_groups)
            p_group = np.clip(lat.success[step] + lat.polarise[step] * sign + rng.normal(0, 0.08, n_groups), 0.02, 0.98)
            u = rng.random((4, n))
            collapsed = u[0] < q
            success = u[1] < p_group[group_id]
            polluted = ~collapsed & (u[2] < _POLLUTED_P)
            two_calls = u[3] < 0.5
            kind = np.where(two_calls, np.where(success, _H2_OK, _H2_BAD), np.where(success, _H1_OK, _H1_BAD))
            kind = np.where(polluted, _POL, kind)
            c_kind = np.where(rng.random(n) < 0.5, _C1, _C2)  # collapse at the first or the second turn
            kind = np.where(collapsed, c_kind, kind).astype(np.int64)
            variant = rng.integers(0, _N_VARIANTS, n)
            reward = _REWARD[kind] + rng.normal(0.0, 0.01, n) * (kind <= _H1_BAD)
            accuracy = _ACCURACY[kind]

            lengths = tpl.length[kind]
            gen_tokens = (tpl.gen[kind] & (np.arange(tpl.tok.shape[1]) < lengths[:, None])).sum(1)
            metrics: dict[str, Any] = {"phase": "grpo", "skipped_update": False}
            metrics.update(_rollout_metrics(kind, reward, accuracy, group_id, table, states, gen_tokens))

            if rollouts:
                kv = kind * _N_VARIANTS + variant
                info = table.frame.select(pl.all().gather(kv))
                frame = pl.DataFrame({
                    "step": np.full(n, step, np.int64), "sample_id": np.arange(n, dtype=np.int64),
                    "group_id": group_id.astype(np.int64),
                }).with_columns(
                    task_id=pl.lit("synth-task-") + (pl.col("group_id") % 97).cast(pl.String),
                    split=pl.lit("train"), prompt=pl.lit(_PROMPT),
                ).hstack(info.select("completion")).with_columns(
                    reward=pl.Series(reward), accuracy=pl.Series(accuracy),
                ).hstack(info.select("n_turns", "turn_states", "error_types"))
                out["rollouts"] = frame
            n_rollouts_total += n

            # ---- tokens
            ent_mean = lat.entropy[step]
            if tokens:
                cols, mm = _token_columns(step, kind, lengths, tpl, ctrl_ids, spike_idx, _CTX_CODE[spike_context],
                                          expected_idx, p_s, ent_mean, step in nan_steps, rng)
                out["tokens"] = cols
                n_rows_total += len(cols["sample_id"])
                metrics["entropy"] = mm["entropy"]
                metrics["mismatch/abs_logprob_diff"] = mm["mismatch"]
            else:
                metrics["entropy"] = float(ent_mean)
                metrics["mismatch/abs_logprob_diff"] = float(0.024 * (1 + 0.05 * rng.normal()))

            # ---- probe
            if probe_fixed is not None and (step % max(probe_every, 1) == 0):
                pf = _probe_frame(step, probe_fixed, tpl, names, spike_idx, expected_idx, spike_context,
                                  lat.p_probe[step], noise, rng)
                out["probe"] = pf
                metrics.update(probe_summary(pf, names))

            # ---- optimiser-side metrics
            s = lat.stress[step]
            jit = lambda sd: float(rng.normal(0.0, sd * noise))  # noqa: E731
            metrics.update({
                "kl": max(0.0, 0.01 + 0.08 * s + jit(0.002)),
                "clip_ratio": max(0.0, 0.02 + 0.1 * s + jit(0.003)),
                "grad_norm": max(0.0, 1.0 + 1.5 * s + (3.0 if collapse_at is not None and step == collapse_at else 0.0)
                                 + jit(0.08)),
                "loss": 0.05 * (1 - s) + jit(0.01),
                "lr": 1e-6,
                "time/step": 1.0 + abs(jit(0.05)),
            })
            for k, name in enumerate(names):
                push = 0.05 * s if k == spike_idx else 0.0
                self_ = push * 0.6 + jit(0.0005)
                other = push * 0.4 + jit(0.0005)
                metrics[f"attribution/{name}/self"] = self_
                metrics[f"attribution/{name}/other"] = other
                metrics[f"attribution/{name}/total"] = self_ + other
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


_POOL: np.ndarray | None = None


def _noise_pool() -> np.ndarray:
    """2^22 standard normals (float32), drawn once: the background noise of the lp_ctrl columns."""
    global _POOL
    if _POOL is None:
        _POOL = np.random.default_rng(12345).standard_normal(1 << 22, dtype=np.float32)
    return _POOL


def _write_step(writer: RunWriter, step: int, tables: dict[str, Any], metrics: dict[str, Any]) -> None:
    if "rollouts" in tables:
        writer.write_rollouts(step, tables["rollouts"])
    if "tokens" in tables:
        writer.write_tokens(step, tables["tokens"])
    if "probe" in tables:
        writer.write_probe(step, tables["probe"])
    writer.log_metrics(step, metrics)


def _rollout_metrics(kind: np.ndarray, reward: np.ndarray, accuracy: np.ndarray, group_id: np.ndarray,
                     table: _KindTable, states: list[str], gen_tokens: np.ndarray) -> dict[str, float]:
    counts = np.bincount(kind, minlength=_N_KINDS)
    n_turns = float((counts * table.n_turns).sum())
    g_sum = np.bincount(group_id, reward)
    g_sq = np.bincount(group_id, reward * reward)
    g_n = np.bincount(group_id)
    multi = g_n > 1
    g_std = np.sqrt(np.maximum(g_sq[multi] / g_n[multi] - (g_sum[multi] / g_n[multi]) ** 2, 0.0))
    out = {
        "reward": float(reward.mean()),
        "reward_std": float(reward.std()),
        "accuracy": float(accuracy.mean()),
        "group_reward_std": float(g_std.mean()) if g_std.size else 0.0,
        "frac_reward_zero_std": float((g_std < 1e-9).mean()) if g_std.size else 1.0,
        "completions/mean_length": float(gen_tokens.mean()),
        "completions/truncated": 0.0,
        "turns_per_episode": n_turns / len(kind),
        "tool_calls_per_episode": float((counts * table.calls).sum() / len(kind)),
    }
    st = counts @ table.state_counts
    for i, s in enumerate(states):
        out[f"turn_state/{s}"] = float(st[i] / max(n_turns, 1.0))
    for e, per_kind in table.error_counts.items():
        v = float((counts * per_kind).sum() / max(n_turns, 1.0))
        if v > 0:
            out[f"format_error/{e}"] = v
    return out


def _token_columns(step: int, kind: np.ndarray, lengths: np.ndarray, tpl: _Templates, ctrl_ids: np.ndarray,
                   spike_idx: int, spike_code: int, expected_idx: dict[int, int], p_spike: float, ent_mean: float,
                   inject_nan: bool, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    n = len(kind)
    N = int(lengths.sum())
    K = len(ctrl_ids)
    width = tpl.tok.shape[1]
    starts = np.cumsum(lengths) - lengths
    sample = np.repeat(np.arange(n, dtype=np.int64), lengths)
    pos = np.arange(N, dtype=np.int64) - np.repeat(starts, lengths)
    flat = np.repeat(kind * width, lengths) + pos  # index into the flattened templates
    tok = tpl.tok.ravel()[flat]
    gen = tpl.gen.ravel()[flat]
    ctx = tpl.ctx.ravel()[flat]
    is_text = tok < 0
    text_ids = rng.integers(1000, 150000, N)
    text_ids[text_ids == 5212] = 5213
    tok = np.where(is_text, text_ids, tok)

    scale = np.float32(0.5 * ent_mean / 0.9 + 0.05)
    lp = -rng.standard_exponential(N, dtype=np.float32) * np.where(gen, scale, np.float32(4.0) * scale)
    ctrl_rows = np.nonzero(~is_text)[0]
    lp[ctrl_rows] = np.float32(math.log(0.97)) - np.float32(0.01) * rng.standard_exponential(len(ctrl_rows), dtype=np.float32)
    lp_spike = np.float32(math.log(p_spike))
    lp[tpl.spike.ravel()[flat]] = lp_spike
    entropy = rng.standard_gamma(2.0, N, dtype=np.float32) * np.float32(ent_mean / 2.0)
    sampler = lp + rng.standard_normal(N, dtype=np.float32) * np.float32(0.03)

    # ordinary positions: every control token is unlikely (~1e-5); noise from a shared pool
    pool = _noise_pool()
    if N * K <= len(pool):
        start = int(rng.integers(0, len(pool) - N * K + 1))
        base = pool[start:start + N * K]
    else:
        base = np.resize(pool, N * K)
    lp_ctrl = base.reshape(K, N) * np.float32(0.5) + np.float32(math.log(1e-5))  # column-major: [K, N]
    # key contexts: the healthy next token is likely; the spike token has the policy's spike probability
    ctx_rows = np.nonzero(ctx)[0]
    exp_col = np.full(len(_CTX_NAMES), -1, np.int64)
    for code, e_idx in expected_idx.items():
        exp_col[code] = e_idx
    lp_ctrl[exp_col[ctx[ctx_rows]], ctx_rows] = np.float32(math.log(0.9))
    at_spike = ctx_rows[ctx[ctx_rows] == spike_code]
    lp_ctrl[spike_idx, at_spike] = np.minimum(
        lp_spike + rng.standard_normal(len(at_spike), dtype=np.float32) * np.float32(0.3), np.float32(-1e-4))
    e_idx = expected_idx[spike_code]
    if e_idx != spike_idx:
        lp_ctrl[e_idx, at_spike] = np.float32(math.log(max(1.0 - p_spike, 1e-4) * 0.95))
    # the sampled control token: its column is the sampled log-prob
    col = tpl.col.ravel()[flat[ctrl_rows]]
    hit = col >= 0
    lp_ctrl[col[hit], ctrl_rows[hit]] = lp[ctrl_rows[hit]]

    mism = np.abs(lp[gen] - sampler[gen]).mean() if gen.any() else float("nan")
    ent_gen = entropy[gen].mean() if gen.any() else float("nan")
    if inject_nan:
        cand = np.nonzero(gen)[0]
        pick = rng.choice(cand, max(1, len(cand) // 100), replace=False)
        lp[pick] = np.nan
    cols = {
        "step": np.full(N, step, np.int64),
        "sample_id": sample,
        "turn": tpl.turn.ravel()[flat],
        "position": pos.astype(np.int32),
        "token_id": tok.astype(np.int32),
        "logprob": lp,
        "sampler_logprob": sampler,
        "entropy": entropy,
        "is_generated": gen,
    }
    for k, name in enumerate(tpl.names):
        cols[f"lp_ctrl_{name}"] = lp_ctrl[k]
    return cols, {"entropy": float(ent_gen), "mismatch": float(mism)}


# ---------------------------------------------------------------------------------------------
# probe
# ---------------------------------------------------------------------------------------------


@dataclass
class _ProbeFixed:
    token_id: np.ndarray  # [P, L-1] gold next token
    ctx: np.ndarray  # [P, L-1] context code of each predicting position
    lp_gold: np.ndarray  # [P, L-1]
    lp_ctrl: np.ndarray  # [P, L-1, K]
    factor: np.ndarray  # [P] per-probe multiplier of the spike probability


def _probe_fixed(tpl: _Templates, K: int, n_probes: int, rng: np.random.Generator) -> _ProbeFixed:
    L = int(tpl.length[_H2_OK])
    tok = np.tile(tpl.tok[_H2_OK, :L], (n_probes, 1))
    text = tok < 0
    tok[text] = rng.integers(1000, 150000, int(text.sum()))
    tok[tok == 5212] = 5213
    gen = tpl.gen[_H2_OK, :L]
    ctx = np.where(gen, tpl.ctx[_H2_OK, :L], 0)
    # predicting position p sees tokens <= p and predicts token p+1
    nxt = tok[:, 1:]
    ctx_p = np.tile(ctx[1:], (n_probes, 1))
    lp_gold = np.where(np.tile(text[0, 1:], (n_probes, 1)), -rng.exponential(0.8, nxt.shape), math.log(0.95))
    lp_ctrl = math.log(1e-5) + rng.normal(0.0, 0.5, (*nxt.shape, K))
    return _ProbeFixed(nxt.astype(np.int32), ctx_p.astype(np.int8), lp_gold, lp_ctrl,
                       np.exp(rng.normal(0.0, 0.2, n_probes)))


def _probe_frame(step: int, pf: _ProbeFixed, tpl: _Templates, names: list[str], spike_idx: int,
                 expected_idx: dict[int, int], spike_context: str, p_probe: float, noise: float,
                 rng: np.random.Generator) -> pl.DataFrame:
    P, L1 = pf.token_id.shape
    lp_gold = pf.lp_gold + rng.normal(0.0, 0.01 * noise, pf.lp_gold.shape)
    lp_ctrl = pf.lp_ctrl + rng.normal(0.0, 0.02 * noise, pf.lp_ctrl.shape)
    for code, e_idx in expected_idx.items():
        lp_ctrl[pf.ctx == code, e_idx] = math.log(0.9)
    code = _CTX_CODE[spike_context]
    at = pf.ctx == code
    p = np.clip(p_probe * pf.factor, 1e-7, 0.99)  # [P]
    p_rows = np.broadcast_to(p[:, None], at.shape)[at]
    lp_ctrl[at, spike_idx] = np.log(p_rows)
    e_idx = expected_idx[code]
    if e_idx != spike_idx:
        lp_ctrl[at, e_idx] = np.log(np.maximum(1.0 - p_rows, 1e-4) * 0.95)
    # the gold token's column is lp_gold
    ctrl_ids = np.array([t["token_id"] for t in QWEN_LIKE_CONTROL_TOKENS])
    for k, tid in enumerate(ctrl_ids):
        m = pf.token_id == tid
        lp_gold = np.where(m, lp_ctrl[..., k], lp_gold)
    lp_ctrl = np.minimum(lp_ctrl, -1e-6)
    lp_gold = np.minimum(lp_gold, -1e-6)
    data: dict[str, Any] = {
        "step": np.full(P * L1, step, np.int64),
        "probe_id": np.repeat(np.arange(P, dtype=np.int64), L1),
        "position": np.tile(np.arange(L1, dtype=np.int32), P),
        "token_id": pf.token_id.reshape(-1),
        "lp_gold": lp_gold.reshape(-1).astype(np.float32),
        "context": pl.Series(np.array(_CTX_NAMES, dtype=object)[pf.ctx.reshape(-1)], dtype=pl.String),
    }
    for k, name in enumerate(names):
        data[f"lp_ctrl_{name}"] = lp_ctrl[..., k].reshape(-1).astype(np.float32)
    return pl.DataFrame(data)
