"""Run-directory format v1: constants, table schemas and frame validation.

The human-readable spec is ``docs/run-format.md``; this module is the
machine-readable one.  Each table (rollouts / tokens / probe) is described by
a tuple of :class:`Column` specs; ``*_schema()`` turn them into
``polars.Schema`` objects, and :func:`conform` casts/validates a DataFrame
against a spec with clear error messages.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

__all__ = [
    "CTRL_PREFIX",
    "CTRL_SEQ_PREFIX",
    "Column",
    "KINDS",
    "PROBE_COLUMNS",
    "PROBE_SCHEMA",
    "ROLLOUTS_COLUMNS",
    "ROLLOUTS_SCHEMA",
    "RUN_FORMAT",
    "RUN_FORMAT_VERSION",
    "RunFormatError",
    "TOKENS_COLUMNS",
    "TOKENS_SCHEMA",
    "columns_for",
    "conform",
    "ctrl_column",
    "ctrl_seq_column",
    "ctrl_names_from_columns",
    "parse_step_filename",
    "probe_schema",
    "rollouts_schema",
    "schema_for",
    "step_dirname",
    "step_filename",
    "step_value",
    "MAX_STEP",
    "tokens_schema",
    "validate_schema",
]

RUN_FORMAT = "collapse-diagnostics/run"
RUN_FORMAT_VERSION = 1

#: Prefix of the per-control-token log-prob columns (tokens and probe tables).
CTRL_PREFIX = "lp_ctrl_"

#: The per-step table kinds; each lives in ``<run>/<kind>/step-NNNNNN.parquet``.
KINDS = ("rollouts", "tokens", "probe")

RUN_JSON = "run.json"
METRICS_JSONL = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_JSON = "trainer_state.json"



class RunFormatError(ValueError):
    """A run directory (or its run.json) is not a readable format-v1 run."""


_STEP_FILE_RE = re.compile(r"^step-(\d+)\.parquet$")
STEP_DIR_RE = re.compile(r"^step-(\d+)$")


def ctrl_column(name: str) -> str:
    """Column name holding the log-prob of control token ``name``: ``lp_ctrl_<name>``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"control token name must be a non-empty string, got {name!r}")
    return f"{CTRL_PREFIX}{name}"


#: Prefix of the probe's whole-sequence log-prob columns of multi-token control strings.
CTRL_SEQ_PREFIX = "lpseq_ctrl_"


def ctrl_seq_column(name: str) -> str:
    """Column holding the log-prob of multi-token control string ``name`` as a whole sequence
    from this position (probe tables): ``lpseq_ctrl_<name>``; nullable, an extra column."""
    ctrl_column(name)  # validates the name
    return f"{CTRL_SEQ_PREFIX}{name}"


def ctrl_names_from_columns(columns: Iterable[str]) -> list[str]:
    """Control-token names found as ``lp_ctrl_<name>`` columns, in column order."""
    return [c[len(CTRL_PREFIX):] for c in columns if c.startswith(CTRL_PREFIX) and len(c) > len(CTRL_PREFIX)]


def step_filename(step: int) -> str:
    """``step-000012.parquet`` (zero-padded to 6 digits; longer steps keep all digits)."""
    return f"step-{_check_step(step):06d}.parquet"


def step_dirname(step: int) -> str:
    """``step-000012`` (checkpoint directory name)."""
    return f"step-{_check_step(step):06d}"


def parse_step_filename(name: str) -> int | None:
    """Step number of a ``step-NNNNNN.parquet`` name, else ``None`` (temp files etc.)."""
    m = _STEP_FILE_RE.match(name)
    return int(m.group(1)) if m else None


def parse_step_dirname(name: str) -> int | None:
    m = STEP_DIR_RE.match(name)
    return int(m.group(1)) if m else None


#: Steps are Int64 everywhere (tables, metrics frames); a larger one is bad input, not a step.
MAX_STEP = 2**63 - 1


def step_value(v: Any) -> int | None:
    """A JSON value as a step number: an int (or integral float) in 0..MAX_STEP, else None. The
    one check every reader of steps uses, so ``1e30`` is skipped like ``-3``, never an overflow."""
    if isinstance(v, bool):
        return None
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    return v if isinstance(v, int) and 0 <= v <= MAX_STEP else None


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not hasattr(step, "__index__"):
        raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}")
    step = int(step.__index__())
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step > MAX_STEP:
        raise ValueError(f"step must be <= {MAX_STEP} (Int64), got {step}")
    return step


