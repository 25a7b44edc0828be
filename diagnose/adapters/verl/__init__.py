"""verl run as a `RunSource`, read the way verl 0.8.0.dev writes it.

* Rollout dumps (``trainer.rollout_data_dir``): ``<step>.jsonl`` from
  ``RayPPOTrainer._dump_generations`` (``verl/trainer/ppo/ray_trainer.py``), one line per
  sample with ``input``, ``output``, ``gts``, ``score``, ``step`` and the reward function's
  extra keys (e.g. ``acc``, ``pred``). ``input``/``output`` are the prompt and response ids
  decoded with ``skip_special_tokens=True`` (``_log_rollout_data``).
* Turns (`diagnose.transcripts.Dialect.VERL`): the tool agent loop
  (``verl/experimental/agent_loop/tool_agent_loop.py``) appends the
  tool messages' ids from ``apply_chat_template(..., remove_system_prompt=True)``; with Qwen's
  template they start at ``<|im_start|>user`` and end with the ``<|im_start|>assistant\\n``
  generation prompt. Decoded without special tokens, a response reads
  ``<call></tool_call>user\\n<tool_response>\\n...\\n</tool_response>\\nassistant\\n<next turn>``
  (no newline before ``user``: the turn's ``<|im_end|>`` is gone).
  `diagnose.transcripts.split_turns` cuts there, and at an interaction's
  ``user\\n...\\nassistant\\n`` rounds; each turn is classified by its text after Qwen3's
  ``</think>`` (`diagnose.turns.answer_part`), with the tools the prompt offers.
* Metrics: the file logger (``verl/utils/tracking.py`` ``FileLogger``), ``{"step": N, "data":
  {...}}`` orjson lines (NaN and ±inf become ``null``), found where verl puts it
  (`diagnose.adapters.verl.layout`) or given with ``metrics=``.
* Validation dumps (``trainer.validation_data_dir``, step 0 and every ``test_freq``, a
  ``reward`` key) are kept apart: never read as training rollouts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diagnose.adapters._common.hooks import the_run
from diagnose.adapters._common.io import first_object, subdirs
from diagnose.adapters._common.issues import IssueLog
from diagnose.adapters._common.metrics import derived_metrics
from diagnose.adapters._common.source import make_source
from diagnose.adapters._common.turns import TurnClassifier
from diagnose.adapters.verl.dumps import own_dumps, read_dumps, with_overlong_penalty, without_validation
from diagnose.adapters.verl.layout import (
    STEP_FILE_RE,
    VerlRun,
    find_layout,
    is_dump_dir,
    is_validation_dir,
    kind_of,
    metrics_files_in,
    step_files,
)
from diagnose.adapters.verl.metrics import NAME_MAP, map_lengths, merge_derived, read_metrics, resume_check, verl_names
from diagnose.source import RunSource
from diagnose.transcripts import Dialect

__all__ = ["FORMAT", "NAME_MAP", "OPTIONS", "detect", "has_candidates", "load", "read_metrics", "run_alias", "runs",
           "step_of_file"]

FORMAT = "verl"
#: `load_run` options `load` takes
OPTIONS = ("metrics", "run", "trackers")


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


def run_alias(p: Path, name: str) -> str:
    """The run ``name`` names: itself, or the one run here whose experiment is ``name``
    (``trainer.experiment_name`` without its project)."""
    found = [] if p.is_file() else find_layout(p).runs
    if any(r.name == name for r in found):
        return name
    hits = [r.name for r in found if r.experiment == name]
    return hits[0] if len(hits) == 1 else name


# ---- load ---------------------------------------------------------------------------


def load(p: Path, *, metrics: str | Path | None = None, run: str | None = None, trackers: Any = None) -> RunSource:
    """The verl run at ``p`` (a launch/run folder, a dump folder, a dump file or a metrics file).
    ``metrics``: the file logger's JSONL when it is not where verl puts it. ``run``: the run to
    read, one of `runs` (`load_run` chooses it); None when ``p`` holds one. ``trackers``
    (`diagnose.adapters.trackers.attach.TrackerData`): the run's tracker data (``Tracking`` logs
    the same keys to every backend), whose metrics fill what the file logger's lack."""
    issues = IssueLog()
    notes: list[str] = []
    classifier = TurnClassifier(dialect=Dialect.VERL)
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
        chosen = the_run({r.name: r for r in layout.runs}, run)
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
    files = without_validation(files, notes)
    if chosen is not None and chosen.dumps is not None and is_validation_dir(chosen.dumps):
        notes.append(f"{chosen.dumps} holds validation dumps (trainer.validation_data_dir: step 0, 'reward' key), "
                     "the only dumps here: read as the rollouts")
    mdf = read_metrics(mfiles, issues)
    if trackers is not None and trackers.metrics.height > 0:
        from diagnose.adapters.trackers.merge import fill_metrics

        tm = verl_names(trackers.metrics)
        mdf = tm if mdf is None else fill_metrics(mdf, tm)
    if mdf is not None and mfiles and len(files) > 1:
        files = own_dumps(files, mdf, mfiles[0], issues)
    rollouts = read_dumps(files, issues, classifier)
    if not files:
        notes.append("no <step>.jsonl rollout dumps (trainer.rollout_data_dir unset?): no rollouts, no turn states")
    else:
        notes.append("verl dumps text decoded with skip_special_tokens=True: <|im_start|>/<|im_end|> are gone, so stray "
                     "control tokens cannot be seen; turns are split at the tool rounds the tool agent loop inserts "
                     "(user\\n<tool_response>...</tool_response>\\nassistant\\n) and at interaction rounds "
                     "(user\\n...\\nassistant\\n); a turn is classified by its text after </think> (Qwen3 reasoning); "
                     "no token probabilities")
    if mdf is not None:
        mdf = map_lengths(mdf, rollouts, notes)
        rollouts = with_overlong_penalty(rollouts, mdf, notes)
    derived = derived_metrics(rollouts)
    if mdf is None and trackers is None:
        notes.append("no verl file-logger metrics found (verl writes them, with trainer.logger including 'file', to "
                     "$VERL_FILE_LOGGER_ROOT, default the launch folder, /<project_name>/<experiment_name>.jsonl): "
                     "metrics derived from the dumps, no entropy/KL/clip/grad norm; pass --metrics PATH")
        out = derived
    elif mdf is None:
        out = derived
    else:
        out = merge_derived(mdf, derived)
        if mfiles:
            notes.append(f"verl opens its metrics file {mfiles[0].name} with 'wb': every start, a resume included, "
                         "truncates it, so it holds only the steps since the last start")
            resume_check(mdf, sorted({s for s, _ in files}), mfiles[0], issues)
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
                       files=[f for _, f in files] + mfiles, dialect=Dialect.VERL)


def step_of_file(rel: str, single_file: bool) -> int | str:
    """What a fingerprint file holds: a dump ``<step>.jsonl`` its step (the file's lines all
    come from that ``global_steps``), the file logger's JSONL ``"metrics"``, anything else
    ``"global"``. Validation dumps are not in the fingerprint (nothing reads them)."""
    name = rel.replace("\\", "/").rsplit("/", 1)[-1]
    m = STEP_FILE_RE.match(name)
    if m:
        return int(m.group(1))
    return "metrics" if name.endswith(".jsonl") else "global"
