"""Per-step signals of a run: one row per step, one column per signal, from whatever tables a
:class:`diagnose.source.RunSource` has.

    step_signals(src)      # rollouts -> rollout_signals, tokens -> token_signals, probe -> probe_signals,
                           # metrics -> metric_signals; joined by step (combine_signals)

Everything is a lazy polars pipeline ending in a ``group_by("step")`` (or ``("step", ...)``)
collected with the streaming engine, so the token table (50M+ rows) is never materialised. The
token table's signals, with the key contexts, are `diagnose.scan.token_signals`. What each
signal means and its direction of concern: `diagnose.scan.names` (``SIGNAL_SPECS``) and
``docs/scan.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import polars as pl

from diagnose.rundir.schema import CTRL_PREFIX, CTRL_SEQ_PREFIX, ctrl_names_from_columns
from diagnose.scan.frames import as_f64, finite_or_null, join_steps, restrict_steps
from diagnose.scan.names import PROBE, token_signal_expr
from diagnose.scan.token_signals import token_signals
from diagnose.source import RunSource, on_policy
from diagnose.turns import TurnState

__all__ = ["combine_signals", "merge_signals", "metric_signals", "probe_signals", "rollout_signals", "step_signals"]

_STATES = tuple(s.value for s in TurnState)


# ---------------------------------------------------------------------------------------------
# rollouts
# ---------------------------------------------------------------------------------------------


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


def rollout_signals(rollouts: pl.LazyFrame) -> pl.DataFrame:
    """Signals from the rollouts table (on-policy rows only: hinted and off-policy rows, when
    flagged, are left out, as the trainer's own metrics do)."""
    schema = rollouts.collect_schema()
    lf = rollouts.filter(on_policy(schema.names()))
    aggs: list[pl.Expr] = [pl.len().cast(pl.Float64).alias("n_rollouts")]
    if "reward" in schema:
        r = finite_or_null(pl.col("reward"))
        aggs += [
            r.mean().alias("reward"),
            r.std(ddof=0).alias("reward_std"),
            (pl.col("reward").is_not_null() & ~as_f64(pl.col("reward")).is_finite()).sum().cast(pl.Float64).alias("nonfinite_reward"),
        ]
    if "accuracy" in schema:
        aggs.append(finite_or_null(pl.col("accuracy")).mean().alias("accuracy"))
    if "completion" in schema:
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
            .agg(finite_or_null(pl.col("reward")).std(ddof=0).alias("_s"), pl.len().alias("_n"))
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
    if "states" in res:
        states = res["states"]
        totals = (states.group_by("step").agg(pl.col("len").sum().alias("_turns"))
                  .with_columns(pl.col("step").cast(pl.Int64)))
        frames.append(_pivot_counts(states.filter(pl.col("_state").is_in(_STATES)), "_state", "turn_state/",
                                    totals, always=_STATES))
        if "errors" in res and res["errors"].height:
            frames.append(_pivot_counts(res["errors"], "_err", "format_error/", totals))
    return join_steps(frames)


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
            finite_or_null(pl.col("lp_gold")).mean().alias("probe/mean_gold_logprob")))
    has_ctx = "context" in schema
    if has_ctx:
        vals = ([finite_or_null(pl.col("lp_gold").cast(pl.Float64).exp()).mean().alias("gold")] if "lp_gold" in schema else [])
        # a multi-token string's probability is its whole sequence's (lpseq_ctrl_<name>) where the probe has it
        vals += [finite_or_null(pl.col((CTRL_SEQ_PREFIX if CTRL_SEQ_PREFIX + n in schema else CTRL_PREFIX) + n)
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
                token_signal_expr(PROBE, pl.col("context"), pl.col("_tok")).alias("_name"))
            frames.append(long.pivot(on="_name", index="step", values="_v", aggregate_function="first"))
    return join_steps(frames)


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
        return restrict_steps(lf, wanted)

    if src.rollouts is not None:
        derived.append(rollout_signals(table("rollouts", src.rollouts)))
    if src.tokens is not None:
        derived.append(token_signals(table("tokens", src.tokens), src.control_tokens, low_prob=low_prob))
    if src.probe is not None:
        derived.append(probe_signals(table("probe", src.probe)))
    metrics = metric_signals(restrict_steps(src.metrics, wanted)) if src.metrics is not None else None
    out = combine_signals(join_steps(derived), metrics)
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
        out = join_steps([out, metrics]) if out.height or out.width > 1 else metrics
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
