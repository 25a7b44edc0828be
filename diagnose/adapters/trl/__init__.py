"""TRL GRPOTrainer output directory as a `RunSource`, read as TRL's code writes it.

Followed: ``trl/trainer/grpo_trainer.py`` of TRL 1.16.0 (and 1.10.0.dev where it differs),
``GRPOTrainer.log`` and ``_generate_and_score_completions``; ``transformers`` ``Trainer.log`` /
``TrainerState.save_to_json``.

* ``<output_dir>/completions/completions_{global_step:05d}.parquet`` (``log_completions``, main
  process only, at every ``log`` call): ``step`` (int64), ``prompt``, ``completion``, one float
  column per reward function (named as the function), the ``log_extra`` columns, ``advantage``.
  It holds what the deques of ``maxlen=generation_batch_size`` hold: the **last generation batch**
  before the log. So with ``logging_steps`` N the rollouts sample 1 step in N; with
  ``num_iterations`` > 1 a log with no generation since the previous one writes the same rows
  again (its ``log_history`` entry has no ``reward``: dropped here); an evaluation logs under the
  same name after the training log of its step, overwriting it with eval completions (its step
  has ``eval_*`` metrics: dropped here). Both are said in the notes. Cells are decoded text
  (1.10, non-conversational data) or message lists (1.16 conversational), see `diagnose.adapters.trl.completions`.
* ``reward``: the sum of the **reward-function columns** only, named by the metrics'
  ``rewards/<name>/mean``; ``log_extra`` columns are kept and never summed. Without a
  trainer_state.json every float column is summed (a note says so).
* Metrics: the newest ``trainer_state.json`` (``log_history``) of the folder or its
  ``checkpoint-*/``, mapped to our names (``sampling/sampling_logp_difference/mean`` is the
  train/inference mismatch ``mismatch/abs_logprob_diff``).
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

import polars as pl

from diagnose.adapters._common.hooks import run_alias  # a run has no other name: the default hook
from diagnose.adapters._common.io import subdirs, visible_files
from diagnose.adapters._common.issues import IssueLog
from diagnose.adapters._common.metrics import (derived_metrics, map_names, merge_metrics, metrics_frame,
                                               non_numeric_metric_issues, nonfinite_metric_issues)
from diagnose.adapters._common.rollouts import concat_frames, empty_rollouts
from diagnose.adapters._common.source import make_source
from diagnose.adapters._common.turns import TurnClassifier
from diagnose.adapters._common.values import as_step
from diagnose.adapters.trl.completions import FileRows, read_file, reward_sum
from diagnose.source import RunSource
from diagnose.transcripts import Dialect

__all__ = ["CHECKPOINT_RE", "FILE_RE", "FORMAT", "NAME_MAP", "OPTIONS", "completion_files", "detect",
           "has_candidates", "load", "run_alias", "runs", "state_files", "step_of_file"]

FORMAT = "trl"
#: `load_run` options `load` takes
OPTIONS = ("run", "trackers")
FILE_RE = re.compile(r"^completions_(\d+)\.parquet$")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
REWARD_METRIC = re.compile(r"^(?:eval_)?rewards/(.+)/(?:mean|std)$")

#: TRL log_history name -> our name (originals are kept as well).
NAME_MAP: dict[str, str] = {
    "clip_ratio/region_mean": "clip_ratio",  # the liger loss logs "clip_ratio" itself
    "completion_length": "completions/mean_length",  # TRL < 0.17
    "learning_rate": "lr",
    "sampling/sampling_logp_difference/mean": "mismatch/abs_logprob_diff",  # mean |old_logps - vLLM logps|
}

SPECIAL_NOTE = ("TRL decodes completions with special tokens skipped: <|im_end|>, <|im_start|> and <|endoftext|> are "
                "gone (a parsed message keeps those inside a well-formed turn), so a stray control token is mostly "
                "invisible and there are no token probabilities; token-level control-token signals need "
                "`diagnose rescore` (re-scoring the logged completions with the model)")


# ---- discovery ----------------------------------------------------------------------


def completion_files(p: Path) -> list[tuple[int, Path]]:
    if p.is_file():
        m = FILE_RE.match(p.name)
        return [(int(m.group(1)), p)] if m else []
    out = []
    for d in (p / "completions", p):
        for f in visible_files(d) if d.is_dir() else []:
            m = FILE_RE.match(f.name)
            if m:
                out.append((int(m.group(1)), f))
    return sorted(out, key=lambda x: (x[0], x[1].name))


def state_files(p: Path) -> list[Path]:
    if p.is_file():
        return [p] if p.name == TRAINER_STATE else []
    out = []
    for r in [p] + ([p.parent] if p.name == "completions" else []):
        if (r / TRAINER_STATE).is_file():
            out.append(r / TRAINER_STATE)
        out += [d / TRAINER_STATE for d in subdirs(r) if CHECKPOINT_RE.match(d.name) and (d / TRAINER_STATE).is_file()]
    return out


def _has_log_history(f: Path) -> bool:
    try:
        if f.stat().st_size > 256 * 1024 * 1024:
            return False
        obj = json.loads(f.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and isinstance(obj.get("log_history"), list)


def _is_run(p: Path) -> bool:
    return bool(completion_files(p)) or any(_has_log_history(f) for f in state_files(p))


def runs(p: Path) -> list[str]:
    """Names of the TRL output directories one folder down when ``p`` is not one itself (people
    keep several under one root); [] when ``p`` is a run."""
    if p.is_file() or _is_run(p):
        return []
    return [d.name for d in subdirs(p) if _is_run(d)]


def detect(p: Path) -> bool:
    return _is_run(p) or len(runs(p)) >= 2


def has_candidates(p: Path) -> bool:
    if p.is_file():
        return bool(FILE_RE.match(p.name)) or p.name == TRAINER_STATE
    return (p / "completions").is_dir() or bool(state_files(p)) or bool(runs(p))


# ---- metrics ------------------------------------------------------------------------


def _load_state(f: Path, issues: IssueLog) -> dict[str, Any] | None:
    try:
        obj = json.loads(f.read_bytes())  # Python's json reads the NaN that save_to_json writes
    except (OSError, ValueError, RecursionError) as e:
        issues.add(f, None, f"unreadable or not valid JSON ({f'{type(e).__name__}: {e}'[:200]}); ignored")
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("log_history"), list):
        issues.add(f, None, "no 'log_history' list; ignored")
        return None
    return obj


def _state_rank(f: Path, history: list[Any]) -> tuple[int, int, int]:
    top = max((s for s in (as_step(e.get("step")) for e in history if isinstance(e, dict)) if s is not None), default=-1)
    m = CHECKPOINT_RE.match(f.parent.name)
    try:
        mtime = f.stat().st_mtime_ns
    except OSError:
        mtime = 0
    return (top, int(m.group(1)) if m else 1 << 62, mtime)


def newest_state(p: Path, issues: IssueLog) -> tuple[Path, dict[str, Any]] | None:
    """The readable trainer_state.json with the most logged steps (the output folder's own wins a tie)."""
    best = None
    for f in state_files(p):
        obj = _load_state(f, issues)
        if obj is not None:
            rank = _state_rank(f, obj["log_history"])
            if best is None or rank > best[0]:
                best = (rank, f, obj)
    return None if best is None else (best[1], best[2])


def history_by_step(f: Path, history: list[Any], issues: IssueLog) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for i, e in enumerate(history):
        if not isinstance(e, dict):
            issues.add(f, None, f"log_history[{i}] is not an object; skipped")
            continue
        step = as_step(e.get("step"))
        if step is None:
            issues.add(f, None, f"log_history[{i}] has no valid 'step' ({e.get('step')!r}); skipped")
            continue
        out.setdefault(step, []).append(e)
    return out


def metrics_table(f: Path, entries: dict[int, list[dict[str, Any]]], issues: IssueLog) -> pl.DataFrame:
    """One row per step, the entries of a step merged (later wins); null/NaN kept as null/NaN."""
    records = {s: {k: v for e in es for k, v in e.items() if k != "step" and not isinstance(v, (dict, list))}
               for s, es in entries.items()}
    df = metrics_frame(records)
    non_numeric_metric_issues({s: {k: v for e in es for k, v in e.items()} for s, es in entries.items()}, str(f), issues)
    nonfinite_metric_issues(df, str(f), issues)
    nulls = sorted({k for es in entries.values() for e in es for k, v in e.items() if v is None})
    if nulls:  # GRPOTrainer.log writes None when every value of a logging window was NaN
        issues.add(f, None, f"{len(nulls)} metric(s) null at some logged steps (TRL logs None when all values were "
                            f"NaN), e.g. {', '.join(nulls[:3])}; left null")
    return map_names(df, NAME_MAP)


# ---- which files hold fresh training rollouts -----------------------------------------


def file_kind(step: int, entries: dict[int, list[dict[str, Any]]] | None) -> str | None:
    """``eval`` (an evaluation logged at this step last wrote the file), ``relog`` (no generation
    since the previous log: the entry lacks ``reward``), ``train``, or None (no entry: unknown)."""
    if entries is None or step not in entries:
        return None
    es = entries[step]
    if any(k.startswith("eval_") for e in es for k in e):
        return "eval"
    train = [e for e in es if "train_runtime" not in e]
    if train and not any("reward" in e or "num_tokens" in e for e in train):
        return "relog"
    return "train"


def _keep_files(rows: list[FileRows], entries: dict[int, list[dict[str, Any]]] | None,
                notes: list[str]) -> list[FileRows]:
    kept: list[FileRows] = []
    dropped: dict[str, list[int]] = {"eval": [], "relog": []}
    prev_key = None
    for r in rows:
        step = min(r.steps)
        kind = file_kind(step, entries)
        if kind is None and prev_key is not None and r.key == prev_key:
            kind = "relog"  # no metrics entry: an identical table to the previous file is a re-log
        if kind in dropped:
            dropped[kind].append(step)
        else:
            kept.append(r)
        prev_key = r.key
    if dropped["eval"]:
        notes.append(f"completions at {len(dropped['eval'])} eval step(s) ({_steps_text(dropped['eval'])}) left out: "
                     "TRL's evaluation logs its completions under the same file name after the training log of "
                     "that step, overwriting the training rollouts (eval_* metrics kept)")
    if dropped["relog"]:
        notes.append(f"completions at {len(dropped['relog'])} step(s) ({_steps_text(dropped['relog'])}) left out: "
                     "re-logged rows of an earlier generation (num_iterations > 1: no new generation before that log)")
    return kept


def _steps_text(steps: list[int]) -> str:
    return ", ".join(map(str, steps[:8])) + (", ..." if len(steps) > 8 else "")


def _reward_columns(rows: list[FileRows], metric_names: set[str], notes: list[str]) -> tuple[list[str], list[str]]:
    floats = list(dict.fromkeys(c for r in rows for c in r.float_columns))
    if metric_names:
        rewards = [c for c in floats if c in metric_names]
        if rewards:
            extras = [c for c in floats if c not in metric_names]
            if extras:
                notes.append(f"log_extra float column(s) {', '.join(extras)} kept but not summed into reward (not "
                             "reward functions: no rewards/<name>/mean metric)")
            return rewards, extras
    if floats:
        notes.append(f"reward = sum of every float column ({', '.join(floats)}): without trainer_state.json the "
                     "reward functions cannot be told from log_extra columns")
    return floats, []


# ---- load ---------------------------------------------------------------------------


def _sampling_note(files: list[FileRows], state: dict[str, Any] | None, metrics: pl.DataFrame | None,
                   rollouts: pl.DataFrame, notes: list[str]) -> None:
    steps = sorted({s for r in files for s in r.steps})
    n = state.get("logging_steps") if state else None
    if not isinstance(n, int) or isinstance(n, bool):
        gaps = [b - a for a, b in zip(steps, steps[1:])]
        n = int(statistics.median(gaps)) if gaps else 1
    diff = _reward_gap(metrics, rollouts)
    if n <= 1:
        if diff is not None and diff[0] > 1e-6:
            notes.append(f"the trainer's reward metric differs from the rollouts' (mean |difference| {diff[0]:.3g} over "
                         f"{diff[1]} steps): reward_weights or a multi_objective_aggregation other than sum_then_normalize "
                         "weigh the columns; the scan reads the rollouts' unweighted sum")
        return
    text = (f"logging_steps={n}: the rollouts sample 1 step in {n} (each completions file holds only the last "
            f"generation batch before its step), while the metrics at that step (reward, rewards/<f>/mean, ...) "
            f"average the {n} steps since the previous log; the scan's reward is the rollouts' (the last batch), so "
            "a drop shows fully at the first logged step after it and diluted in the metric")
    if diff is not None:
        text += f" (here mean |metric - rollout reward| = {diff[0]:.3g} over {diff[1]} steps)"
    notes.append(text)


def _reward_gap(metrics: pl.DataFrame | None, rollouts: pl.DataFrame) -> tuple[float, int] | None:
    """Mean |trainer reward metric - mean rollout reward| over the steps that have both."""
    if metrics is None or "reward" not in metrics.columns or not rollouts.height:
        return None
    ro = rollouts.group_by("step").agg(pl.col("reward").filter(pl.col("reward").is_finite()).mean().alias("_r"))
    j = ro.join(metrics.select("step", pl.col("reward").alias("_m")), on="step").drop_nulls().drop_nans()
    return (float((j["_r"] - j["_m"]).abs().mean()), j.height) if j.height else None


def _tracker_entries(metrics: pl.DataFrame) -> dict[int, list[dict[str, Any]]]:
    """A tracker's rows as ``log_history`` entries (one per step: a W&B step merges the train and
    eval logs of that step), for telling eval and re-logged completions apart."""
    return {row["step"]: [{k: v for k, v in row.items() if k != "step" and v is not None}]
            for row in metrics.iter_rows(named=True)}


def load(p: Path, *, run: str | None = None, trackers: Any = None) -> RunSource:
    """The TRL run at ``p`` (``run``: the output directory under ``p`` to read, one of `runs`,
    as `load_run` chose it; None when ``p`` is the output directory). ``trackers``
    (`diagnose.adapters.trackers.attach.TrackerData`): the run's tracker data, whose metrics fill
    what ``trainer_state.json`` lacks and whose W&B ``completions`` tables give the rollouts of
    steps no parquet file holds."""
    if run is not None:
        p = p / run
    issues = IssueLog()
    notes = [SPECIAL_NOTE]
    classifier = TurnClassifier()
    files = completion_files(p)
    read: list[FileRows] = []
    seen: dict[int, Path] = {}
    for step, f in files:
        if step in seen:
            issues.add(f, None, f"a second completions file for step {step} (also {seen[step].name}); both read")
        seen.setdefault(step, f)
        try:
            r = read_file(step, f, issues, classifier)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - unexpected column types: report, keep the other files
            issues.add(f, None, f"unreadable completions table ({type(e).__name__}: {str(e)[:200]}); file skipped")
            continue
        if r is not None:
            read.append(r)
    if trackers is not None:
        from diagnose.adapters.trackers.tables import trl_table_rows

        read = sorted(read + trl_table_rows(trackers.tables, {s for s, _ in files}, issues, classifier),
                      key=lambda r: min(r.steps, default=0))
    found = newest_state(p, issues)
    state = found[1] if found else None
    entries = history_by_step(found[0], state["log_history"], issues) if found else None
    metrics = metrics_table(found[0], entries, issues) if found else None
    tracked = trackers is not None and trackers.metrics.height > 0
    if tracked:
        from diagnose.adapters.trackers.merge import fill_metrics

        tm = map_names(trackers.metrics, NAME_MAP)
        metrics = tm if metrics is None else fill_metrics(metrics, tm)
        entries = entries if entries is not None else _tracker_entries(trackers.metrics)
    metric_names = {m.group(1) for c in (metrics.columns if metrics is not None else []) if (m := REWARD_METRIC.match(c))}
    kept = _keep_files(read, entries, notes)
    rewards, _extras = _reward_columns(kept, metric_names, notes)
    for r in kept:  # a reward column of another type in one file (strings, lists): named, read as null
        for c in rewards:
            dt = r.frame.schema.get(c)
            if dt is not None and not (dt.is_numeric() or dt == pl.Boolean):
                issues.add(files_by_step(files, min(r.steps)), None, f"reward column {c!r} holds {dt}, not numbers; "
                           "its values are read as null")
                r.frame = r.frame.with_columns(pl.col(c).cast(pl.Float64, strict=False) if dt == pl.String
                                               else pl.lit(None, dtype=pl.Float64).alias(c))
    frames = [r.frame.with_columns(pl.Series("reward", reward_sum(r.frame, [c for c in rewards if c in r.frame.columns]),
                                             dtype=pl.Float64)) for r in kept]
    for r in kept:
        for c in rewards:
            if c in r.frame.columns:
                bad = r.frame.filter(~pl.col(c).cast(pl.Float64).is_finite() | pl.col(c).is_null()).height
                if bad:
                    issues.add(files_by_step(files, min(r.steps)), None,
                               f"reward column {c!r}: {bad} NaN/null/±inf value(s) (NaN left out of the sum, as TRL's nansum)")
    acc = next((c for c in rewards if "accuracy" in c.lower()), None)
    if acc is not None:
        frames = [f.with_columns(pl.col(acc).cast(pl.Float64).alias("accuracy")) if acc in f.columns else f for f in frames]
    rollouts = concat_frames(frames, empty_rollouts(accuracy=acc is not None)).sort(["step", "sample_id"])
    if files and not read:
        issues.add(p, None, "no readable completions rows in any completions file")
    if not files and not read:
        notes.append("no completions/completions_<step>.parquet files (log_completions off?): no rollouts, no turn states")
    elif not files:
        notes.append("rollouts from the W&B 'completions' tables (no completions/completions_<step>.parquet here)")
    if any(r.messages for r in kept):
        both = sum(r.both for r in kept)
        notes.append("completions are message lists (TRL >= 1.11 conversational): a well-formed call is TRL's parsed "
                     "tool_calls (rendered back as Hermes text), a malformed one is text decoded without special tokens"
                     + (f"; {both} turn(s) have both text and a call: parse_response moves text after a call into "
                        "content, so they read as healthy calls" if both else ""))
    if any(r.nulls for r in kept):
        notes.append("null tool-call arguments dropped (parquet stores every call's arguments as one struct, so "
                     "other calls' keys come back as null)")
    derived = derived_metrics(rollouts, rewards)
    if metrics is None:
        notes.append("no trainer_state.json with log_history (TRL saves it in checkpoint-*/): metrics derived from the "
                     "logged completions; no entropy, KL, clip ratio or grad norm")
        metrics = derived
    elif found is None:
        notes.append("trainer metrics from the experiment trackers (no trainer_state.json); turn_state/* and "
                     "format_error/* derived from the logged completions")
        metrics = merge_metrics(metrics, derived)
    else:
        notes.append(f"metrics from {found[0]} (newest trainer_state.json); turn_state/* and format_error/* derived "
                     "from the logged completions")
        metrics = merge_metrics(metrics, derived)
    _sampling_note(read, state, metrics, rollouts, notes)
    if rewards:
        notes.append("reward = unweighted sum of the reward-function columns (NaN left out, as TRL's nansum); "
                     "reward_weights are not in the files (the trainer's `reward` metric is weighted)")
    all_files = [f for _, f in files] + state_files(p)
    # message lists are kept as ChatML text (`completions.message_turns`), decoded text as TRL wrote it
    dialect = Dialect.CHATML if any(r.messages for r in kept) else Dialect.TRL
    return make_source(p, FORMAT, metrics=metrics, rollouts=rollouts, issues=issues, notes=notes, files=all_files,
                       dialect=dialect)


def files_by_step(files: list[tuple[int, Path]], step: int) -> Path:
    return next((f for s, f in files if s == step), files[0][1] if files else Path("."))


_STEP_FILE = re.compile(r"(?:^|/)completions_(\d+)\.parquet$")


def step_of_file(rel: str, single_file: bool) -> int | str:
    """What a fingerprint file (``/``-separated path relative to the run) holds, for the scan
    cache: its step (``completions_<step>.parquet``, written by ``GRPOTrainer.log``) or
    ``"global"``: a ``trainer_state.json`` names the reward columns and says which files are eval
    or re-logged rows, so a new one may change any step's rollouts."""
    m = _STEP_FILE.search(rel)
    return int(m.group(1)) if m else "global"