# --------------------------------------------------------------------------------------
# Column specs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column of a format-v1 table.

    ``required``: a frame handed to the writer must contain it (else ``ValueError``);
    optional columns are filled with ``default`` (``None`` -> null).
    ``nullable``: whether null values are allowed.
    """

    name: str
    dtype: pl.DataType
    description: str
    nullable: bool = False
    required: bool = True
    default: Any = None


_STR_LIST = pl.List(pl.String)

ROLLOUTS_COLUMNS: tuple[Column, ...] = (
    Column("step", pl.Int64(), "training step this rollout was generated at (authoritative, not the file name)"),
    Column("sample_id", pl.Int64(), "id of the rollout, unique within the step; joins to tokens.sample_id"),
    Column("group_id", pl.Int64(), "GRPO group (rollouts sharing one prompt) within the step"),
    Column("task_id", pl.String(), "id of the environment task (diagnose.tasks.Task.id)"),
    Column("split", pl.String(), "task split: train | test | content_ood | format_ood"),
    Column("prompt", pl.String(), "the rendered prompt text (chat template applied)"),
    Column("completion", pl.String(), "the full multi-turn transcript after the prompt (assistant turns and tool outputs)"),
    Column("reward", pl.Float64(), "scalar reward given to the rollout (NaN allowed)", nullable=True),
    Column("accuracy", pl.Float64(), "task accuracy in [0, 1] (null if not applicable)", nullable=True),
    Column("n_turns", pl.Int32(), "number of assistant turns in the rollout"),
    Column("turn_states", _STR_LIST, "TurnState value of each assistant turn, in order"),
    Column("error_types", _STR_LIST, "FormatError values found in the rollout (may repeat, empty if none)"),
    Column("is_hint", pl.Boolean(), "rollout was generated with a hint in the prompt", required=False, default=False),
    Column("is_off_policy", pl.Boolean(), "rollout was not sampled from the current policy (e.g. replayed, injected gold)", required=False, default=False),
)

TOKENS_COLUMNS: tuple[Column, ...] = (
    Column("step", pl.Int64(), "training step (authoritative, not the file name)"),
    Column("sample_id", pl.Int64(), "rollout id; joins to rollouts.sample_id"),
    Column("turn", pl.Int32(), "0-based assistant-turn index the token belongs to (tool outputs: the turn they answer)"),
    Column("position", pl.Int32(), "0-based position of the token within the sample's completion"),
    Column("token_id", pl.Int32(), "vocabulary id of the token"),
    Column("logprob", pl.Float32(), "log-prob of this token under the training policy (null: not computed)", nullable=True),
    Column("sampler_logprob", pl.Float32(), "the rollout engine's own log-prob (e.g. vLLM), for train/inference mismatch; null if unavailable", nullable=True, required=False),
    Column("entropy", pl.Float32(), "entropy (nats) of the training policy's next-token distribution at this position (null: not computed)", nullable=True),
    Column("is_generated", pl.Boolean(), "true: sampled by the model; false: tool output / observation / template token"),
)

PROBE_COLUMNS: tuple[Column, ...] = (
    Column("step", pl.Int64(), "training step the probe was run at (authoritative)"),
    Column("probe_id", pl.Int64(), "id of the fixed probe context (stable across steps)"),
    Column("position", pl.Int32(), "0-based position (in the whole token sequence) of the predicting token"),
    Column("token_id", pl.Int32(), "gold next-token id (the token at position + 1)"),
    Column("lp_gold", pl.Float32(), "log-prob of the gold token under the current policy", nullable=True),
    Column("context", pl.String(), "key-context label of the position (e.g. after_call_open), empty elsewhere", nullable=True),
)

#: The fixed part of each table (without the ``lp_ctrl_<name>`` columns).
ROLLOUTS_SCHEMA = pl.Schema([(c.name, c.dtype) for c in ROLLOUTS_COLUMNS])
TOKENS_SCHEMA = pl.Schema([(c.name, c.dtype) for c in TOKENS_COLUMNS])
PROBE_SCHEMA = pl.Schema([(c.name, c.dtype) for c in PROBE_COLUMNS])


def _ctrl_specs(ctrl_names: Iterable[str]) -> tuple[Column, ...]:
    names = list(ctrl_names)
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"duplicate control token names: {sorted(dup)}")
    return tuple(
        Column(ctrl_column(n), pl.Float32(), f"log-prob of control token {n!r} at this position (sampled or not)", nullable=True)
        for n in names
    )


def columns_for(kind: str, ctrl_names: Iterable[str] = ()) -> tuple[Column, ...]:
    """Column specs of table ``kind`` ('rollouts' | 'tokens' | 'probe')."""
    if kind == "rollouts":
        return ROLLOUTS_COLUMNS
    if kind == "tokens":
        return TOKENS_COLUMNS + _ctrl_specs(ctrl_names)
    if kind == "probe":
        return PROBE_COLUMNS + _ctrl_specs(ctrl_names)
    raise ValueError(f"unknown table kind {kind!r}; expected one of {KINDS}")


def schema_for(kind: str, ctrl_names: Iterable[str] = ()) -> pl.Schema:
    return pl.Schema([(c.name, c.dtype) for c in columns_for(kind, ctrl_names)])


def tokens_schema(ctrl_names: Iterable[str] = ()) -> pl.Schema:
    """Schema of ``tokens/step-*.parquet``: fixed columns + ``lp_ctrl_<name>`` (Float32) per control token."""
    return schema_for("tokens", ctrl_names)


def rollouts_schema() -> pl.Schema:
    """Schema of ``rollouts/step-*.parquet``."""
    return schema_for("rollouts")


def probe_schema(ctrl_names: Iterable[str] = ()) -> pl.Schema:
    """Schema of ``probe/step-*.parquet``: fixed columns + ``lp_ctrl_<name>`` (Float32) per control token."""
    return schema_for("probe", ctrl_names)


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------

_INT_TYPES = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64)
_FLOAT_TYPES = (pl.Float32, pl.Float64)


def _kind_of(dtype: pl.DataType) -> str:
    if dtype == pl.Null:
        return "null"
    if dtype == pl.Boolean:
        return "bool"
    if any(dtype == t for t in _INT_TYPES):
        return "int"
    if any(dtype == t for t in _FLOAT_TYPES) or (hasattr(pl, "Float16") and dtype == pl.Float16):
        return "float"
    if dtype == pl.String or dtype == pl.Categorical or isinstance(dtype, pl.Enum):
        return "str"
    if isinstance(dtype, pl.List):
        return f"list[{_kind_of(dtype.inner)}]"
    return "other"


def _castable(src: pl.DataType, dst: pl.DataType) -> bool:
    s, d = _kind_of(src), _kind_of(dst)
    if s == "null" or s == d:
        return True
    if d == "float" and s == "int":
        return True
    if d.startswith("list[") and s.startswith("list[") and s[5:-1] == "null":
        return True
    return False


def conform(
    df: pl.DataFrame,
    columns: Sequence[Column],
    *,
    table: str = "table",
) -> pl.DataFrame:
    """Cast/check ``df`` against ``columns``; return it with spec columns first (in spec order), extras after.

    * a missing required column -> ``ValueError`` naming it (and the table);
    * a missing optional column is added, filled with its default;
    * a column of an incompatible kind (e.g. strings where ints are expected) ->
      ``ValueError`` naming column, expected and actual dtype;
    * compatible dtypes are cast (int64 -> int32 checks for overflow, float64 -> float32,
      int -> float); an overflowing value -> ``ValueError``;
    * nulls in a non-nullable column -> ``ValueError``.

    Extra columns are kept unchanged.
    """
    present = set(df.columns)
    missing = [c.name for c in columns if c.required and c.name not in present]
    if missing:
        raise ValueError(
            f"{table}: missing required column(s) {missing}; got columns {df.columns}"
        )
    n = df.height
    exprs: list[pl.Expr] = []
    for c in columns:
        if c.name not in present:
            exprs.append(pl.lit(c.default, dtype=c.dtype).alias(c.name))
            continue
        src = df.schema[c.name]
        if src == c.dtype:
            exprs.append(pl.col(c.name))
            continue
        if not _castable(src, c.dtype):
            raise ValueError(
                f"{table}: column {c.name!r} has dtype {src}, expected {c.dtype} ({c.description})"
            )
        exprs.append(pl.col(c.name).cast(c.dtype, strict=True))
    spec_names = {c.name for c in columns}
    extras = [pl.col(name) for name in df.columns if name not in spec_names]
    try:
        out = df.select(exprs + extras)
    except (pl.exceptions.InvalidOperationError, pl.exceptions.ComputeError) as e:
        # Find the offending column for a clear message.
        for c in columns:
            if c.name in present and df.schema[c.name] != c.dtype:
                try:
                    df.get_column(c.name).cast(c.dtype, strict=True)
                except Exception:
                    raise ValueError(
                        f"{table}: column {c.name!r} cannot be cast from {df.schema[c.name]} to {c.dtype} "
                        f"without loss (out-of-range values?)"
                    ) from None
        raise ValueError(f"{table}: {e}") from None
    if n == 0:
        # pl.lit(None) on an empty frame yields 1 row in some versions; guard.
        out = out.head(0)
    for c in columns:
        if not c.nullable:
            nulls = out.get_column(c.name).null_count()
            if nulls:
                raise ValueError(f"{table}: column {c.name!r} must not contain nulls ({nulls} found)")
    return out


def validate_schema(
    schema: pl.Schema | dict[str, pl.DataType],
    columns: Sequence[Column],
    *,
    table: str = "table",
) -> list[str]:
    """Problems of an on-disk ``schema`` w.r.t. ``columns`` (empty list: compatible).

    Missing optional columns are fine; a missing required column or an
    incompatible dtype is a problem.  Used by the reader; never raises.
    """
    problems = []
    for c in columns:
        if c.name not in schema:
            if c.required:
                problems.append(f"{table}: missing required column {c.name!r}")
            continue
        if schema[c.name] != c.dtype and not _castable(schema[c.name], c.dtype):
            problems.append(f"{table}: column {c.name!r} has dtype {schema[c.name]}, expected {c.dtype}")
    return problems
