"""Signals from the token table: entropy, low-probability share, non-finite log-probs,
train/inference mismatch, completion length, and per control token its mean probability and
sampling rate, over all generated positions and at the key contexts :data:`TOKEN_CONTEXTS`.

The table can hold 50M+ rows, so the key contexts are found without sorting or window
functions, in a few lazy passes collected with the streaming engine:

1. **turns**: first and last generated position of each (step, sample, turn) (`_turn_spans`);
   they size a `_Packer`, which packs (step, sample, position) into one Int64 code per row;
2. **anchors**: the generated ``<tool_call>`` / ``</tool_call>`` tokens (whole id sequences for
   a multi-token tag) give the codes of the rows after them (`_key_context_rows`);
3. **main pass**: every generated row is labelled with its key context (``is_in`` on those
   codes) and summed by (step, context) in one group_by (`_sums_by_context`); the signals are
   the ratios of those sums, over the step and per context.

A multi-token control string (``token_ids`` in run.json) counts as sampled where its whole
sequence starts, and anchors a key context where its whole sequence ends; its ``p`` is that of
its first token (what ``lp_ctrl_<name>`` holds).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from diagnose.rundir.schema import CTRL_PREFIX, ctrl_names_from_columns
from diagnose.scan.frames import as_f64, collect, finite_or_null, join_steps
from diagnose.scan.names import CTRL, CTX, TokenSignal, context_count_signal, ctrl_signal

__all__ = ["TOKEN_CONTEXTS", "token_signals"]

#: Key contexts identifiable in a token table (``after_call_body`` needs the probe: on rollouts
#: the end of a call body is only known once ``</tool_call>`` was sampled, a biased selection).
TOKEN_CONTEXTS: tuple[str, ...] = ("turn_start", "after_call_open", "after_call_close")
_CONTEXT_CODE = {name: i + 1 for i, name in enumerate(TOKEN_CONTEXTS)}
#: A row at several key contexts is labelled with the first of these.
_CONTEXT_PRECEDENCE = ("after_call_open", "after_call_close", "turn_start")

# columns of the main pass: the key context of a row, the rows summed
_CONTEXT, _ROWS = "_context", "_rows"


def token_signals(tokens: pl.LazyFrame, control_tokens: Sequence[Mapping[str, Any]] = (), *,
                  low_prob: float = 0.01) -> pl.DataFrame:
    """One row per step: ``entropy``, ``low_prob_share`` (sampled with p < ``low_prob``),
    ``nonfinite_logprob`` (count and share), ``mismatch/abs_logprob_diff``, ``n_tokens``,
    ``completions/mean_length``, ``ctrl/<token>/p`` and ``/sampled``, and at each key context
    found ``ctx/<context>/n`` and ``ctx/<context>/<token>`` (module docstring: how)."""
    schema = tokens.collect_schema()
    controls = _Controls.of(control_tokens, schema.names())
    generated = tokens.filter(pl.col("is_generated").fill_null(False) if "is_generated" in schema else pl.lit(True))
    turns = _turn_spans(generated, schema)
    packer = _packer(turns) if turns is not None else None
    contexts, starts = ({}, {}) if packer is None else _key_context_rows(generated, schema, turns, packer, controls)
    means, counts = _position_values(schema, controls, starts, packer, low_prob)
    sums = _sums_by_context(generated, _context_label(contexts, packer), means, counts)
    out = join_steps([_step_means(sums, means, counts, turns), *_context_means(sums, contexts, means)])
    for context in contexts:  # steps where the context never occurred: 0 positions, probabilities unknown
        found = context_count_signal(context)
        if found in out.columns:
            out = out.with_columns(pl.col(found).fill_null(0.0))
    return out


# ---------------------------------------------------------------------------------------------
# the control tokens, as the passes use them
# ---------------------------------------------------------------------------------------------


def _seq_of(t: Mapping[str, Any]) -> tuple[int, ...] | None:
    """A control token's id sequence (``token_ids``; ``(token_id,)`` for a single token)."""
    ids = t.get("token_ids") or [t.get("token_id")]
    if not isinstance(ids, (list, tuple)) or not ids:
        return None
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return None
    return tuple(ids)


def _first_id_of_role(control_tokens: Sequence[Mapping[str, Any]], role: str) -> int | None:
    return next((t["token_id"] for t in control_tokens if t.get("role") == role
                 and isinstance(t.get("token_id"), int) and not isinstance(t.get("token_id"), bool)), None)


