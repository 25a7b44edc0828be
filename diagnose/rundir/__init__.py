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

from diagnose.rundir import schema as _schema
from diagnose.rundir.metrics import metrics_record
from diagnose.rundir.reader import ReadIssue, RunReader
from diagnose.rundir.schema import *  # noqa: F403 - the format's constants, schemas and column names
from diagnose.rundir.writer import RunWriter

__all__ = ["ReadIssue", "RunReader", "RunWriter", "metrics_record", *_schema.__all__]
