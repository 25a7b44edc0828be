"""The seven kinds of rollout a synthetic native step mixes (two-call and one-call successes and
failures, a polluted turn, a collapse at the first or the second turn): the token layout of each
(`build_templates`), its texts and turn states (`kind_table`, states from
:func:`diagnose.turns.classify_turn`, never hard-coded), a step's mix of kinds (`sample_kinds`),
its rollouts table (`rollouts_frame`) and rollout metrics (`rollout_metrics`). Used by
:mod:`diagnose.synth.native`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from diagnose.chat import IM_END, IM_START, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, TOOL_RESPONSE_CLOSE, TOOL_RESPONSE_OPEN
from diagnose.turns import TurnState, classify_turn

CTX_NAMES = ("", "turn_start", "after_call_open", "after_call_body", "after_call_close")
CTX_CODE = {name: i for i, name in enumerate(CTX_NAMES)}
TEXT = -1  # template placeholder: an ordinary text token (random id)

# kinds of rollouts: two calls then an answer (right / wrong), one call then an answer, a polluted
# second turn, a collapse at the first or the second turn
H2_OK, H2_BAD, H1_OK, H1_BAD, POL, C1, C2 = range(7)
N_KINDS = 7
N_VARIANTS = 4
REWARD = np.array([1.0, 0.1, 1.0, 0.1, 0.05, 0.0, 0.0])
ACCURACY = np.array([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
_POLLUTED_P = 0.04  # share of the non-collapsed rollouts with a polluted turn

PROMPT = (
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
CONTEXT_PREFIX = {
    "turn_start": "",
    "after_call_open": TOOL_CALL_OPEN + "\n",
    "after_call_body": TOOL_CALL_OPEN + '\n{"name": "search", "arguments": {"query": "x"}}\n',
    "after_call_close": TOOL_CALL_OPEN + '\n{"name": "search", "arguments": {"query": "x"}}\n' + TOOL_CALL_CLOSE,
}



# ---------------------------------------------------------------------------------------------
# templates: one token layout per kind of rollout
# ---------------------------------------------------------------------------------------------


@dataclass
class Templates:
    tok: np.ndarray  # [kinds, maxlen] int64 (-1: text)
    gen: np.ndarray  # [kinds, maxlen] bool
    turn: np.ndarray  # [kinds, maxlen] int32
    ctx: np.ndarray  # [kinds, maxlen] int8 context code of the row (the row's token is predicted there)
    spike: np.ndarray  # [kinds, maxlen] bool: the sampled spike token
    length: np.ndarray  # [kinds] int64
    col: np.ndarray  # [kinds, maxlen] registry index of the (control) token, -1 for text
    names: list[str]  # registry names, in order


def _expand(rows: list[tuple[int, bool, int, int, bool]], target: int | None, stretch_default: int = 3) -> list:
    """Rows with ``tok == TEXT`` and a ``stretch`` flag (5th field) are text segments: grow them
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
            out.append((TEXT, gen, turn, ctx if j == 0 else 0, False))
        k += 1
    return out


def build_templates(ids: dict[str, int], spike: str, spike_context: str, tokens_per_sample: int) -> Templates:
    OPEN, CLOSE, NL = ids["tool_call_open"], ids["tool_call_close"], ids["call_open_newline"]
    BODY, END, START = ids["call_body_start"], ids["im_end"], ids["im_start"]
    ROPEN, RCLOSE, SPIKE = ids["tool_response_open"], ids["tool_response_close"], ids[spike]
    c = CTX_CODE

    def call(turn: int, close: bool = True) -> list:
        rows = [(OPEN, True, turn, c["turn_start"], False), (NL, True, turn, 0, False),
                (BODY, True, turn, c["after_call_open"], False), (TEXT, True, turn, 0, True),
                (NL, True, turn, 0, False), (CLOSE, True, turn, c["after_call_body"], False)]
        if close:
            rows.append((END, True, turn, c["after_call_close"], False))
        return rows

    def tool(turn: int) -> list:
        return [(NL, False, turn, 0, False), (START, False, turn, 0, False), (TEXT, False, turn, 0, False),
                (NL, False, turn, 0, False), (ROPEN, False, turn, 0, False), (TEXT, False, turn, 0, True),
                (RCLOSE, False, turn, 0, False), (END, False, turn, 0, False), (NL, False, turn, 0, False),
                (START, False, turn, 0, False), (TEXT, False, turn, 0, False), (NL, False, turn, 0, False)]

    def answer(turn: int) -> list:
        return [(TEXT, True, turn, c["turn_start"], True), (END, True, turn, 0, False)]

    def polluted(turn: int) -> list:
        return call(turn, close=False) + [(TEXT, True, turn, c["after_call_close"], True), (END, True, turn, 0, False)]

    def collapsed(turn: int) -> list:
        prefix = {
            "turn_start": [],
            "after_call_open": [(OPEN, True, turn, c["turn_start"], False), (NL, True, turn, 0, False)],
            "after_call_body": call(turn)[:5],
            "after_call_close": call(turn, close=False),
        }[spike_context]
        return prefix + [(SPIKE, True, turn, c[spike_context], False)]

    L = tokens_per_sample
    kinds: list[list] = [None] * N_KINDS  # type: ignore[list-item]
    kinds[H2_OK] = kinds[H2_BAD] = _expand(call(0) + tool(0) + call(1) + tool(1) + answer(2), L)
    kinds[H1_OK] = kinds[H1_BAD] = _expand(call(0) + tool(0) + answer(1), L)
    kinds[POL] = _expand(call(0) + tool(0) + polluted(1), L)
    kinds[C1] = _expand(collapsed(0), None)
    kinds[C2] = _expand(call(0) + tool(0) + collapsed(1), None)
    spike_at = {C1: len(kinds[C1]) - 1, C2: len(kinds[C2]) - 1}
    maxlen = max(len(k) for k in kinds)
    shape = (N_KINDS, maxlen)
    names = list(ids)
    col_of = {tid: k for k, tid in enumerate(ids.values())}
    t = Templates(np.full(shape, TEXT, np.int64), np.zeros(shape, bool), np.zeros(shape, np.int32),
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
        H2_OK: [_call_text(v) + end, call2 + end, ok + end],
        H2_BAD: [_call_text(v) + end, call2 + end, bad + end],
        H1_OK: [_call_text(v) + end, ok + end],
        H1_BAD: [_call_text(v) + end, bad + end],
        POL: [_call_text(v) + end, _call_text(v + 2) + " " + bad + end],
        C1: [collapsed_text],
        C2: [_call_text(v) + end, collapsed_text],
    }[kind]