@dataclass(frozen=True)
class _Controls:
    """The run's control tokens (run.json form), as the token signals use them."""

    names: list[str]  # those with a log-prob column (lp_ctrl_<name>)
    token_id: dict[str, Any]  # name -> its (first) token id
    role_seq: dict[str, tuple[int, ...]]  # role -> id sequence of the first token of that role
    newline_id: int | None  # the newline that follows <tool_call> (role call_newline)
    multi: dict[str, tuple[int, ...]]  # multi-token strings: name -> id sequence
    sampled_only: frozenset[str]  # log-prob known only where sampled ("lp_coverage": "sampled")

    @classmethod
    def of(cls, control_tokens: Sequence[Mapping[str, Any]], columns: Iterable[str]) -> _Controls:
        role_seq: dict[str, tuple[int, ...]] = {}
        for t in control_tokens:
            seq = _seq_of(t)
            if t.get("role") and seq is not None:
                role_seq.setdefault(t["role"], seq)
        multi = {t.get("name"): seq for t in control_tokens if (seq := _seq_of(t)) and len(seq) > 1}
        return cls(names=ctrl_names_from_columns(list(columns)),
                   token_id={t.get("name"): t.get("token_id") for t in control_tokens},
                   role_seq=role_seq, newline_id=_first_id_of_role(control_tokens, "call_newline"), multi=multi,
                   sampled_only=frozenset(t.get("name") for t in control_tokens if t.get("lp_coverage") == "sampled"))


# ---------------------------------------------------------------------------------------------
# passes 1 and 2: turns, packed row codes, key contexts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Packer:
    """Packs (step, sample_id, position) into one Int64: ``(step * S + sample) * P + position``."""

    s_mult: int
    p_mult: int
    min_step: int

    def expr(self) -> pl.Expr:
        return ((pl.col("step").cast(pl.Int64) - self.min_step) * self.s_mult
                + pl.col("sample_id").cast(pl.Int64)) * self.p_mult + pl.col("position").cast(pl.Int64)

    def codes(self, rows: pl.DataFrame, offset: int = 0) -> pl.Series:
        """The codes of ``rows`` (step, sample_id, position), moved ``offset`` positions on."""
        return rows.select((self.expr() + offset).alias("code")).to_series()


def _turn_spans(generated: pl.LazyFrame, schema: pl.Schema) -> pl.DataFrame | None:
    """Pass 1: first and last generated position of each (step, sample[, turn]); None without
    the key columns."""
    if not all(c in schema for c in ("step", "sample_id", "position")):
        return None
    by = ["step", "sample_id"] + (["turn"] if "turn" in schema else [])
    return collect(generated.group_by(by).agg(pl.col("position").min().alias("first"),
                                              pl.col("position").max().alias("last")))


def _packer(turns: pl.DataFrame) -> _Packer | None:
    """A packer for the rows of these turns; None when there are none, an id or position is
    negative, or the codes would not fit an Int64."""
    if turns.height == 0:
        return None
    lo_step, hi_step, lo_sample, hi_sample, hi_pos, lo_pos = turns.select(
        pl.col("step").min().alias("lo_step"), pl.col("step").max().alias("hi_step"),
        pl.col("sample_id").min().alias("lo_sample"), pl.col("sample_id").max().alias("hi_sample"),
        pl.col("last").max().alias("hi_pos"), pl.col("first").min().alias("lo_pos")).row(0)
    if lo_sample < 0 or lo_pos < 0:
        return None
    s_mult, p_mult = int(hi_sample) + 1, int(hi_pos) + 3  # targets up to position + 2
    if (int(hi_step) - int(lo_step) + 1) * s_mult * p_mult >= 2**62:
        return None
    return _Packer(s_mult, p_mult, int(lo_step))


def _seq_ends(rows: pl.DataFrame, seq: tuple[int, ...], packer: _Packer) -> pl.DataFrame:
    """Rows of ``rows`` (step, sample_id, position, token_id) where ``seq`` ends: the last id,
    preceded at the positions before it by the rest (a single id: its rows)."""
    coded = rows.with_columns(packer.codes(rows).alias("_code"))
    ends = coded.filter((pl.col("token_id") == seq[-1]) & (pl.col("position") >= len(seq) - 1))
    for j in range(1, len(seq)):
        before = coded.filter(pl.col("token_id") == seq[-1 - j]).select((pl.col("_code") + j).alias("_code"))
        ends = ends.join(before, on="_code", how="semi")
    return ends.drop("_code")


