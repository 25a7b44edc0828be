"""RunWriter: the only code that writes a run directory (format v1, see docs/run-format.md).

Guarantees (also under ``SIGKILL``):

* ``run.json`` and every ``<kind>/step-NNNNNN.parquet`` are written to a temp file in
  the same directory, fsync'ed and renamed (``diagnose.atomic``): a file under its final
  name is always complete.  Leftover ``.<name>.<random>.tmp`` files are ignored by readers.
* ``metrics.jsonl`` gets one complete line per ``log_metrics`` call, written by a single
  ``os.write`` on an ``O_APPEND`` descriptor and fsync'ed.  A crash can at worst leave one
  incomplete trailing line, which ``RunWriter(..., resume=True)`` removes and the reader
  reports and skips.
* checkpoints written with :meth:`RunWriter.checkpoint` appear under their final name only
  when complete.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from diagnose.atomic import atomic_dir, atomic_path, atomic_write_json, is_temp_name
from diagnose.rundir.metrics import complete_trailing_line, drop_metrics_after, metrics_record
from diagnose.rundir.schema import (
    CHECKPOINTS_DIR,
    METRICS_JSONL,
    RUN_FORMAT,
    RUN_FORMAT_VERSION,
    RUN_JSON,
    TRAINER_STATE_JSON,
    RunFormatError,
    Column,
    _check_step,
    columns_for,
    conform,
    ctrl_column,
    parse_step_dirname,
    parse_step_filename,
    step_dirname,
    step_filename,
)
from diagnose.versions import versions

__all__ = ["RunWriter", "RunFormatError"]


_CTRL_KEYS = ("name", "text", "token_id", "role")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def normalize_control_tokens(control_tokens: Any) -> list[dict]:
    """Accept list[dict] / list[ControlToken] / ControlTokenRegistry; return list of
    ``{"name", "text", "token_id", "role"}`` dicts (names unique)."""
    if control_tokens is None:
        return []
    if hasattr(control_tokens, "to_json") and not isinstance(control_tokens, (list, tuple)):
        control_tokens = control_tokens.to_json()
    out: list[dict] = []
    for i, tok in enumerate(control_tokens):
        if dataclasses.is_dataclass(tok) and not isinstance(tok, type):
            tok = dataclasses.asdict(tok)
        if not isinstance(tok, Mapping):
            raise TypeError(f"control_tokens[{i}]: expected a dict with keys {_CTRL_KEYS}, got {type(tok).__name__}")
        missing = [k for k in _CTRL_KEYS if k not in tok]
        if missing:
            raise ValueError(f"control_tokens[{i}] ({tok.get('name')!r}): missing key(s) {missing}")
        d = dict(tok)
        ctrl_column(d["name"])  # validates the name
        d["token_id"] = int(d["token_id"])
        out.append(d)
    names = [d["name"] for d in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"control_tokens: duplicate name(s) {dup}")
    return out


# --------------------------------------------------------------------------------------
# table helpers
# --------------------------------------------------------------------------------------


def _to_numpy(v: Any) -> Any:
    """torch tensors -> numpy (bf16/fp16 -> float32); float16 numpy -> float32."""
    mod = type(v).__module__
    if mod.startswith("torch") and hasattr(v, "detach"):
        v = v.detach()
        if str(v.dtype) in ("torch.bfloat16", "torch.float16"):
            v = v.float()
        v = v.cpu().numpy()
    if isinstance(v, np.ndarray) and v.dtype == np.float16:
        v = v.astype(np.float32)
    return v


def _frame_from_mapping(data: Mapping[str, Any], ctrl_names: Sequence[str], table: str) -> pl.DataFrame:
    series: dict[str, Any] = {}
    scalars: dict[str, Any] = {}
    for key, value in data.items():
        value = _to_numpy(value)
        if key == "lp_ctrl" and isinstance(value, np.ndarray) and value.ndim == 2:
            # [n_positions, n_control_tokens] in registration order
            if value.shape[1] != len(ctrl_names):
                raise ValueError(
                    f"{table}: 'lp_ctrl' has {value.shape[1]} columns but {len(ctrl_names)} control "
                    f"tokens are registered ({list(ctrl_names)})"
                )
            for j, name in enumerate(ctrl_names):
                series[ctrl_column(name)] = value[:, j]
            continue
        if isinstance(value, np.ndarray):
            if value.ndim == 0:
                scalars[key] = value.item()
            elif value.ndim == 1:
                series[key] = value
            else:
                raise ValueError(f"{table}: column {key!r} must be 1-D, got array of shape {value.shape}")
        elif isinstance(value, (pl.Series, list, tuple)):
            series[key] = value
        else:
            scalars[key] = value
    lengths = {k: len(v) for k, v in series.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{table}: columns have different lengths: {lengths}")
    n = next(iter(lengths.values())) if lengths else 1
    cols = []
    for key, value in series.items():
        if isinstance(value, pl.Series):
            cols.append(value.alias(key))
        elif isinstance(value, np.ndarray):
            cols.append(pl.Series(key, value))
        else:
            cols.append(pl.Series(key, list(value), strict=False))
    df = pl.DataFrame(cols)
    if scalars:
        if not cols:
            df = pl.DataFrame({k: [v] for k, v in scalars.items()})
        else:
            df = df.with_columns([pl.lit(v).alias(k) for k, v in scalars.items()])
    assert df.height == n
    return df


def _to_frame(data: Any, columns: Sequence[Column], ctrl_names: Sequence[str], table: str) -> pl.DataFrame:
    if isinstance(data, pl.LazyFrame):
        data = data.collect()
    if isinstance(data, pl.DataFrame):
        return data
    if isinstance(data, Mapping):
        return _frame_from_mapping(data, ctrl_names, table)
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        rows = list(data)
        if not rows:
            return pl.DataFrame(schema={c.name: c.dtype for c in columns})
        rows = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) and not isinstance(r, type) else r for r in rows]
        if not all(isinstance(r, Mapping) for r in rows):
            raise TypeError(f"{table}: rows must be dicts")
        overrides = {c.name: c.dtype for c in columns if any(c.name in r for r in rows)}
        return pl.from_dicts(rows, schema_overrides=overrides, infer_schema_length=None, strict=False)
    raise TypeError(
        f"{table}: expected a polars DataFrame, a dict of columns (numpy arrays / lists) or a list of row dicts, "
        f"got {type(data).__name__}"
    )


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars off for the body, through the library's own switch
    (``transformers.utils.logging.disable_progress_bar``), and back on after if they were on.
    Nothing is imported when transformers is not loaded (it is an extra)."""
    if "transformers" not in sys.modules:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------
