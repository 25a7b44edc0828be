"""Run-directory format v1: schema, atomic writer, lazy polars reader.

The spec is ``docs/run-format.md``.  Typical use::

    from diagnose.rundir import RunWriter, RunReader

    w = RunWriter(run_dir, config=cfg, model=model_info, tokenizer=tok_info,
                  control_tokens=registry.to_json(), seeds={"seed": 0})
    w.log_metrics(step, {"reward": 0.4, "kl": 0.01})
    w.write_rollouts(step, rows)          # list of dicts / dict of columns / DataFrame
    w.write_tokens(step, arrays)          # dict of numpy arrays (fast path) / DataFrame

    r = RunReader(run_dir)
    r.metrics()                           # pl.DataFrame
    r.tokens(steps=[10, 20]).collect()    # pl.LazyFrame
    r.issues                              # [ReadIssue(path, line, message)]
"""

from diagnose.rundir.metrics import metrics_record
from diagnose.rundir.reader import ReadIssue, RunReader
from diagnose.rundir.schema import (
    CTRL_PREFIX,
    KINDS,
    PROBE_COLUMNS,
    PROBE_SCHEMA,
    ROLLOUTS_COLUMNS,
    ROLLOUTS_SCHEMA,
    RUN_FORMAT,
    RUN_FORMAT_VERSION,
    TOKENS_COLUMNS,
    TOKENS_SCHEMA,
    Column,
    RunFormatError,
    columns_for,
    conform,
    ctrl_column,
    probe_schema,
    rollouts_schema,
    schema_for,
    step_dirname,
    step_filename,
    tokens_schema,
    validate_schema,
)
from diagnose.rundir.writer import RunWriter

__all__ = [
    "CTRL_PREFIX",
    "KINDS",
    "PROBE_COLUMNS",
    "PROBE_SCHEMA",
    "ROLLOUTS_COLUMNS",
    "ROLLOUTS_SCHEMA",
    "RUN_FORMAT",
    "RUN_FORMAT_VERSION",
    "TOKENS_COLUMNS",
    "TOKENS_SCHEMA",
    "Column",
    "ReadIssue",
    "RunFormatError",
    "RunReader",
    "RunWriter",
    "columns_for",
    "conform",
    "ctrl_column",
    "metrics_record",
    "probe_schema",
    "rollouts_schema",
    "schema_for",
    "step_dirname",
    "step_filename",
    "tokens_schema",
    "validate_schema",
]