def _key_context_rows(generated: pl.LazyFrame, schema: pl.Schema, turns: pl.DataFrame, packer: _Packer,
                      controls: _Controls) -> tuple[dict[str, pl.Series], dict[str, pl.Series]]:
    """Pass 2: the codes of the rows at each key context found, and of the rows where each
    multi-token string starts. A multi-token tag (SmolLM2's 5-token ``<tool_call>``) is found
    where its whole sequence ends, never at its first token (``<`` starts any tag)."""
    contexts: dict[str, pl.Series] = {}
    starts: dict[str, pl.Series] = {}
    if "turn" in schema:
        contexts["turn_start"] = packer.codes(turns.rename({"first": "position"}))
    open_seq, close_seq = controls.role_seq.get("call_open"), controls.role_seq.get("call_close")
    anchor_seqs = [q for q in (open_seq, close_seq) if q is not None] + list(controls.multi.values())
    if not anchor_seqs or "token_id" not in schema:
        return contexts, starts
    anchor_ids = sorted({i for q in anchor_seqs for i in q})
    anchors = collect(generated.filter(pl.col("token_id").is_in(anchor_ids))
                      .select("step", "sample_id", "position", "token_id"))
    for name, seq in controls.multi.items():
        starts[name] = packer.codes(_seq_ends(anchors, seq, packer), offset=1 - len(seq))
    if open_seq is not None:
        contexts["after_call_open"] = _after_call_open(generated, anchors, open_seq, controls.newline_id, packer)
    if close_seq is not None:
        contexts["after_call_close"] = packer.codes(_seq_ends(anchors, close_seq, packer), offset=1)
    return contexts, starts


def _after_call_open(generated: pl.LazyFrame, anchors: pl.DataFrame, open_seq: tuple[int, ...],
                     newline_id: int | None, packer: _Packer) -> pl.Series:
    """The rows after a generated ``<tool_call>`` and, where the format has one, the newline
    generated right after it."""
    after_open = packer.codes(_seq_ends(anchors, open_seq, packer), offset=1)
    if newline_id is None:
        return after_open
    newlines = collect(generated.filter((pl.col("token_id") == newline_id) & packer.expr().is_in(after_open.implode()))
                       .select("step", "sample_id", "position"))
    return packer.codes(newlines, offset=1)


def _context_label(contexts: Mapping[str, pl.Series], packer: _Packer | None) -> pl.Expr:
    """The Int8 code of the key context each row is at (0: none; `_CONTEXT_PRECEDENCE`)."""
    label = None
    for name in _CONTEXT_PRECEDENCE:
        if name in contexts and len(contexts[name]):
            at = packer.expr().is_in(contexts[name].implode())
            label = (pl.when(at) if label is None else label.when(at)).then(pl.lit(_CONTEXT_CODE[name], pl.Int8))
    return pl.lit(0, dtype=pl.Int8) if label is None else label.otherwise(pl.lit(0, pl.Int8))


# ---------------------------------------------------------------------------------------------
# pass 3: values per position, summed by (step, context)
# ---------------------------------------------------------------------------------------------


def _position_values(schema: pl.Schema, controls: _Controls, starts: Mapping[str, pl.Series],
                     packer: _Packer | None, low_prob: float) -> tuple[dict[str, pl.Expr], dict[str, pl.Expr]]:
    """Per generated row, by signal name: the value averaged into it (null: left out of the
    mean), and the values counted (summed)."""
    means: dict[str, pl.Expr] = {}
    counts: dict[str, pl.Expr] = {}
    if "entropy" in schema:
        means["entropy"] = finite_or_null(pl.col("entropy"))
    if "logprob" in schema:
        lp = as_f64(pl.col("logprob"))
        means["low_prob_share"] = pl.when(lp.is_finite()).then((lp < math.log(low_prob)).cast(pl.Float64))
        counts["nonfinite_logprob"] = (pl.col("logprob").is_not_null() & ~lp.is_finite()).cast(pl.Int64)
        if "sampler_logprob" in schema:
            slp = as_f64(pl.col("sampler_logprob"))
            means["mismatch/abs_logprob_diff"] = pl.when(lp.is_finite() & slp.is_finite()).then((lp - slp).abs())
    means.update(_control_token_values(schema, controls, starts, packer))
    return means, counts