# RunWriter
# --------------------------------------------------------------------------------------


class RunWriter:
    """Writes one run directory (format v1).  One writer per run at a time.

    A new run needs a non-existent or empty ``run_dir``; an existing run raises
    ``FileExistsError`` unless ``resume=True``.  On resume the existing ``run.json`` is
    kept (its ``format``/``format_version`` are checked, the control-token names must be
    identical; ``config``/``model``/... passed here are *not* stored), a
    ``{"time", "versions"}`` entry is appended to its ``resumes`` list, and an incomplete
    trailing line of ``metrics.jsonl`` is removed (``self.truncated_bytes`` says how many
    bytes).  ``control_tokens`` may be a list of dicts, of ``ControlToken`` objects, or a
    ``ControlTokenRegistry``.  ``fsync=False`` skips fsyncs (tests, tmpfs).

    >>> w = RunWriter("runs/exp1", config=cfg, model={"name": "tiny"}, tokenizer={},
    ...               control_tokens=registry.to_json(), seeds={"seed": 0})   # doctest: +SKIP
    >>> w.log_metrics(0, {"reward": 0.5, "kl": float("nan")})                # doctest: +SKIP
    >>> w.write_tokens(0, {"sample_id": sid, "turn": turn, ...})             # doctest: +SKIP
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        config: dict,
        model: dict,
        tokenizer: dict,
        control_tokens: list[dict],
        seeds: dict,
        resume: bool = False,
        fsync: bool = True,
        compression_level: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.fsync = fsync
        self.compression_level = compression_level
        self.truncated_bytes = 0
        ctrl = normalize_control_tokens(control_tokens)
        run_json = self.run_dir / RUN_JSON

        if run_json.exists():
            if not resume:
                raise FileExistsError(
                    f"{run_json} already exists: refusing to overwrite an existing run "
                    "(pass resume=True to continue it, or use a new run directory)"
                )
            info = self._load_existing(run_json)
            old_names = [t.get("name") for t in info.get("control_tokens", [])]
            new_names = [t["name"] for t in ctrl]
            if old_names != new_names:
                raise ValueError(
                    f"{run_json}: cannot resume with different control tokens "
                    f"(run has {old_names}, got {new_names})"
                )
            info.setdefault("resumes", []).append({"time": _now(), "versions": versions()})
            self.info = info
            atomic_write_json(run_json, info, fsync=fsync)
            self.truncated_bytes = complete_trailing_line(self.run_dir / METRICS_JSONL)
        else:
            if self.run_dir.exists() and not resume:
                leftovers = [p.name for p in self.run_dir.iterdir() if not is_temp_name(p.name)]
                if leftovers:
                    raise FileExistsError(
                        f"{self.run_dir} is not empty but has no {RUN_JSON} ({sorted(leftovers)[:5]}): "
                        "refusing to write a run into it (pass resume=True to adopt it)"
                    )
            self.info = {
                "format": RUN_FORMAT,
                "format_version": RUN_FORMAT_VERSION,
                "created": _now(),
                "config": config,
                "model": model,
                "tokenizer": tokenizer,
                "control_tokens": ctrl,
                "seeds": seeds,
                "versions": versions(),
            }
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume:
                self.truncated_bytes = complete_trailing_line(self.run_dir / METRICS_JSONL)
            atomic_write_json(run_json, self.info, fsync=fsync)

        self.control_tokens: list[dict] = list(self.info.get("control_tokens", ctrl))
        self.ctrl_names: list[str] = [t["name"] for t in self.control_tokens]
        self._metrics_path = self.run_dir / METRICS_JSONL
        self._fd: int | None = os.open(self._metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @staticmethod
    def _load_existing(run_json: Path) -> dict:
        try:
            info = json.loads(run_json.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise RunFormatError(f"{run_json}: cannot resume, file is unreadable or not valid JSON ({e})") from None
        if not isinstance(info, dict):
            raise RunFormatError(f"{run_json}: cannot resume, expected a JSON object")
        if info.get("format") != RUN_FORMAT:
            raise RunFormatError(f"{run_json}: cannot resume, 'format' is {info.get('format')!r}, expected {RUN_FORMAT!r}")
        if info.get("format_version") != RUN_FORMAT_VERSION:
            raise RunFormatError(
                f"{run_json}: cannot resume a run of format_version {info.get('format_version')!r} "
                f"with a writer of format_version {RUN_FORMAT_VERSION}"
            )
        return info

    # ---- metrics ---------------------------------------------------------------------

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one line ``{"step": step, **metrics}`` to ``metrics.jsonl`` (single write + fsync).

        Values must be scalars (numpy/torch scalars are converted); nested dicts are
        flattened with ``/``; non-finite floats become ``null`` and are recorded in
        ``"nonfinite": {key: "nan" | "inf" | "-inf"}``.  Keys ``step`` and ``nonfinite``
        are reserved.
        """
        if self._fd is None:
            raise ValueError(f"RunWriter for {self.run_dir} is closed")
        rec = metrics_record(step, metrics)
        line = (json.dumps(rec, allow_nan=False, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        view = memoryview(line)
        while view:  # one os.write for a regular file; loop only guards against short writes
            n = os.write(self._fd, view)
            view = view[n:]
        if self.fsync:
            os.fsync(self._fd)

    # ---- step tables -----------------------------------------------------------------

    def table_path(self, kind: str, step: int) -> Path:
        """``<run>/<kind>/step-NNNNNN.parquet``."""
        return self.run_dir / kind / step_filename(step)

    def _write_table(self, kind: str, step: int, data: Any) -> Path:
        step = _check_step(step)
        ctrl = self.ctrl_names if kind in ("tokens", "probe") else []
        columns = columns_for(kind, ctrl)
        table = f"{kind} step {step}"
        df = _to_frame(data, columns, ctrl, table)
        if "step" not in df.columns:
            df = df.with_columns(pl.lit(step, dtype=pl.Int64).alias("step"))
        elif df.height:
            s = df.get_column("step")
            if s.null_count() == 0 and s.dtype.is_integer() and s.min() == step == s.max():
                pass
            else:
                raise ValueError(
                    f"{table}: the 'step' column must equal {step} in every row "
                    f"(got min={s.min()!r}, max={s.max()!r}, nulls={s.null_count()})"
                )
        df = conform(df, columns, table=table)
        path = self.table_path(kind, step)
        meta = {
            "collapse-diagnostics/format": RUN_FORMAT,
            "collapse-diagnostics/format_version": str(RUN_FORMAT_VERSION),
            "collapse-diagnostics/kind": kind,
            "collapse-diagnostics/step": str(step),
        }
        with atomic_path(path, fsync=self.fsync) as tmp:
            df.write_parquet(
                tmp,
                compression="zstd",
                compression_level=self.compression_level,
                statistics=True,
                metadata=meta,
            )
        return path

    def write_rollouts(self, step: int, data: Any) -> Path:
        """Write ``rollouts/step-NNNNNN.parquet`` (one row per rollout).

        ``data``: polars DataFrame, dict of columns, or list of row dicts.  ``step`` may be
        omitted (filled in); if present it must equal ``step``.  Returns the file path.
        """
        return self._write_table("rollouts", step, data)

    def write_tokens(self, step: int, data: Any) -> Path:
        """Write ``tokens/step-NNNNNN.parquet`` (one row per completion token).

        ``data``: polars DataFrame or dict of 1-D numpy arrays / torch tensors (no Python
        row loops; int64 -> int32 and float64 -> float32 casts are vectorised and
        overflow-checked).  Control-token log-probs go either in ``lp_ctrl_<name>``
        columns or as one 2-D array under key ``"lp_ctrl"`` of shape
        ``[n_rows, n_control_tokens]`` in registration order.  ``sampler_logprob`` may be
        omitted (null).  Returns the file path.
        """
        return self._write_table("tokens", step, data)

    def write_probe(self, step: int, data: Any) -> Path:
        """Write ``probe/step-NNNNNN.parquet`` (fixed control-token probe). Same inputs as write_tokens."""
        return self._write_table("probe", step, data)

    # ---- checkpoints -----------------------------------------------------------------

    def checkpoint_dir(self, step: int) -> Path:
        """``<run>/checkpoints/step-NNNNNN`` (not created)."""
        return self.run_dir / CHECKPOINTS_DIR / step_dirname(step)

    @contextmanager
    def checkpoint(self, step: int, *, overwrite: bool = True) -> Iterator[Path]:
        """Yield a temp directory to save a checkpoint into; renamed to ``checkpoint_dir(step)``
        on success.  ``trainer_state.json`` is written with at least ``{"step": step}`` if the
        body did not write one.  transformers' progress bars ("Writing model shards") are off
        in the body: a checkpoint is one line of the trainer's progress, not a bar of its own."""
        step = _check_step(step)
        with atomic_dir(self.checkpoint_dir(step), overwrite=overwrite) as tmp, quiet_transformers():
            yield tmp
            if not (tmp / TRAINER_STATE_JSON).exists():
                atomic_write_json(tmp / TRAINER_STATE_JSON, {"step": step}, fsync=False)

    # ---- resume --------------------------------------------------------------------

    def truncate_after(self, step: int) -> dict[str, int]:
        """Drop everything logged after ``step`` (the checkpoint a resume starts from), so the
        steps re-run after it are logged once, not twice.

        ``metrics.jsonl`` is rewritten atomically without the lines of steps > ``step`` (lines
        that do not parse are kept: the reader reports them, nothing unknown is lost); every
        ``<dir>/step-NNNNNN.parquet`` of a step > ``step`` in a top-level directory (rollouts,
        tokens, probe, and any other per-step table) is removed, as is every checkpoint after
        ``step``.  A kill in the middle leaves a state this call repairs when run again.
        Returns what was dropped: ``{"metrics_lines", "step_files", "checkpoints"}``.
        """
        step = _check_step(step)
        dropped = {"metrics_lines": 0, "step_files": 0, "checkpoints": 0}
        reopen = self._fd is not None
        self.close()
        try:
            dropped["metrics_lines"] = drop_metrics_after(self._metrics_path, step, self.fsync)
            for entry in sorted(self.run_dir.iterdir()):
                if entry.name.startswith(".") or not entry.is_dir() or entry.is_symlink():
                    continue
                for f in entry.iterdir():
                    s = parse_step_dirname(f.name) if entry.name == CHECKPOINTS_DIR else parse_step_filename(f.name)
                    if s is None or s <= step:
                        continue
                    if f.is_dir() and not f.is_symlink():
                        shutil.rmtree(f)
                        dropped["checkpoints"] += 1
                    else:
                        f.unlink()
                        dropped["step_files"] += 1
        finally:
            if reopen:
                self._fd = os.open(self._metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return dropped

    # ---- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"RunWriter({str(self.run_dir)!r}, control_tokens={self.ctrl_names})"

