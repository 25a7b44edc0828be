"""verl run as a `RunSource`, read the way verl 0.8.0.dev writes it.

* Rollout dumps (``trainer.rollout_data_dir``): ``<step>.jsonl`` from
  ``RayPPOTrainer._dump_generations`` (``verl/trainer/ppo/ray_trainer.py``), one line per
  sample with ``input``, ``output``, ``gts``, ``score``, ``step`` and the reward function's
  extra keys (e.g. ``acc``, ``pred``). ``input``/``output`` are the prompt and response ids
  decoded with ``skip_special_tokens=True`` (``_log_rollout_data``).
* Turns (`diagnose.adapters._verl_turns`): the tool agent loop
  (``verl/experimental/agent_loop/tool_agent_loop.py``) appends the
  tool messages' ids from ``apply_chat_template(..., remove_system_prompt=True)``; with Qwen's
  template they start at ``<|im_start|>user`` and end with the ``<|im_start|>assistant\\n``
  generation prompt. Decoded without special tokens, a response reads
  ``<call></tool_call>user\\n<tool_response>\\n...\\n</tool_response>\\nassistant\\n<next turn>``
  (no newline before ``user``: the turn's ``<|im_end|>`` is gone). `split_turns` cuts there, and
  at an interaction's ``user\\n...\\nassistant\\n`` rounds; each turn is classified by its text
  after Qwen3's ``</think>`` (`answer_part`), with the tools the prompt offers.
* Metrics: the file logger (``verl/utils/tracking.py`` ``FileLogger``), ``{"step": N, "data":
  {...}}`` orjson lines (NaN and ±inf become ``null``), found where verl puts it
  (`diagnose.adapters._verl_layout`) or given with ``metrics=``.
* Validation dumps (``trainer.validation_data_dir``, step 0 and every ``test_freq``, a
  ``reward`` key) are kept apart: never read as training rollouts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from diagnose.adapters._io import first_object, subdirs
from diagnose.adapters._issues import IssueLog
from diagnose.adapters._metrics import (derived_metrics, map_names, metrics_frame, non_numeric_metric_issues,
                                       nonfinite_metric_issues)
from diagnose.adapters._source import make_source
from diagnose.adapters._values import as_step
from diagnose.adapters._verl_rollouts import read_rollouts
from diagnose.adapters._verl_turns import (  # noqa: F401 (re-exported)
    VerlTurnClassifier, answer_part, prompt_tool_names, split_turns)
from diagnose.adapters._verl_layout import (
    STEP_FILE_RE,
    VerlRun,
    find_layout,
    is_dump_dir,
    is_validation_dir,
    is_validation_line,
    kind_of,
    metrics_files_in,
    step_files,
)
from diagnose.jsonl import LineError, iter_jsonl
from diagnose.source import RunSource

FORMAT = "verl"

#: verl metric name -> our name (originals are kept as well; the first present source wins).
NAME_MAP: dict[str, str] = {
    "actor/entropy": "entropy",
    "actor/pg_clipfrac": "clip_ratio",
    "actor/kl_loss": "kl",  # KL to the reference policy (use_kl_loss)
    "actor/reward_kl_penalty": "kl",  # ... or the in-reward KL penalty (use_kl_in_reward)
    "actor/grad_norm": "grad_norm",
    "actor/lr": "lr",
    "response_length/mean": "completions/mean_length",
    "response_length/max": "completions/max_length",
    "response_length/min": "completions/min_length",
    "response_length/clip_ratio": "completions/clipped_ratio",
    "critic/score/mean": "reward",
    "tool_call_counts/mean": "tool_calls_per_episode",
    "training/rollout_probs_diff_mean": "mismatch/abs_prob_diff",
}


# ---- detection ----------------------------------------------------------------------


def detect(p: Path) -> bool:
    if p.is_file():
        return p.suffix == ".jsonl" and kind_of(first_object(p)) in ("dump", "metrics")
    # dumps here or one folder down, or a file logger's JSONL here or at <here>/<project>/ (deeper
    # dump folders are read once the folder is known to be verl, not used to claim it);
    # trainer.default_local_dir, by verl's checkpoint tracker file
    return is_dump_dir(p) or any(is_dump_dir(d) for d in subdirs(p)) or bool(metrics_files_in(p)) or \
        (p / "latest_checkpointed_iteration.txt").is_file()


def has_candidates(p: Path) -> bool:
    if p.is_file():
        return p.suffix == ".jsonl"
    return any(True for _ in p.glob("*.jsonl")) or any(True for _ in p.glob("*/*.jsonl")) or \
        bool(find_layout(p).runs)


def runs(p: Path) -> list[str]:
    """Names of the verl runs at ``p`` (``<project>/<experiment>`` of each file-logger file,
    else the dump folder), for ``--run``."""
    if p.is_file():
        return []
    return [r.name for r in find_layout(p).runs]


# ---- rollouts -----------------------------------------------------------------------


# ---- metrics ------------------------------------------------------------------------


def read_metrics(files: list[Path], issues: IssueLog) -> pl.DataFrame | None:
    """The file logger's lines by step (several lines of a step merged, later wins). A ``null``
    value is read as NaN: the logger writes NaN and ±inf as null (orjson), and verl's metrics
    are numbers, so a null is a lost non-finite value."""
    if not files:
        return None
    records: dict[int, dict[str, Any]] = {}
    from_null: set[str] = set()
    for f in files:
        nulls: dict[str, list[int]] = {}
        for line_no, obj in iter_jsonl(f):
            if isinstance(obj, LineError):
                issues.line_error(obj)
                continue
            step = as_step(obj.get("step"))
            data = obj.get("data")
            if step is None or not isinstance(data, dict):
                why = (f"invalid 'step' ({repr(obj.get('step'))[:60]}; expected an integer 0..2^63-1)" if step is None
                       else f"'data' is {type(data).__name__}, not an object")
                issues.add(f, line_no, "not a {\"step\": N, \"data\": {...}} metrics line: " + why + "; line skipped")
                continue
            rec = records.setdefault(step, {})
            for k, v in data.items():
                if v is None:
                    nulls.setdefault(str(k), []).append(line_no)
                    v = float("nan")
                rec[str(k)] = v
        from_null.update(nulls)
        for k, lines in nulls.items():
            issues.add(f, lines[0], f"metric {k!r} is null on {len(lines)} line(s): verl's file logger (orjson) "
                                    "writes NaN and +-inf as null; read as NaN")
    df = metrics_frame(records)
    non_numeric_metric_issues(records, ", ".join(str(f) for f in files), issues)
    # NaN/inf written as such (not by orjson): one issue per metric; nulls were reported above
    nonfinite_metric_issues(df.select([c for c in df.columns if c not in from_null]),
                            ", ".join(str(f) for f in files), issues)
    return map_names(df, {k: v for k, v in NAME_MAP.items() if k not in _GENERATED_LENGTH})


#: verl's response_length/* are the response's attention mask (``metric_utils.py``
#: ``_compute_response_info``), tool-response tokens included: the generated length only when
#: there are no tool or interaction rounds.
_GENERATED_LENGTH = ("response_length/mean", "response_length/max", "response_length/min")
_LENGTH_NOTE = ("response_length/* count every response token, the tool responses and role headers the agent loop "
                "inserts included (verl takes them from the attention mask): in this multi-turn run they are not "
                "the generated length and are not mapped to completions/*_length (response_length/clip_ratio, the "
                "share cut at rollout.response_length, is completions/clipped_ratio)")


def _multi_turn(df: pl.DataFrame, rollouts: pl.DataFrame) -> bool:
    """Whether a run had tool or interaction rounds: ``num_turns`` (user + assistant turns + 1,
    ``ToolAgentLoop.run``) above 2 at some step, or a dumped response of several turns."""
    for c in ("num_turns/max", "val-aux/num_turns/max"):
        if c in df.columns and (df.get_column(c).fill_nan(None).drop_nulls() > 2).any():
            return True
    return rollouts.height > 0 and "turn_states" in rollouts.columns and \
        bool((rollouts.get_column("turn_states").list.len() > 1).any())


def _map_lengths(df: pl.DataFrame, rollouts: pl.DataFrame, notes: list[str]) -> pl.DataFrame:
    if _multi_turn(df, rollouts):
        if any(c in df.columns for c in _GENERATED_LENGTH):
            notes.append(_LENGTH_NOTE)
        return df
    return map_names(df, {k: NAME_MAP[k] for k in _GENERATED_LENGTH})


def _merge(primary: pl.DataFrame, derived: pl.DataFrame) -> pl.DataFrame:
    """Trainer metrics, with the rollout-derived ones added; where both have a name, the
    trainer's value wins and the derived one fills the steps the trainer has none for (a
    metrics file truncated on resume)."""
    if derived.height == 0 or derived.width <= 1:
        return primary
    if primary.height == 0:
        return derived
    both = [c for c in derived.columns if c != "step" and c in primary.columns]
    out = primary.join(derived, on="step", how="full", coalesce=True, suffix="__derived")
    return out.with_columns([pl.coalesce(c, f"{c}__derived").alias(c) for c in both]).drop(
        [f"{c}__derived" for c in both]).sort("step")


def _training_steps(metrics: pl.DataFrame) -> list[int]:
    """Steps with training metrics (a validation-only line, e.g. step 0, has only val-* keys)."""
    train = [c for c in metrics.columns if c != "step" and not c.startswith("val-")]
    if not train:
        return []
    return metrics.filter(pl.any_horizontal(pl.col(train).is_not_null())).get_column("step").to_list()


# ---- load ---------------------------------------------------------------------------


def _pick(runs_: list[VerlRun], want: str | None, issues: IssueLog, p: Path, notes: list[str]) -> VerlRun | None:
    if not runs_:
        return None
    names = ", ".join(r.name for r in runs_)
    if want is not None:
        hit = [r for r in runs_ if want in (r.name, r.experiment)]
        if not hit:
            issues.add(p, None, f"no verl run {want!r} here; runs: {names}")
            return None
        return hit[0]
    if len(runs_) == 1:
        return runs_[0]
    run = max(runs_, key=lambda r: r.newest())
    notes.append(f"{len(runs_)} verl runs here ({names}): read {run.name!r}, the newest; "
                 "pass --run NAME for another (runs are never merged)")
    return run


def _without_validation(files: list[tuple[int, Path]], notes: list[str]) -> list[tuple[int, Path]]:
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


_WITH_PENALTY = (pl.col("reward") + pl.col("overlong_reward").cast(pl.Float64)).alias("reward")


def _overlong_penalty_applies(rollouts: pl.DataFrame, metrics: pl.DataFrame, notes: list[str]) -> bool:
    """Whether the reward trained on is ``score + overlong_reward`` (`_WITH_PENALTY`), when the
    dump's ``score`` lacks DAPO's overlong penalty.

    ``DAPORewardManager`` (``verl/workers/reward_manager/dapo.py``) trains on ``score +
    overlong_reward``; with a dict-returning ``compute_score`` its pre-penalty ``score`` key
    replaces the dumped ``score`` (``_dump_generations``: same key). Which case a run is, the
    dump does not say; the trainer's ``critic/score/mean`` (the mean of ``token_level_scores``)
    does: the penalty is added only where the dumped scores miss it and the sum matches."""
    if "overlong_reward" not in rollouts.columns or "critic/score/mean" not in metrics.columns or \
            rollouts.schema["overlong_reward"] not in (pl.Float64, pl.Int64):
        return False
    with_pen = pl.col("reward") + pl.col("overlong_reward").cast(pl.Float64)
    per = rollouts.group_by("step").agg(pl.col("reward").mean().alias("dumped"), with_pen.mean().alias("penalised")) \
        .join(metrics.select("step", pl.col("critic/score/mean").alias("trained")), on="step").drop_nulls() \
        .filter(pl.col("trained").is_finite())
    if per.height == 0:
        return False

    def matches(c: str) -> bool:
        tol = 1e-3 * pl.max_horizontal(pl.lit(1.0), pl.col("trained").abs())
        return bool(per.select(((pl.col(c) - pl.col("trained")).abs() <= tol).all()).item())

    if matches("penalised") and not matches("dumped"):
        notes.append("the dumped 'score' is the reward function's own score, before DAPO's overlong penalty (a "
                     "dict-returning compute_score replaces verl's score key); reward = score + overlong_reward, as "
                     "trained (it matches critic/score/mean)")
        return True
    return False


def _own_dumps(files: list[tuple[int, Path]], metrics: pl.DataFrame, mfile: Path,
               issues: IssueLog) -> list[tuple[int, Path]]:
    """The dumps that can be this experiment's: none past its last logged step, but the one
    after it when that file is newer than the metrics file (``fit`` dumps a step's rollouts
    before it logs the step, so a run stopped in between has one dump more). verl's file logger
    writes each line at once (``"wb"``, unbuffered) and only ever loses the steps *before* a
    restart, so later dumps were written by another launch: another experiment with the same
    ``trainer.rollout_data_dir`` (``_dump_generations`` overwrites ``<step>.jsonl`` with "w") or
    the abandoned steps of a run resumed from an earlier checkpoint. They are never merged."""
    steps = _training_steps(metrics)
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


def _resume_check(metrics: pl.DataFrame, dump_steps: list[int], mfile: Path, issues: IssueLog) -> None:
    steps = _training_steps(metrics)
    if not steps or not dump_steps:
        return
    first = min(steps)
    lost = [s for s in dump_steps if s < first]
    if first > 1 and lost:
        issues.add(mfile, None, f"trainer metrics start at step {first}, but rollout dumps go back to step "
                                f"{min(lost)}: verl opens this file with 'wb', so the restart (resume) truncated it and "
                                f"the trainer metrics of {len(lost)} step(s) are lost; rewards and turn states of those "
                                "steps come from the dumps")


def load(p: Path, *, metrics: str | Path | None = None, run: str | None = None, **_options: Any) -> RunSource:
    """The verl run at ``p`` (a launch/run folder, a dump folder, a dump file or a metrics file).
    ``metrics``: the file logger's JSONL when it is not where verl puts it. ``run``: which run
    of a folder holding several. Other options are ignored."""
    issues = IssueLog()
    notes: list[str] = []
    files: list[tuple[int, Path]] = []
    mfiles: list[Path] = []
    chosen: VerlRun | None = None
    if p.is_file():
        if kind_of(first_object(p)) == "metrics":
            mfiles = [p]
        else:
            m = STEP_FILE_RE.match(p.name)
            files = [(int(m.group(1)) if m else 0, p)]
    else:
        layout = find_layout(p)
        notes += layout.notes
        chosen = _pick(layout.runs, run, issues, p, notes)
        if chosen is not None:
            if chosen.dumps is not None:
                files = step_files(chosen.dumps)
            if chosen.metrics is not None:
                mfiles = [chosen.metrics]
            for v in chosen.validation:
                vsteps = [s for s, _ in step_files(v)]
                notes.append(f"validation dumps in {v} (steps {', '.join(map(str, vsteps[:8]))}"
                             f"{', ...' if len(vsteps) > 8 else ''}; trainer.validation_data_dir) kept apart: "
                             "not read as training rollouts")
        elif not layout.runs and is_dump_dir(p, strict=False):
            files = step_files(p)
    if metrics is not None:
        mp = Path(metrics)
        if mp.is_dir():
            found = metrics_files_in(mp)
            mp = found[0] if len(found) == 1 else mp
        if not mp.is_file():
            issues.add(mp, None, "--metrics: no such file (or a folder without exactly one verl metrics JSONL)")
        else:
            mfiles = [mp]
    files = _without_validation(files, notes)
    if chosen is not None and chosen.dumps is not None and is_validation_dir(chosen.dumps):
        notes.append(f"{chosen.dumps} holds validation dumps (trainer.validation_data_dir: step 0, 'reward' key), "
                     "the only dumps here: read as the rollouts")
    mdf = read_metrics(mfiles, issues)
    if mdf is not None and len(files) > 1:
        files = _own_dumps(files, mdf, mfiles[0], issues)
    small, rollouts = read_rollouts(files, issues)
    if not files:
        notes.append("no <step>.jsonl rollout dumps (trainer.rollout_data_dir unset?): no rollouts, no turn states")
    else:
        notes.append("verl dumps text decoded with skip_special_tokens=True: <|im_start|>/<|im_end|> are gone, so stray "
                     "control tokens cannot be seen; turns are split at the tool rounds the tool agent loop inserts "
                     "(user\\n<tool_response>...</tool_response>\\nassistant\\n) and at interaction rounds "
                     "(user\\n...\\nassistant\\n); a turn is classified by its text after </think> (Qwen3 reasoning); "
                     "no token probabilities")
    if mdf is not None:
        mdf = _map_lengths(mdf, small, notes)
        if _overlong_penalty_applies(small, mdf, notes):
            small, rollouts = small.with_columns(_WITH_PENALTY), rollouts.with_columns(_WITH_PENALTY)
    derived = derived_metrics(small)
    for k in sorted(_options):
        notes.append(f"option {k} is not used by the verl adapter; ignored")
    if mdf is None:
        notes.append("no verl file-logger metrics found (verl writes them, with trainer.logger including 'file', to "
                     "$VERL_FILE_LOGGER_ROOT, default the launch folder, /<project_name>/<experiment_name>.jsonl): "
                     "metrics derived from the dumps, no entropy/KL/clip/grad norm; pass --metrics PATH")
        out = derived
    else:
        out = _merge(mdf, derived)
        notes.append(f"verl opens its metrics file {mfiles[0].name} with 'wb': every start, a resume included, "
                     "truncates it, so it holds only the steps since the last start")
        _resume_check(mdf, sorted({s for s, _ in files}), mfiles[0], issues)
        if "actor/kl_loss" in out.columns:
            notes.append("'kl' is verl's actor/kl_loss (KL to the reference policy); actor/ppo_kl (rollout vs "
                         "updated policy) keeps its own name")
        skipped = sorted({c.split("/")[0] + "/*" for c in out.columns
                          if c.startswith(("timing_s/", "timing_per_token_ms/", "perf/"))})
        if skipped:
            notes.append(f"not analysed (bookkeeping): {', '.join(skipped)}, training/global_step, training/epoch")
        if "mismatch/abs_prob_diff" in out.columns:
            notes.append("mismatch/abs_prob_diff is verl's training/rollout_probs_diff_mean: mean |p_actor - "
                         "p_rollout| over response tokens, a probability difference, not a log-prob one")
    return make_source(p, FORMAT, metrics=out, rollouts=rollouts, issues=issues, notes=notes,
                       files=[f for _, f in files] + mfiles)


def step_of_file(rel: str, single_file: bool) -> int | str:
    """What a fingerprint file holds: a dump ``<step>.jsonl`` its step (the file's lines all
    come from that ``global_steps``), the file logger's JSONL ``"metrics"``, anything else
    ``"global"``. Validation dumps are not in the fingerprint (nothing reads them)."""
    name = rel.replace("\\", "/").rsplit("/", 1)[-1]
    m = STEP_FILE_RE.match(name)
    if m:
        return int(m.group(1))
    return "metrics" if name.endswith(".jsonl") else "global"
