"""The numbers of a synthetic native run: the per-step latent state of the collapse (spike
probability, collapsed share, polarisation, entropy, optimiser stress; `latent`) and what is
drawn from it: the log-prob columns of the tokens table (`token_columns`) and of the fixed probe
(`probe_fixed`, `probe_frame`), and the optimiser-side metrics (`optimiser_metrics`). numpy
only, no per-token Python. Used by :mod:`diagnose.synth.native`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from diagnose.synth.native_kinds import CTX_CODE, CTX_NAMES, H2_OK, Templates

LEAD_STEPS = 3
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


@dataclass
class Latent:
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


def latent(steps: int, collapse_at: int | None, recover_at: int | None, noise: float,
            rng: np.random.Generator) -> Latent:
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
    return Latent(
        p_spike=p,
        p_probe=np.clip(p * np.exp(jit(0.08)), 1e-7, 0.999),
        q=q,
        polarise=pol,
        entropy=np.clip(ent + jit(0.02), 0.05, None),
        success=np.clip(_SUCCESS_P + jit(0.03), 0.05, 0.95),
        stress=stress,
    )



_POOL: np.ndarray | None = None


def _noise_pool() -> np.ndarray:
    """2^22 standard normals (float32), drawn once: the background noise of the lp_ctrl columns."""
    global _POOL
    if _POOL is None:
        _POOL = np.random.default_rng(12345).standard_normal(1 << 22, dtype=np.float32)
    return _POOL



def token_columns(step: int, kind: np.ndarray, lengths: np.ndarray, tpl: Templates, ctrl_ids: np.ndarray,
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
    exp_col = np.full(len(CTX_NAMES), -1, np.int64)
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
class ProbeFixed:
    token_id: np.ndarray  # [P, L-1] gold next token
    ctx: np.ndarray  # [P, L-1] context code of each predicting position
    lp_gold: np.ndarray  # [P, L-1]
    lp_ctrl: np.ndarray  # [P, L-1, K]
    factor: np.ndarray  # [P] per-probe multiplier of the spike probability


def probe_fixed(tpl: Templates, K: int, n_probes: int, rng: np.random.Generator) -> ProbeFixed:
    L = int(tpl.length[H2_OK])
    tok = np.tile(tpl.tok[H2_OK, :L], (n_probes, 1))
    text = tok < 0
    tok[text] = rng.integers(1000, 150000, int(text.sum()))
    tok[tok == 5212] = 5213
    gen = tpl.gen[H2_OK, :L]
    ctx = np.where(gen, tpl.ctx[H2_OK, :L], 0)
    # predicting position p sees tokens <= p and predicts token p+1
    nxt = tok[:, 1:]
    ctx_p = np.tile(ctx[1:], (n_probes, 1))
    lp_gold = np.where(np.tile(text[0, 1:], (n_probes, 1)), -rng.exponential(0.8, nxt.shape), math.log(0.95))
    lp_ctrl = math.log(1e-5) + rng.normal(0.0, 0.5, (*nxt.shape, K))
    return ProbeFixed(nxt.astype(np.int32), ctx_p.astype(np.int8), lp_gold, lp_ctrl,
                       np.exp(rng.normal(0.0, 0.2, n_probes)))


def probe_frame(step: int, pf: ProbeFixed, ctrl_ids: np.ndarray, names: list[str], spike_idx: int,
                 expected_idx: dict[int, int], spike_context: str, p_probe: float, noise: float,
                 rng: np.random.Generator) -> pl.DataFrame:
    P, L1 = pf.token_id.shape
    lp_gold = pf.lp_gold + rng.normal(0.0, 0.01 * noise, pf.lp_gold.shape)
    lp_ctrl = pf.lp_ctrl + rng.normal(0.0, 0.02 * noise, pf.lp_ctrl.shape)
    for code, e_idx in expected_idx.items():
        lp_ctrl[pf.ctx == code, e_idx] = math.log(0.9)
    code = CTX_CODE[spike_context]
    at = pf.ctx == code
    p = np.clip(p_probe * pf.factor, 1e-7, 0.99)  # [P]
    p_rows = np.broadcast_to(p[:, None], at.shape)[at]
    lp_ctrl[at, spike_idx] = np.log(p_rows)
    e_idx = expected_idx[code]
    if e_idx != spike_idx:
        lp_ctrl[at, e_idx] = np.log(np.maximum(1.0 - p_rows, 1e-4) * 0.95)
    # the gold token's column is lp_gold
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
        "context": pl.Series(np.array(CTX_NAMES, dtype=object)[pf.ctx.reshape(-1)], dtype=pl.String),
    }
    for k, name in enumerate(names):
        data[f"lp_ctrl_{name}"] = lp_ctrl[..., k].reshape(-1).astype(np.float32)
    return pl.DataFrame(data)


def optimiser_metrics(stress: float, names: list[str], spike_idx: int, at_onset: bool, noise: float,
                      rng: np.random.Generator) -> dict[str, float]:
    """kl, clip_ratio, grad_norm (a jump at the onset step), loss, lr, step time and the logit
    attribution of each control token (the spike token's grows with ``stress``)."""
    s = stress
    jit = lambda sd: float(rng.normal(0.0, sd * noise))  # noqa: E731
    out = {
        "kl": max(0.0, 0.01 + 0.08 * s + jit(0.002)),
        "clip_ratio": max(0.0, 0.02 + 0.1 * s + jit(0.003)),
        "grad_norm": max(0.0, 1.0 + 1.5 * s + (3.0 if at_onset else 0.0) + jit(0.08)),
        "loss": 0.05 * (1 - s) + jit(0.01),
        "lr": 1e-6,
        "time/step": 1.0 + abs(jit(0.05)),
    }
    for k, name in enumerate(names):
        push = 0.05 * s if k == spike_idx else 0.0
        self_ = push * 0.6 + jit(0.0005)
        other = push * 0.4 + jit(0.0005)
        out[f"attribution/{name}/self"] = self_
        out[f"attribution/{name}/other"] = other
        out[f"attribution/{name}/total"] = self_ + other
    return out