@dataclass
class KindTable:
    frame: pl.DataFrame  # kv (kind * variants + variant), completion, n_turns, turn_states, error_types
    n_turns: np.ndarray  # [kinds]
    state_counts: np.ndarray  # [kinds, 4] turns per TurnState
    error_counts: dict[str, np.ndarray]  # error -> [kinds] turns carrying it
    calls: np.ndarray  # [kinds] well-formed calls
    collapsed_state: str


def kind_table(collapsed_text: str) -> KindTable:
    cache: dict[str, Any] = {}

    def classify(text: str):
        if text not in cache:
            cache[text] = classify_turn(text)
        return cache[text]

    states = list(TurnState)
    rows = []
    n_turns = np.zeros(N_KINDS, np.int64)
    state_counts = np.zeros((N_KINDS, len(states)), np.int64)
    calls = np.zeros(N_KINDS, np.int64)
    errors: dict[str, np.ndarray] = {}
    for kind in range(N_KINDS):
        for v in range(N_VARIANTS):
            turns = _kind_turns(kind, v, collapsed_text)
            cls = [classify(t) for t in turns]
            completion = "".join(t + (_tool_block(v) if i < len(turns) - 1 else "\n") for i, t in enumerate(turns))
            rows.append({
                "kv": kind * N_VARIANTS + v,
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
                        errors.setdefault(e.value, np.zeros(N_KINDS, np.int64))[kind] += 1
    frame = pl.DataFrame(rows, schema={"kv": pl.Int64, "completion": pl.String, "n_turns": pl.Int32,
                                       "turn_states": pl.List(pl.String), "error_types": pl.List(pl.String)})
    return KindTable(frame, n_turns, state_counts, errors, calls, classify(collapsed_text).state.value)



def rollout_metrics(kind: np.ndarray, reward: np.ndarray, accuracy: np.ndarray, group_id: np.ndarray,
                     table: KindTable, states: list[str], gen_tokens: np.ndarray) -> dict[str, float]:
    counts = np.bincount(kind, minlength=N_KINDS)
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


def sample_kinds(q: float, success: float, polarise: float, group_id: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One step's mix: ``(kind, variant, reward, accuracy)`` per sample, given the step's share of
    collapsed rollouts ``q``, mean success probability and group polarisation."""
    n = len(group_id)
    n_groups = int(group_id[-1]) + 1
    sign = rng.choice(np.array([-1.0, 1.0]), n_groups)
    p_group = np.clip(success + polarise * sign + rng.normal(0, 0.08, n_groups), 0.02, 0.98)
    u = rng.random((4, n))
    collapsed = u[0] < q
    succeeded = u[1] < p_group[group_id]
    polluted = ~collapsed & (u[2] < _POLLUTED_P)
    two_calls = u[3] < 0.5
    kind = np.where(two_calls, np.where(succeeded, H2_OK, H2_BAD), np.where(succeeded, H1_OK, H1_BAD))
    kind = np.where(polluted, POL, kind)
    c_kind = np.where(rng.random(n) < 0.5, C1, C2)  # collapse at the first or the second turn
    kind = np.where(collapsed, c_kind, kind).astype(np.int64)
    variant = rng.integers(0, N_VARIANTS, n)
    reward = REWARD[kind] + rng.normal(0.0, 0.01, n) * (kind <= H1_BAD)
    return kind, variant, reward, ACCURACY[kind]


def rollouts_frame(step: int, kind: np.ndarray, variant: np.ndarray, reward: np.ndarray, accuracy: np.ndarray,
                   group_id: np.ndarray, table: KindTable) -> pl.DataFrame:
    """The step's ``rollouts`` table: each sample's text, turn states and errors from its kind."""
    n = len(kind)
    info = table.frame.select(pl.all().gather(kind * N_VARIANTS + variant))
    return pl.DataFrame({
        "step": np.full(n, step, np.int64), "sample_id": np.arange(n, dtype=np.int64),
        "group_id": group_id.astype(np.int64),
    }).with_columns(
        task_id=pl.lit("synth-task-") + (pl.col("group_id") % 97).cast(pl.String),
        split=pl.lit("train"), prompt=pl.lit(PROMPT),
    ).hstack(info.select("completion")).with_columns(
        reward=pl.Series(reward), accuracy=pl.Series(accuracy),
    ).hstack(info.select("n_turns", "turn_states", "error_types"))
