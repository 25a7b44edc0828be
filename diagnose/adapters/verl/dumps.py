"""verl's rollout dumps (``trainer.rollout_data_dir``) as rollout rows, as
``RayPPOTrainer._dump_generations`` (``verl/trainer/ppo/ray_trainer.py``) writes them: one line
per sample with ``input``, ``output``, ``gts``, ``score``, ``step`` and the reward function's extra
keys, ``input``/``output`` decoded with ``skip_special_tokens=True`` (``_log_rollout_data``), turns
split in the `diagnose.transcripts.Dialect.VERL` dialect; and which dump files are this run's
(validation generations, another launch's steps, DAPO's overlong penalty).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import polars as pl

from diagnose.adapters._common.io import first_object
from diagnose.adapters._common.issues import IssueLog, NonFinite
from diagnose.adapters._common.rollouts import empty_rollouts, groups_by_key, json_scalar_column, rollouts_frame, turn_columns
from diagnose.adapters._common.turns import TurnClassifier, tool_names_of
from diagnose.adapters._common.values import as_float, as_step
from diagnose.adapters.verl.layout import is_validation_line
from diagnose.adapters.verl.metrics import training_steps
from diagnose.jsonl import LineError, iter_jsonl

_CORE = ("input", "output", "score", "step")
_ACCURACY_KEYS = ("acc", "accuracy")


_TOOLS_BLOCK = re.compile(r"<tools>\n(.*?)\n</tools>", re.DOTALL)


def prompt_tool_names(prompt: str | None) -> tuple[str, ...] | None:
    """Names of the tools a dumped ``input`` offers: Qwen's templates render each schema as one
    JSON line inside ``<tools>...</tools>`` of the system turn (text, so it survives
    ``skip_special_tokens``). None when there is no such block or a line does not parse (the
    unknown-tool check is then skipped)."""
    if not prompt or "<tools>" not in prompt:
        return None
    m = _TOOLS_BLOCK.search(prompt)
    if m is None:
        return None
    try:
        schemas = [json.loads(line) for line in m.group(1).split("\n") if line.strip()]
    except ValueError:
        return None
    return tool_names_of(schemas)


def read_dumps(files: list[tuple[int, Path]], issues: IssueLog, classifier: TurnClassifier) -> pl.DataFrame:
    """The rollout rows of the dump files ``(step, file)`` (``classifier``: in the verl dialect)."""
    rows: list[tuple[int, str | None, str, float | None, dict[str, Any]]] = []
    nonfinite = NonFinite()
    for fstep, f in files:
        n_good = bad_step = missing_input = missing_score = 0
        first: dict[str, int] = {}  # the first line of each counted problem: the issue names it
        other_steps: set[int] = set()
        for line_no, obj in iter_jsonl(f):
            if isinstance(obj, LineError):
                issues.line_error(obj)
                continue
            output = obj.get("output")
            if not isinstance(output, str):
                issues.add(f, line_no, f"no 'output' string (got {type(output).__name__}); line skipped")
                continue
            step = as_step(obj.get("step"))
            if step is None:
                bad_step += 1
                first.setdefault("step", line_no)
                step = fstep
            elif step != fstep:
                other_steps.add(step)
            inp = obj.get("input")
            if not isinstance(inp, str):
                missing_input += 1
                first.setdefault("input", line_no)
                inp = None
            score = obj.get("score")
            reward = as_float(score)
            if reward is None:
                if score is None:
                    missing_score += 1
                else:
                    issues.add(f, line_no, f"'score' is not a number ({type(score).__name__}); reward set to null")
            nonfinite.check(f, "score", reward, line_no)
            extra = {k: v for k, v in obj.items() if k not in _CORE}
            for k, v in extra.items():
                if isinstance(v, float):
                    nonfinite.check(f, k, v, line_no)
            rows.append((step, inp, output, reward, extra))
            n_good += 1
        if bad_step:
            issues.add(f, first["step"], f"{bad_step} line(s) without a valid 'step' (this the first); the file "
                       f"name's step {fstep} used")
        if other_steps:
            issues.step_mismatch(f, "lines", sorted(other_steps)[:5], fstep, "the 'step' key")
        if missing_input:
            issues.add(f, first["input"], f"{missing_input} line(s) without an 'input' string (this the first): each "
                       "is its own group")
        if missing_score:
            issues.add(f, None, f"{missing_score} line(s) without 'score': reward is null")
        if n_good == 0:
            issues.add(f, None, "no readable rollout lines in this file")
    nonfinite.flush(issues)
    if not rows:
        return empty_rollouts()
    # ids within each step, in file/line order; groups: identical decoded prompt (no uid is
    # dumped, and trainer.balance_batch reorders the batch)
    by_step: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_step.setdefault(r[0], []).append(i)
    sample_ids = [0] * len(rows)
    group_ids = [0] * len(rows)
    for idx in by_step.values():
        gs = groups_by_key([rows[i][1] for i in idx])
        for k, i in enumerate(idx):
            sample_ids[i], group_ids[i] = k, gs[k]
    completions = [r[2] for r in rows]
    cols: dict[str, list[Any]] = {
        "step": [r[0] for r in rows], "sample_id": sample_ids, "group_id": group_ids,
        "prompt": [r[1] for r in rows], "completion": completions, "reward": [r[3] for r in rows],
    }
    keys: dict[str, None] = {}
    for r in rows:
        for k in r[4]:
            keys.setdefault(k, None)
    extras = {k: json_scalar_column(k, [r[4].get(k) for r in rows]) for k in keys}
    for k in _ACCURACY_KEYS:
        if k in extras and extras[k].dtype in (pl.Float64, pl.Int64, pl.Boolean):
            cols["accuracy"] = extras[k].cast(pl.Float64).to_list()
            break
    tools: dict[str | None, tuple[str, ...] | None] = {}
    for r in rows:
        if r[1] not in tools:
            tools[r[1]] = prompt_tool_names(r[1])
    cols.update(turn_columns(classifier, [r[2] for r in rows], [tools[r[1]] for r in rows]))
    return rollouts_frame(cols, extras)


def without_validation(files: list[tuple[int, Path]], notes: list[str]) -> list[tuple[int, Path]]:
    """Training dumps without the validation files among them: with ``validation_data_dir`` =
    ``rollout_data_dir``, ``_validate`` (called after ``_log_rollout_data`` in ``fit``) writes the
    same ``<step>.jsonl`` at step 0, every ``test_freq`` steps and the last, replacing that step's
    training dump. A folder of validation dumps only is left as it is (read, with a note)."""
    val = [(s, f) for s, f in files if is_validation_line(first_object(f))]
    if not val or len(val) == len(files):
        return files
    steps = [s for s, _ in val]
    notes.append(f"{len(val)} dump file(s) in {val[0][1].parent} hold validation generations (steps "
                 f"{', '.join(map(str, steps[:10]))}{', ...' if len(steps) > 10 else ''}: trainer.validation_data_dir is "
                 "the rollout_data_dir, and _validate overwrote those steps' training dumps): kept apart, so those steps "
                 "have no training rollouts")
    return [x for x in files if x not in val]


def with_overlong_penalty(rollouts: pl.DataFrame, metrics: pl.DataFrame, notes: list[str]) -> pl.DataFrame:
    """The reward trained on, when the dump's ``score`` lacks DAPO's overlong penalty.

    ``DAPORewardManager`` (``verl/workers/reward_manager/dapo.py``) trains on ``score +
    overlong_reward``; with a dict-returning ``compute_score`` its pre-penalty ``score`` key
    replaces the dumped ``score`` (``_dump_generations``: same key). Which case a run is, the
    dump does not say; the trainer's ``critic/score/mean`` (the mean of ``token_level_scores``)
    does: the penalty is added only where the dumped scores miss it and the sum matches."""
    if "overlong_reward" not in rollouts.columns or "critic/score/mean" not in metrics.columns or \
            rollouts.schema["overlong_reward"] not in (pl.Float64, pl.Int64):
        return rollouts
    with_pen = pl.col("reward") + pl.col("overlong_reward").cast(pl.Float64)
    per = rollouts.group_by("step").agg(pl.col("reward").mean().alias("dumped"), with_pen.mean().alias("penalised")) \
        .join(metrics.select("step", pl.col("critic/score/mean").alias("trained")), on="step").drop_nulls() \
        .filter(pl.col("trained").is_finite())
    if per.height == 0:
        return rollouts

    def matches(c: str) -> bool:
        tol = 1e-3 * pl.max_horizontal(pl.lit(1.0), pl.col("trained").abs())
        return bool(per.select(((pl.col(c) - pl.col("trained")).abs() <= tol).all()).item())

    if matches("penalised") and not matches("dumped"):
        notes.append("the dumped 'score' is the reward function's own score, before DAPO's overlong penalty (a "
                     "dict-returning compute_score replaces verl's score key); reward = score + overlong_reward, as "
                     "trained (it matches critic/score/mean)")
        return rollouts.with_columns(with_pen.alias("reward"))
    return rollouts


def own_dumps(files: list[tuple[int, Path]], metrics: pl.DataFrame, mfile: Path,
               issues: IssueLog) -> list[tuple[int, Path]]:
    """The dumps that can be this experiment's: none past its last logged step, but the one
    after it when that file is newer than the metrics file (``fit`` dumps a step's rollouts
    before it logs the step, so a run stopped in between has one dump more). verl's file logger
    writes each line at once (``"wb"``, unbuffered) and only ever loses the steps *before* a
    restart, so later dumps were written by another launch: another experiment with the same
    ``trainer.rollout_data_dir`` (``_dump_generations`` overwrites ``<step>.jsonl`` with "w") or
    the abandoned steps of a run resumed from an earlier checkpoint. They are never merged."""
    steps = training_steps(metrics)
    if not steps:
        return files
    last = max(steps)
    try:
        m_time = mfile.stat().st_mtime
    except OSError:
        m_time = None

    def newer(f: Path) -> bool:
        try:
            return m_time is None or f.stat().st_mtime >= m_time
        except OSError:
            return False

    keep = [(s, f) for s, f in files if s <= last or (s == last + 1 and newer(f))]
    dropped = [(s, f) for s, f in files if (s, f) not in keep]
    if dropped:
        names = ", ".join(f.name for _, f in dropped[:5]) + (", ..." if len(dropped) > 5 else "")
        issues.add(dropped[0][1].parent, None,
                   f"{len(dropped)} rollout dump(s) ({names}; steps {dropped[0][0]}..{dropped[-1][0]}) lie past the last "
                   f"step ({last}) of this experiment's metrics {mfile.name}: written by another launch (another "
                   "experiment with the same trainer.rollout_data_dir, whose <step>.jsonl files verl overwrites, or the "
                   "abandoned steps of a resumed run); not read, never merged")
    return keep
