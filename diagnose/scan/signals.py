"""Per-step signals of a run: one row per step, one column per signal, from whatever tables a
:class:`diagnose.source.RunSource` has.

Everything is a lazy polars pipeline ending in a ``group_by("step")`` (or ``("step", ...)``)
collected with the streaming engine, so the token table (50M+ rows) is never materialised.
Key contexts in the token table are found without sorting or window functions: a few cheap
passes find the anchor rows (generated ``<tool_call>`` / ``</tool_call>`` tokens, first generated
token of each turn), their target rows are packed into one Int64 key per row
(step, sample, position), and the main pass labels rows with ``is_in`` on those keys.

Signal names and their direction of concern are listed in :data:`SIGNAL_SPECS` and in
``docs/scan.md``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from diagnose.control_tokens import KEY_CONTEXT_ROLES
from diagnose.rundir.schema import CTRL_PREFIX, CTRL_SEQ_PREFIX, ctrl_names_from_columns
from diagnose.scan.sampling import turn_state_ci
from diagnose.source import RunSource
from diagnose.turns import TurnState

__all__ = [
    "SIGNAL_SPECS",
    "SignalSpec",
    "TOKEN_CONTEXTS",
    "merge_signals",
    "metric_signals",
    "probe_signals",
    "rollout_signals",
    "signal_direction",
    "signal_kind",
    "step_signals",
    "token_signals",
]

#: Key contexts identifiable in a token table (``after_call_body`` needs the probe: on rollouts
#: the end of a call body is only known once ``</tool_call>`` was sampled, a biased selection).
TOKEN_CONTEXTS: tuple[str, ...] = ("turn_start", "after_call_open", "after_call_close")
_CTX_CODE = {name: i + 1 for i, name in enumerate(TOKEN_CONTEXTS)}

_STATES = tuple(s.value for s in TurnState)


@dataclass(frozen=True)
class SignalSpec:
    """One signal family: ``pattern`` (a regex over column names), where it comes from, the
    direction that is a concern (``up`` | ``down`` | ``both``), and what it means."""

    pattern: str
    source: str
    direction: str
    description: str


#: Every signal family ``step_signals`` produces, with its direction of concern (the order is
#: the lookup order of :func:`signal_direction`; first match wins).
SIGNAL_SPECS: tuple[SignalSpec, ...] = (
    SignalSpec(r"reward", "rollouts|metrics", "down", "mean reward of the on-policy rollouts"),
    SignalSpec(r"accuracy", "rollouts|metrics", "down", "mean task accuracy"),
    SignalSpec(r"reward_std", "rollouts|metrics", "both", "std of the reward over the step's rollouts"),
    SignalSpec(r"group_reward_std", "rollouts|metrics", "down",
               "mean within-group reward std (GRPO signal strength); falls when groups turn uniform"),
    SignalSpec(r"frac_reward_zero_std", "rollouts|metrics", "up", "share of groups whose rewards are all equal (no gradient)"),
    SignalSpec(r"n_rollouts", "rollouts", "both", "on-policy rollouts at the step"),
    SignalSpec(r"nonfinite_reward", "rollouts", "up", "rollouts whose reward is NaN/inf"),
    SignalSpec(r"turn_state/healthy_call", "rollouts|metrics", "down", "share of assistant turns that are healthy calls"),
    SignalSpec(r"turn_state/healthy_response", "rollouts|metrics", "both", "share of turns that are healthy final answers"),
    SignalSpec(r"turn_state/polluted", "rollouts|metrics", "up", "share of turns with a format error but usable content"),
    SignalSpec(r"turn_state/collapsed", "rollouts|metrics", "up", "share of turns with nothing usable (e.g. a bare <tool_call>)"),
    SignalSpec(r"turn_state/[^/]+/ci95", "rollouts", "both",
               "95% CI half-width of the turn-state share when turn states come from a sample (--sample)"),
    SignalSpec(r"format_error/.+", "rollouts|metrics", "up", "occurrences of that FormatError per assistant turn"),
    SignalSpec(r"rollouts/any_collapsed", "rollouts", "up", "share of rollouts with at least one collapsed turn"),
    SignalSpec(r"completion_chars", "rollouts", "both", "mean completion length in characters"),
    SignalSpec(r"completions/mean_length", "tokens|metrics", "both", "mean generated tokens per rollout"),
    SignalSpec(r"turns_per_episode", "rollouts|metrics", "both", "mean assistant turns per rollout"),
    SignalSpec(r"healthy_calls_per_episode", "rollouts", "down", "mean healthy_call turns per rollout (tool-call frequency)"),
    SignalSpec(r"tool_calls_per_episode", "metrics", "down", "mean well-formed calls per rollout (trainer metric)"),
    SignalSpec(r"num_turns/(mean|min|max)", "metrics", "both",
               "verl: turns per rollout (assistant turns + tool rounds + 1); falls when episodes end early"),
    SignalSpec(r"tool_call_counts/(mean|min|max)", "metrics", "down", "verl: tool calls per rollout"),
    SignalSpec(r"tools/call_frequency", "metrics", "down", "tool calls per rollout (TRL tools/call_frequency; "
               "open-instruct request_info num_calls)"),
    SignalSpec(r"tools/failure_frequency", "metrics", "up", "share of tool calls that failed"),
    SignalSpec(r"tools/timeout_frequency", "metrics", "up", "share of rollouts with a tool call that timed out"),
    SignalSpec(r"entropy", "tokens|metrics", "both", "mean entropy (nats) of the policy at generated positions"),
    SignalSpec(r"low_prob_share", "tokens", "up", "share of generated tokens sampled with p < low_prob (default 0.01)"),
    SignalSpec(r"nonfinite_logprob", "tokens", "up", "generated tokens whose logprob is NaN/inf (count)"),
    SignalSpec(r"nonfinite_logprob_share", "tokens", "up", "the same, as a share of generated tokens"),
    SignalSpec(r"mismatch/abs_logprob_diff", "tokens|metrics", "up", "mean |logprob - sampler_logprob| (train/inference mismatch)"),
    SignalSpec(r"sampling/sampling_logp_difference/max", "metrics", "up",
               "TRL: max |logprob - vLLM logprob| over the batch (its mean is mismatch/abs_logprob_diff)"),
    SignalSpec(r"sampling/importance_sampling_ratio/(min|mean|max)", "metrics", "both",
               "TRL: vLLM importance-sampling ratio (trainer / sampler probability) statistics"),
    SignalSpec(r"mismatch/abs_prob_diff", "metrics", "up",
               "mean |p - sampler_p| over generated tokens (verl training/rollout_probs_diff_mean; a probability)"),
    SignalSpec(r"training/rollout_probs_diff_(mean|max|std)", "metrics", "up", "verl: |p_actor - p_rollout| statistics"),
    SignalSpec(r"training/rollout_actor_probs_pearson_corr", "metrics", "down",
               "verl: correlation of actor and rollout token probabilities"),
    SignalSpec(r"rollout_corr/(kl|k3_kl|log_ppl_abs_diff|chi2_token|chi2_seq)", "metrics", "up",
               "verl rollout correction: train/inference mismatch (KL, |log-ppl diff|, chi2 of rollout vs training policy)"),
    SignalSpec(r"rollout_corr/.+", "metrics", "both", "verl rollout correction: perplexities, IS weights, rejection shares"),
    SignalSpec(r"actor/ppo_kl", "metrics", "up", "verl: KL between the rollout and the updated policy in the PPO step"),
    SignalSpec(r"n_tokens", "tokens", "both", "generated tokens at the step"),
    SignalSpec(r"ctrl/[^/]+/p", "tokens", "up", "mean probability of the control token over generated positions"),
    SignalSpec(r"ctrl/[^/]+/sampled", "tokens", "both", "share of generated tokens that are this control token"),
    SignalSpec(r"ctx/[^/]+/n", "tokens", "both", "generated positions found at that key context"),
    SignalSpec(r"ctx/[^/]+/[^/]+", "tokens", "up",
               "mean probability of the token at the key context in the rollouts (the context's expected token: down)"),
    SignalSpec(r"probe/mean_gold_logprob", "probe", "down", "mean log-prob of the gold tokens of the fixed probe"),
    SignalSpec(r"probe/[^/]+/gold", "probe|metrics", "down", "probe: probability of the gold next token at the key context"),
    SignalSpec(r"probe/[^/]+/[^/]+", "probe|metrics", "up",
               "probe: probability of the control token at the key context (the expected token: down)"),
    SignalSpec(r"attribution/[^/]+/(self|other|total)", "metrics", "up", "advantage-weighted logit push on the control token"),
    SignalSpec(r"kl", "metrics", "up", "KL to the reference policy"),
    SignalSpec(r"clip_ratio", "metrics", "up", "share of clipped ratios"),
    SignalSpec(r"clip_ratio/.+", "metrics", "up", "TRL: share of clipped ratios (region, low, high)"),
    SignalSpec(r"completions/clipped_ratio", "metrics", "up", "share of completions cut at the length limit"),
    SignalSpec(r"completions/(min|max|mean)_(terminated_)?length", "metrics", "both", "completion length statistics"),
    SignalSpec(r"rewards/[^/]+/mean", "metrics", "down", "mean of one reward function (TRL rewards/<name>/mean)"),
    SignalSpec(r"rewards/[^/]+/std", "metrics", "both", "std of one reward function (TRL rewards/<name>/std)"),
    SignalSpec(r"grad_norm", "metrics", "up", "gradient norm before clipping"),
    SignalSpec(r"(learning_rate|lr|epoch|step_time|num_tokens|global_step|loss|total_flos|train_loss|train_runtime|"
               r"train_samples_per_second|train_steps_per_second|rollouts/count)|(timing_s|timing_per_token_ms|perf|time|"
               r"throughput)/.+", "metrics", "both", "trainer bookkeeping (schedule, timing, counters)"),
    SignalSpec(r".*", "metrics", "both", "any other numeric metric, passed through"),
)
_SPEC_RE = [(re.compile(s.pattern + r"\Z"), s) for s in SIGNAL_SPECS]


def _spec(name: str) -> SignalSpec:
    for rx, spec in _SPEC_RE:
        if rx.match(name):
            return spec
    return SIGNAL_SPECS[-1]


def _context_token(name: str) -> tuple[str, str] | None:
    parts = name.split("/")
    if len(parts) == 3 and parts[0] in ("probe", "ctx") and parts[2] not in ("gold", "n"):
        return parts[1], parts[2]
    return None


def signal_direction(name: str, control_tokens: Sequence[Mapping[str, Any]] = ()) -> str:
    """Direction of concern of signal ``name``: ``up``, ``down`` or ``both``. With the control
    tokens, a key-context probability is ``down`` for the context's expected token
    (:data:`diagnose.control_tokens.KEY_CONTEXT_ROLES`)."""
    ct = _context_token(name)
    if ct is not None and control_tokens:
        ctx, tok = ct
        role = next((t.get("role") for t in control_tokens if t.get("name") == tok), None)
        roles = KEY_CONTEXT_ROLES.get(ctx)
        if roles is not None and role is not None and role == roles.get("expected"):
            return "down"
    return _spec(name).direction


def generic_signals(names: Iterable[str]) -> list[str]:
    """Signal names no `SignalSpec` gives a meaning (only the catch-all matches): they reach the
    generic change detection (the episodes' moves) but no dedicated detector. The scan lists them
    in its notes, so a signal a format carries is never silently ignored."""
    catch_all = SIGNAL_SPECS[-1]
    return sorted(n for n in names if n != "step" and _spec(n) is catch_all)


def signal_kind(name: str) -> str:
    """``probability`` for per-token probabilities (detected on a log scale), ``count`` for
    counts, else ``value``."""
    if name.startswith(("ctrl/", "ctx/", "probe/")) and not name.endswith(("/n", "/sampled", "mean_gold_logprob")):
        return "probability"
    if name in ("nonfinite_logprob", "n_tokens", "n_rollouts", "nonfinite_reward") or name.endswith("/n"):
        return "count"
    return "value"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _collect(lf: pl.LazyFrame) -> pl.DataFrame:
    return lf.collect(engine="streaming")


def _restrict(lf: pl.LazyFrame, steps: list[int] | None) -> pl.LazyFrame:
    if steps is None:
        return lf
    return lf.filter(pl.col("step").is_in(pl.Series(steps, dtype=pl.Int64).implode()))


def _f64(e: pl.Expr) -> pl.Expr:
    return e.cast(pl.Float64)


def _finite_or_null(e: pl.Expr) -> pl.Expr:
    """NaN and ±inf become null, so means skip them (non-finite values are counted apart)."""
    e = _f64(e)
    return pl.when(e.is_finite()).then(e)


def _steps_frame(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(pl.col("step").cast(pl.Int64)).sort("step")


def _join_steps(frames: Sequence[pl.DataFrame]) -> pl.DataFrame:
    frames = [f for f in frames if f is not None and "step" in f.columns]
    if not frames:
        return pl.DataFrame(schema={"step": pl.Int64})
    out = _steps_frame(frames[0])
    for f in frames[1:]:
        f = _steps_frame(f)
        dup = [c for c in f.columns if c != "step" and c in out.columns]
        if dup:
            f = f.drop(dup)
        out = out.join(f, on="step", how="full", coalesce=True)
    return out.sort("step")


def _pivot_counts(long: pl.DataFrame, key: str, prefix: str, totals: pl.DataFrame,
                  always: Sequence[str] = ()) -> pl.DataFrame:
    """(step, key, len) -> one column ``prefix + key`` per key value: len / total turns."""
    if long.height == 0:
        out = totals.select("step")
    else:
        wide = long.pivot(on=key, index="step", values="len", aggregate_function="sum")
        out = totals.select("step").join(wide.with_columns(pl.col("step").cast(pl.Int64)), on="step", how="left")
    for name in always:
        if name not in out.columns:
            out = out.with_columns(pl.lit(0, dtype=pl.Float64).alias(name))
    values = [c for c in out.columns if c != "step"]
    out = out.join(totals, on="step", how="left")
    return out.select(
        "step",
        *[(pl.col(c).fill_null(0).cast(pl.Float64) / pl.col("_turns").cast(pl.Float64)).alias(prefix + c)
          for c in values],
    )


# ---------------------------------------------------------------------------------------------
# rollouts
# ---------------------------------------------------------------------------------------------


def rollout_signals(rollouts: pl.LazyFrame) -> pl.DataFrame:
    """Signals from the rollouts table (on-policy rows only: hinted and off-policy rows, when
    flagged, are left out, as the trainer's own metrics do)."""
    schema = rollouts.collect_schema()
    lf = rollouts
    for flag in ("is_hint", "is_off_policy"):
        if flag in schema:
            lf = lf.filter(~pl.col(flag).fill_null(False))
    aggs: list[pl.Expr] = [pl.len().cast(pl.Float64).alias("n_rollouts")]
    if "reward" in schema:
        r = _finite_or_null(pl.col("reward"))
        aggs += [
            r.mean().alias("reward"),
            r.std(ddof=0).alias("reward_std"),
            (pl.col("reward").is_not_null() & ~_f64(pl.col("reward")).is_finite()).sum().cast(pl.Float64).alias("nonfinite_reward"),
        ]
    if "accuracy" in schema:
        aggs.append(_finite_or_null(pl.col("accuracy")).mean().alias("accuracy"))
    if "completion_chars" in schema:  # counted when the adapter read the text (which stays on disk)
        aggs.append(pl.col("completion_chars").cast(pl.Float64).mean().alias("completion_chars"))
    elif "completion" in schema:
        aggs.append(pl.col("completion").str.len_chars().cast(pl.Float64).mean().alias("completion_chars"))
    has_states = "turn_states" in schema and isinstance(schema["turn_states"], pl.List)
    if has_states:
        ts = pl.col("turn_states")
        aggs += [
            ts.list.len().cast(pl.Float64).mean().alias("turns_per_episode"),
            ts.list.eval(pl.element() == TurnState.HEALTHY_CALL.value).list.sum().cast(pl.Float64).mean()
            .alias("healthy_calls_per_episode"),
            ts.list.eval(pl.element() == TurnState.COLLAPSED.value).list.any().cast(pl.Float64).mean()
            .alias("rollouts/any_collapsed"),
        ]
    elif "n_turns" in schema:
        aggs.append(pl.col("n_turns").cast(pl.Float64).mean().alias("turns_per_episode"))
    named: dict[str, pl.LazyFrame] = {"main": lf.group_by("step").agg(aggs)}
    if "reward" in schema and "group_id" in schema:
        named["groups"] = (
            lf.group_by("step", "group_id")
            .agg(_finite_or_null(pl.col("reward")).std(ddof=0).alias("_s"), pl.len().alias("_n"))
            .filter(pl.col("_n") > 1)
            .group_by("step")
            .agg(pl.col("_s").mean().alias("group_reward_std"),
                 (pl.col("_s") < 1e-9).cast(pl.Float64).mean().alias("frac_reward_zero_std"))
        )
    if has_states:
        named["states"] = (lf.select("step", pl.col("turn_states").alias("_state")).explode("_state")
                           .drop_nulls("_state").group_by("step", "_state").len())
        if "error_types" in schema and isinstance(schema["error_types"], pl.List):
            named["errors"] = (lf.select("step", pl.col("error_types").alias("_err")).explode("_err")
                               .drop_nulls("_err").group_by("step", "_err").len())
    res = dict(zip(named, pl.collect_all(list(named.values()), engine="streaming")))
    frames = [res["main"]] + ([res["groups"]] if "groups" in res else [])
    if has_states:
        frames.append(turn_state_ci(lf))  # only when the turn states come from a sample
    if "states" in res:
        states = res["states"]
        totals = (states.group_by("step").agg(pl.col("len").sum().alias("_turns"))
                  .with_columns(pl.col("step").cast(pl.Int64)))
        frames.append(_pivot_counts(states.filter(pl.col("_state").is_in(_STATES)), "_state", "turn_state/",
                                    totals, always=_STATES))
        if "errors" in res and res["errors"].height:
            frames.append(_pivot_counts(res["errors"], "_err", "format_error/", totals))
    return _join_steps(frames)


# ---------------------------------------------------------------------------------------------
# tokens
# ---------------------------------------------------------------------------------------------


def _ids_by_role(control_tokens: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in control_tokens:
        role, tid = t.get("role"), t.get("token_id")
        if role and isinstance(tid, int) and not isinstance(tid, bool) and role not in out:
            out[role] = tid
    return out


def _seq_of(t: Mapping[str, Any]) -> tuple[int, ...] | None:
    """A control token's id sequence (``token_ids``; ``(token_id,)`` for a single token)."""
    ids = t.get("token_ids") or [t.get("token_id")]
    if not isinstance(ids, (list, tuple)) or not ids:
        return None
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return None
    return tuple(ids)


def _seq_ends(rows: pl.DataFrame, seq: tuple[int, ...], packer: _Packer) -> pl.DataFrame:
    """Rows of ``rows`` (step, sample_id, position, token_id) where ``seq`` ends: the last id,
    preceded at the positions before it by the rest (a single id: its rows)."""
    coded = rows.with_columns(packer.codes(rows).alias("_code"))
    ends = coded.filter((pl.col("token_id") == seq[-1]) & (pl.col("position") >= len(seq) - 1))
    for j in range(1, len(seq)):
        before = coded.filter(pl.col("token_id") == seq[-1 - j]).select((pl.col("_code") + j).alias("_code"))
        ends = ends.join(before, on="_code", how="semi")
    return ends.drop("_code")


@dataclass(frozen=True)
class _Packer:
    """Packs (step, sample_id, position) into one Int64: ``(step * S + sample) * P + position``."""

    s_mult: int
    p_mult: int
    min_step: int

    def expr(self) -> pl.Expr:
        return ((pl.col("step").cast(pl.Int64) - self.min_step) * self.s_mult
                + pl.col("sample_id").cast(pl.Int64)) * self.p_mult + pl.col("position").cast(pl.Int64)

    def codes(self, df: pl.DataFrame, offset: int = 0) -> pl.Series:
        return df.select(
            (((pl.col("step").cast(pl.Int64) - self.min_step) * self.s_mult + pl.col("sample_id").cast(pl.Int64))
             * self.p_mult + pl.col("position").cast(pl.Int64) + offset).alias("code")
        ).to_series()


def _packer(turns: pl.DataFrame) -> _Packer | None:
    if turns.height == 0:
        return None
    st = turns.select(pl.col("step").min().alias("a"), pl.col("step").max().alias("b"),
                      pl.col("sample_id").min().alias("c"), pl.col("sample_id").max().alias("d"),
                      pl.col("_last").max().alias("e"), pl.col("_first").min().alias("f")).row(0)
    lo_step, hi_step, lo_sample, hi_sample, hi_pos, lo_pos = st
    if lo_sample < 0 or lo_pos < 0:
        return None
    s_mult, p_mult = int(hi_sample) + 1, int(hi_pos) + 3  # targets up to position + 2
    if (int(hi_step) - int(lo_step) + 1) * s_mult * p_mult >= 2**62:
        return None
    return _Packer(s_mult, p_mult, int(lo_step))


def token_signals(tokens: pl.LazyFrame, control_tokens: Sequence[Mapping[str, Any]] = (), *,
                  low_prob: float = 0.01) -> pl.DataFrame:
    """Signals from the token table: entropy, low-probability share, non-finite log-probs,
    train/inference mismatch, completion length, per control token its mean probability and
    sampling rate, and its mean probability at the key contexts :data:`TOKEN_CONTEXTS`. A
    multi-token control string (``token_ids`` in run.json) counts as sampled where its whole
    sequence starts, and anchors a key context where its whole sequence ends; its ``p`` is that of
    its first token (what ``lp_ctrl_<name>`` holds).

    Passes over the table: turn structure (group_by step/sample/turn on 4 columns), anchors
    (filter on ``token_id``), newline check (filter + ``is_in``), then the main pass, which
    aggregates sums and counts by (step, context) in one streaming group_by.
    """
    schema = tokens.collect_schema()
    names = ctrl_names_from_columns(schema.names())
    roles = _ids_by_role(control_tokens)
    token_ids = {t.get("name"): t.get("token_id") for t in control_tokens}
    seqs: dict[str, tuple[int, ...]] = {}
    for t in control_tokens:
        q = _seq_of(t)
        if t.get("role") and q is not None and t["role"] not in seqs:
            seqs[t["role"]] = q
    multi = {t.get("name"): _seq_of(t) for t in control_tokens if (_seq_of(t) or ()) and len(_seq_of(t)) > 1}
    seq_starts: dict[str, pl.Series] = {}  # multi-token name -> codes of the positions its sequence starts at
    gen = pl.col("is_generated").fill_null(False) if "is_generated" in schema else pl.lit(True)
    gtok = tokens.filter(gen)
    has_keys = all(c in schema for c in ("step", "sample_id", "position"))

    # ---- pass 1: turn structure -> samples per step, turn starts, key packing
    turns = None
    if has_keys:
        by = ["step", "sample_id"] + (["turn"] if "turn" in schema else [])
        turns = _collect(gtok.group_by(by).agg(pl.col("position").min().alias("_first"),
                                               pl.col("position").max().alias("_last")))
    packer = _packer(turns) if turns is not None else None
    keys: dict[str, pl.Series] = {}
    if packer is not None:
        if "turn" in schema:
            keys["turn_start"] = packer.codes(turns.rename({"_first": "position"}))
        open_seq, close_seq, nl_id = seqs.get("call_open"), seqs.get("call_close"), roles.get("call_newline")
        anchor_seqs = [q for q in (open_seq, close_seq) if q is not None] + list(multi.values())
        if anchor_seqs and "token_id" in schema:
            # a multi-token tag (SmolLM2's 5-token <tool_call>) is found where its whole sequence
            # ends, never at its first token ('<' starts any tag)
            anchors = _collect(gtok.filter(pl.col("token_id").is_in(sorted({i for q in anchor_seqs for i in q})))
                               .select("step", "sample_id", "position", "token_id"))
            for n, q in multi.items():
                seq_starts[n] = packer.codes(_seq_ends(anchors, q, packer), offset=1 - len(q))
            if open_seq is not None:
                opens = _seq_ends(anchors, open_seq, packer)
                if nl_id is not None:
                    nl_codes = packer.codes(opens, offset=1)
                    nls = _collect(gtok.filter((pl.col("token_id") == nl_id)
                                               & packer.expr().is_in(nl_codes.implode()))
                                   .select("step", "sample_id", "position"))
                    keys["after_call_open"] = packer.codes(nls, offset=1)
                else:
                    keys["after_call_open"] = packer.codes(opens, offset=1)
            if close_seq is not None:
                keys["after_call_close"] = packer.codes(_seq_ends(anchors, close_seq, packer), offset=1)

    # ---- pass 2: everything else, by (step, context)
    ctx = pl.lit(0, dtype=pl.Int8)
    if keys:
        chain = None
        for name in ("after_call_open", "after_call_close", "turn_start"):  # precedence
            if name in keys and len(keys[name]):
                cond = packer.expr().is_in(keys[name].implode())
                chain = (pl.when(cond) if chain is None else chain.when(cond)).then(pl.lit(_CTX_CODE[name], pl.Int8))
        if chain is not None:
            ctx = chain.otherwise(pl.lit(0, pl.Int8))
    means: dict[str, pl.Expr] = {}
    counts: dict[str, pl.Expr] = {}
    if "entropy" in schema:
        means["entropy"] = _finite_or_null(pl.col("entropy"))
    if "logprob" in schema:
        lp = _f64(pl.col("logprob"))
        means["low_prob_share"] = pl.when(lp.is_finite()).then((lp < math.log(low_prob)).cast(pl.Float64))
        counts["nonfinite_logprob"] = (pl.col("logprob").is_not_null() & ~lp.is_finite()).cast(pl.Int64)
        if "sampler_logprob" in schema:
            slp = _f64(pl.col("sampler_logprob"))
            means["mismatch/abs_logprob_diff"] = pl.when(lp.is_finite() & slp.is_finite()).then((lp - slp).abs())
    # a token whose log-prob is known only where it was sampled ("lp_coverage": "sampled", e.g.
    # open-instruct traces): averaging that column would average over the positions that drew it
    # (near 1 whatever the policy); the sampling indicator estimates its probability without bias
    # at each position, so its mean, overall or at a key context, is the mean probability there
    sampled_only = {t.get("name") for t in control_tokens if t.get("lp_coverage") == "sampled"}
    for n in names:
        tid = token_ids.get(n)
        has_id = isinstance(tid, int) and "token_id" in schema
        if n in sampled_only and has_id:
            means[f"ctrl/{n}/p"] = (pl.col("token_id") == tid).cast(pl.Float64)
        else:
            means[f"ctrl/{n}/p"] = _finite_or_null(pl.col(CTRL_PREFIX + n).cast(pl.Float64).exp())
        if has_id:
            means[f"ctrl/{n}/sampled"] = (pl.col("token_id") == tid).cast(pl.Float64)
    for n, starts in seq_starts.items():  # a multi-token string is sampled where its whole sequence is
        if n in names:
            ind = packer.expr().is_in(starts.implode()).cast(pl.Float64)
            means[f"ctrl/{n}/sampled"] = ind
            if any(t.get("name") == n and t.get("lp_coverage") == "sampled" for t in control_tokens):
                means[f"ctrl/{n}/p"] = ind
    cols = [f"_m{i}" for i in range(len(means))]
    pre = gtok.select(
        pl.col("step").cast(pl.Int64), ctx.alias("_ctx"),
        *[e.alias(c) for c, e in zip(cols, means.values())],
        *[e.alias(f"_c_{k}") for k, e in enumerate(counts.values())],
    )
    aggs = [pl.len().alias("_n")]
    for c in cols:
        aggs += [pl.col(c).sum().alias(c + "_s"), pl.col(c).count().alias(c + "_k")]
    aggs += [pl.col(f"_c_{k}").sum() for k in range(len(counts))]
    part = _collect(pre.group_by("step", "_ctx").agg(aggs))

    def ratio(s: str, k: str) -> pl.Expr:
        return pl.when(pl.col(k) > 0).then(pl.col(s).cast(pl.Float64) / pl.col(k).cast(pl.Float64))

    total = part.group_by("step").agg(pl.exclude("_ctx").sum())
    out = total.select(
        "step",
        *[ratio(c + "_s", c + "_k").alias(name) for c, name in zip(cols, means)],
        *[pl.col(f"_c_{k}").cast(pl.Float64).alias(name) for k, name in enumerate(counts)],
        pl.col("_n").cast(pl.Float64).alias("n_tokens"),
    )
    if "nonfinite_logprob" in counts:
        out = out.with_columns((pl.col("nonfinite_logprob") / pl.col("n_tokens")).alias("nonfinite_logprob_share"))
    if turns is not None and turns.height:
        per_step = turns.group_by("step").agg(pl.col("sample_id").n_unique().alias("_samples"))
        out = out.join(per_step.with_columns(pl.col("step").cast(pl.Int64)), on="step", how="left").with_columns(
            (pl.col("n_tokens") / pl.col("_samples").cast(pl.Float64)).alias("completions/mean_length")
        ).drop("_samples")
    frames = [out]
    for name in keys:
        code = _CTX_CODE[name]
        sub = part.filter(pl.col("_ctx") == code)
        p_cols = [(c, m) for c, m in zip(cols, means) if m.startswith("ctrl/") and m.endswith("/p")]
        frames.append(sub.select(
            "step",
            pl.col("_n").cast(pl.Float64).alias(f"ctx/{name}/n"),
            *[ratio(c + "_s", c + "_k").alias(f"ctx/{name}/{m.split('/')[1]}") for c, m in p_cols],
        ))
    res = _join_steps(frames)
    for name in keys:  # steps where the context never occurred: 0 positions, probabilities unknown
        if f"ctx/{name}/n" in res.columns:
            res = res.with_columns(pl.col(f"ctx/{name}/n").fill_null(0.0))
    return res


# ---------------------------------------------------------------------------------------------
# probe
# ---------------------------------------------------------------------------------------------


def probe_signals(probe: pl.LazyFrame) -> pl.DataFrame:
    """``probe/<context>/<token>`` and ``probe/<context>/gold`` (mean probabilities at each key
    context of the fixed probe, as :func:`diagnose.model.ctrl_probe.probe_summary`; for a
    multi-token control string, of its whole sequence where the probe has ``lpseq_ctrl_<name>``),
    plus ``probe/mean_gold_logprob`` over all probe positions."""
    schema = probe.collect_schema()
    names = ctrl_names_from_columns(schema.names())
    queries = []
    if "lp_gold" in schema:
        queries.append(probe.group_by("step").agg(
            _finite_or_null(pl.col("lp_gold")).mean().alias("probe/mean_gold_logprob")))
    has_ctx = "context" in schema
    if has_ctx:
        vals = ([_finite_or_null(pl.col("lp_gold").cast(pl.Float64).exp()).mean().alias("gold")] if "lp_gold" in schema else [])
        # a multi-token string's probability is its whole sequence's (lpseq_ctrl_<name>) where the probe has it
        vals += [_finite_or_null(pl.col((CTRL_SEQ_PREFIX if CTRL_SEQ_PREFIX + n in schema else CTRL_PREFIX) + n)
                                 .cast(pl.Float64).exp()).mean().alias(n) for n in names]
        if vals:
            queries.append(probe.filter(pl.col("context").is_not_null() & (pl.col("context") != ""))
                           .group_by("step", "context").agg(vals))
    if not queries:
        return pl.DataFrame(schema={"step": pl.Int64})
    results = pl.collect_all(queries, engine="streaming")
    frames = []
    if "lp_gold" in schema:
        frames.append(results[0])
    if len(results) > len(frames):
        by_ctx = results[-1]
        if by_ctx.height:
            long = by_ctx.unpivot(index=["step", "context"], variable_name="_tok", value_name="_v").with_columns(
                (pl.lit("probe/") + pl.col("context") + pl.lit("/") + pl.col("_tok")).alias("_name"))
            frames.append(long.pivot(on="_name", index="step", values="_v", aggregate_function="first"))
    return _join_steps(frames)


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def metric_signals(metrics: pl.LazyFrame | pl.DataFrame) -> pl.DataFrame:
    """Every numeric (or boolean) metric column, as Float64, one row per step."""
    lf = metrics.lazy() if isinstance(metrics, pl.DataFrame) else metrics
    schema = lf.collect_schema()
    if "step" not in schema:
        return pl.DataFrame(schema={"step": pl.Int64})
    keep = [c for c, t in schema.items() if c != "step" and (t.is_numeric() or t == pl.Boolean)]
    df = lf.select(pl.col("step").cast(pl.Int64), *[pl.col(c).cast(pl.Float64) for c in keep]).collect()
    if df.height and df.get_column("step").is_duplicated().any():
        df = df.group_by("step", maintain_order=True).last()
    return df.sort("step")


# ---------------------------------------------------------------------------------------------
# all together
# ---------------------------------------------------------------------------------------------


def step_signals(src: RunSource, steps: Iterable[int] | None = None, *, low_prob: float = 0.01) -> pl.DataFrame:
    """One row per step (sorted), one Float64 column per signal (``step`` is Int64).

    Rollout-, token- and probe-derived signals come first; then every numeric metric whose
    name is not already derived (a metric fills a derived name only where the derived column
    is entirely null). ``steps``: compute only those steps (for incremental caches; see
    :func:`merge_signals`). ``low_prob``: threshold of ``low_prob_share``.
    """
    wanted = None if steps is None else sorted({int(s) for s in steps})
    derived: list[pl.DataFrame] = []

    def table(kind: str, lf: pl.LazyFrame) -> pl.LazyFrame:
        if wanted is not None and src.scan_steps is not None:
            return src.scan_steps(kind, wanted)  # only those steps' files are opened, their rows kept
        return _restrict(lf, wanted)

    if src.rollouts is not None:
        derived.append(rollout_signals(table("rollouts", src.rollouts)))
    if src.tokens is not None:
        derived.append(token_signals(table("tokens", src.tokens), src.control_tokens, low_prob=low_prob))
    if src.probe is not None:
        derived.append(probe_signals(table("probe", src.probe)))
    metrics = metric_signals(_restrict(src.metrics, wanted)) if src.metrics is not None else None
    out = combine_signals(_join_steps(derived), metrics)
    if wanted is not None:
        out = out.filter(pl.col("step").is_in(wanted))
    return out.sort("step")


def combine_signals(derived: pl.DataFrame, metrics: pl.DataFrame | None) -> pl.DataFrame:
    """The full signal table from the derived (rollouts/tokens/probe) and the metrics layer, by
    the rule of `step_signals`: a metric of a derived name is dropped unless the derived column
    is entirely null. Columns sorted by name."""
    out = derived
    full_null = [c for c in out.columns if c != "step" and out.get_column(c).null_count() == out.height]
    if metrics is not None and metrics.width > 1:
        clash = [c for c in metrics.columns if c != "step" and c in out.columns and c not in full_null]
        metrics = metrics.drop(clash)
        replace = [c for c in metrics.columns if c in full_null]
        if replace:
            out = out.drop(replace)
        out = _join_steps([out, metrics]) if out.height or out.width > 1 else metrics
    # columns sorted by name: polars' pivots/group_bys give no stable column order, and the
    # detection breaks ties between equally strong moves by column order
    out = out.select(pl.col("step").cast(pl.Int64), *[pl.col(c).cast(pl.Float64) for c in sorted(out.columns)
                                                      if c != "step"])
    return out.sort("step")


def merge_signals(old: pl.DataFrame | None, new: pl.DataFrame) -> pl.DataFrame:
    """Merge signals computed for some steps (``new``) into earlier ones: rows of ``new`` replace
    the same steps of ``old``; columns are the union (missing values null)."""
    if old is None or old.height == 0:
        return new.sort("step")
    kept = old.filter(~pl.col("step").is_in(new.get_column("step").implode()))
    return pl.concat([kept, new], how="diagonal_relaxed").sort("step")