def _control_token_values(schema: pl.Schema, controls: _Controls, starts: Mapping[str, pl.Series],
                          packer: _Packer | None) -> dict[str, pl.Expr]:
    """``ctrl/<token>/p`` and ``ctrl/<token>/sampled`` per generated row. A token whose log-prob
    is known only where it was sampled (``"lp_coverage": "sampled"``, e.g. open-instruct traces)
    would average near 1 over the positions that drew it, whatever the policy; its sampling
    indicator estimates its probability without bias at each position instead, so its mean,
    overall or at a key context, is the mean probability there."""
    values: dict[str, pl.Expr] = {}
    for name in controls.names:
        tid = controls.token_id.get(name)
        has_id = isinstance(tid, int) and "token_id" in schema
        sampled = (pl.col("token_id") == tid).cast(pl.Float64) if has_id else None
        if name in controls.sampled_only and sampled is not None:
            values[ctrl_signal(name, "p")] = sampled
        else:
            values[ctrl_signal(name, "p")] = finite_or_null(pl.col(CTRL_PREFIX + name).cast(pl.Float64).exp())
        if sampled is not None:
            values[ctrl_signal(name, "sampled")] = sampled
    for name, start in starts.items():  # a multi-token string is sampled where its whole sequence is
        if name in controls.names:
            sampled = packer.expr().is_in(start.implode()).cast(pl.Float64)
            values[ctrl_signal(name, "sampled")] = sampled
            if name in controls.sampled_only:
                values[ctrl_signal(name, "p")] = sampled
    return values


def _sum_of(name: str) -> str:
    return f"sum({name})"


def _count_of(name: str) -> str:
    return f"count({name})"


def _sums_by_context(generated: pl.LazyFrame, context: pl.Expr, means: Mapping[str, pl.Expr],
                     counts: Mapping[str, pl.Expr]) -> pl.DataFrame:
    """The main pass: per (step, context), the rows, and per signal the sum and the number of
    its non-null values (means) or its sum (counts)."""
    per_row = generated.select(pl.col("step").cast(pl.Int64), context.alias(_CONTEXT),
                               *[e.alias(name) for name, e in means.items()],
                               *[e.alias(name) for name, e in counts.items()])
    aggs = [pl.len().alias(_ROWS)]
    for name in means:
        aggs += [pl.col(name).sum().alias(_sum_of(name)), pl.col(name).count().alias(_count_of(name))]
    aggs += [pl.col(name).sum() for name in counts]
    return collect(per_row.group_by("step", _CONTEXT).agg(aggs))


def _mean(name: str) -> pl.Expr:
    total, n = pl.col(_sum_of(name)), pl.col(_count_of(name))
    return pl.when(n > 0).then(total.cast(pl.Float64) / n.cast(pl.Float64))


def _step_means(sums: pl.DataFrame, means: Mapping[str, pl.Expr], counts: Mapping[str, pl.Expr],
                turns: pl.DataFrame | None) -> pl.DataFrame:
    """The signals over every generated position of a step."""
    total = sums.group_by("step").agg(pl.exclude(_CONTEXT).sum())
    out = total.select(
        "step",
        *[_mean(name).alias(name) for name in means],
        *[pl.col(name).cast(pl.Float64) for name in counts],
        pl.col(_ROWS).cast(pl.Float64).alias("n_tokens"),
    )
    if "nonfinite_logprob" in counts:
        out = out.with_columns((pl.col("nonfinite_logprob") / pl.col("n_tokens")).alias("nonfinite_logprob_share"))
    if turns is not None and turns.height:
        samples = turns.group_by("step").agg(pl.col("sample_id").n_unique().alias("_samples"))
        out = out.join(samples.with_columns(pl.col("step").cast(pl.Int64)), on="step", how="left").with_columns(
            (pl.col("n_tokens") / pl.col("_samples").cast(pl.Float64)).alias("completions/mean_length")
        ).drop("_samples")
    return out


def _context_means(sums: pl.DataFrame, contexts: Iterable[str], means: Mapping[str, pl.Expr]) -> list[pl.DataFrame]:
    """Per key context: its positions and the control-token probabilities there."""
    probabilities = [sig for sig in map(TokenSignal.parse, means) if sig is not None and sig.family == CTRL]
    return [
        sums.filter(pl.col(_CONTEXT) == _CONTEXT_CODE[context]).select(
            "step",
            pl.col(_ROWS).cast(pl.Float64).alias(context_count_signal(context)),
            *[_mean(sig.name).alias(TokenSignal(CTX, context, sig.token).name) for sig in probabilities],
        )
        for context in contexts
    ]
