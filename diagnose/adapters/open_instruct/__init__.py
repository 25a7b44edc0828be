"""open-instruct rollout traces as a `RunSource`, read as open-instruct writes them.

Source followed (allenai/open-instruct): ``open_instruct/rl_utils.py`` (``RolloutRecord``,
``_save_rollouts``, ``save_rollouts_to_disk``, ``save_rollout_metadata``,
``_get_request_info_for_sample``), ``open_instruct/data_loader.py``
(``DataPreparationActor._data_preparation_loop``: ``--save_traces``, ``rollouts_save_path``,
the 0-based step, the advantages) and ``open_instruct/vllm_utils.py`` (``process_request``: the
response is the model turns with the tool outputs appended, log-prob 0.0 and no saved mask).

Layout: in ``rollouts_save_path`` (default shared by every run), per run
``<run_name>_metadata.jsonl`` (``model_name``) and ``<run_name>_rollouts_<shard:06d>.jsonl``
(shard = samples written so far // 10000, so one shard holds many steps), one JSON line per
sample: ``step``, ``sample_idx``, ``prompt_idx``, ``prompt_tokens``, ``response_tokens``,
``reward``, ``advantage``, ``finish_reason``, ``dataset``, ``ground_truth``, ``request_info``,
``logprobs``. No text: turn states need the tokenizer (``tokenizer=`` option). Several runs in
one folder are never merged: `runs` lists them, ``run=`` picks one; a run resumed under a new
run name is one run (`diagnose.adapters.open_instruct.layout`). Trainer metrics go to wandb
only (``grpo_fast.py``), so metrics are derived from the traces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from diagnose.adapters._common.hooks import the_run
from diagnose.adapters._common.io import first_object
from diagnose.adapters._common.issues import IssueLog, NonFinite
from diagnose.adapters._common.rollouts import empty_rollouts
from diagnose.adapters._common.source import make_source
from diagnose.adapters.open_instruct.layout import SHARD_RE, RunFiles, layout, resolve
from diagnose.adapters.open_instruct.records import Record, TraceCounts, parse_record
from diagnose.adapters.open_instruct.tables import TableBuilder
from diagnose.adapters.open_instruct.tokenizer import LoadedTokenizer, TokenizerError, load_tokenizer, tokenizer_hint
from diagnose.jsonl import LineError, iter_jsonl
from diagnose.source import RunSource

__all__ = ["FORMAT", "OPTIONS", "detect", "has_candidates", "load", "run_alias", "runs", "step_of_file",
           "trace_files"]

FORMAT = "open_instruct"
#: `load_run` options `load` takes
OPTIONS = ("run", "tokenizer", "trackers")


# ---- layout ---------------------------------------------------------------------------------


def runs(p: Path) -> list[str]:
    """The run names with rollout shards at ``p`` (open-instruct's save path is shared); a run
    resumed under a new run name is one run, named by its first start."""
    return list(layout(Path(p)))


def trace_files(p: Path) -> list[Path]:
    return [f for r in layout(p).values() for f in r.shards]


def detect(p: Path) -> bool:
    files = trace_files(p)
    if not files:
        return False
    for f in files[:3]:  # the name is specific; content confirms when a first line is readable
        obj = first_object(f)
        if obj is not None:
            return "response_tokens" in obj or "prompt_idx" in obj or "logprobs" in obj
    return True


def has_candidates(p: Path) -> bool:
    return bool(trace_files(p))


def _model_name(meta: list[Path], issues: IssueLog) -> str | None:
    for f in meta:
        for line_no, obj in iter_jsonl(f):
            if isinstance(obj, LineError):
                issues.line_error(obj)
                continue
            name = obj.get("model_name")
            if isinstance(name, str) and name and name != "unknown":
                return name
            issues.add(f, line_no, "no 'model_name' in the metadata line")
    return None


def _resolve_tokenizer(option: Any, model: str | None, issues: IssueLog, where: Path,
                       notes: list[str]) -> LoadedTokenizer | None:
    """The ``tokenizer=`` option, else the metadata's ``model_name`` when it is a local folder."""
    if option is not None:
        try:
            return load_tokenizer(option)
        except TokenizerError as e:
            issues.add(str(option), None, f"{e}; reading the traces without a tokenizer")
            return None
    if model:
        try:
            local = Path(model).expanduser().is_dir()
        except OSError:
            local = False
        try:
            tok = load_tokenizer(model)
        except TokenizerError as e:
            if local:
                issues.add(model, None, f"the metadata's model_name is a folder but {e}")
        else:
            where = "folder" if local else "(in the local Hugging Face cache)"
            notes.append(f"tokenizer: the model {where} named in the metadata ({model})")
            return tok
    what = f"model_name {model!r} in the metadata" if model else "no model named (metadata missing)"
    issues.add(where, None, "token trace without a tokenizer: open-instruct saves token ids only, so turn "
                            "states, tool-output spans and control-token statistics need the tokenizer ("
                            f"{what}); {tokenizer_hint(model)}")
    return None


# ---- load -----------------------------------------------------------------------------------


def load(p: Path, *, run: str | None = None, tokenizer: Any = None, trackers: Any = None) -> RunSource:
    """``run``: the run to read, one of `runs` (`load_run` chooses it; None when the folder
    holds one); ``tokenizer``: a path or tokenizer object to decode the token ids with;
    ``trackers`` (`diagnose.adapters.trackers.attach.TrackerData`): the W&B run of
    ``--with_tracking``, whose trainer metrics are merged on the traces' step."""
    issues = IssueLog()
    notes: list[str] = []
    chosen = the_run(layout(p), run)
    tracked = trackers is not None and trackers.metrics.height > 0
    if chosen is None and tracked:
        notes.append("no <run_name>_rollouts_<shard>.jsonl traces (--save_traces off): trainer metrics from the "
                     "experiment trackers only, on wandb's training_step")
        return make_source(p, FORMAT, metrics=_tracker_metrics(trackers, 0), rollouts=empty_rollouts(),
                           issues=issues, notes=notes, files=[])
    if chosen is None:
        notes.append("no <run_name>_rollouts_<shard>.jsonl files")
        return _empty(p, issues, notes, [])
    name, shards, meta = chosen.name, chosen.shards, chosen.meta
    model = _model_name(meta, issues)
    notes.append(f"open-instruct run {name}" + (f" (model {model})" if model else ""))
    _resume_notes(chosen, notes)
    tok = _resolve_tokenizer(tokenizer, model, issues, meta[0] if meta else shards[0], notes)
    records = _read(chosen, issues)
    built = TableBuilder(tok, issues, notes).build(records)
    files = [*shards, *meta, *(tok.files if tok else [])]
    _standard_notes(notes, tok, tracked)
    metrics = built["metrics"]
    if tracked:
        from diagnose.adapters.trackers.merge import fill_metrics

        metrics = fill_metrics(_tracker_metrics(trackers, 1), metrics)
    return make_source(p, FORMAT, metrics=metrics, rollouts=built["rollouts"], tokens=built["tokens"],
                       control_tokens=built["control_tokens"], issues=issues, notes=notes, files=files)


def _resume_notes(run: RunFiles, notes: list[str]) -> None:
    for start, first in run.starts[1:]:
        notes.append(f"run {run.name} resumed as {start} from step {first} (open-instruct names every start "
                     "<exp_name>__<seed>__<unix time>): read as one run; steps written by both starts are read "
                     "from the later one (the one trained on)")


def _tracker_metrics(trackers: Any, shift: int) -> pl.DataFrame:
    """The trackers' metrics in our names, on the traces' step (``training_step - shift``)."""
    from diagnose.adapters.trackers.names import signal_names

    config = next((r.config for r in trackers.runs if r.config), {})
    df = signal_names(trackers.metrics, "open_instruct", config)
    return df.with_columns((pl.col("step") - shift).alias("step")).filter(pl.col("step") >= 0) if shift else df


def _empty(p: Path, issues: IssueLog, notes: list[str], files: list[Path]) -> RunSource:
    return make_source(p, FORMAT, metrics=pl.DataFrame(schema={"step": pl.Int64}), rollouts=empty_rollouts(),
                       issues=issues, notes=notes, files=files)


def _standard_notes(notes: list[str], tok: LoadedTokenizer | None, tracked: bool = False) -> None:
    if tracked:
        notes.append("trainer metrics (scores, KL, entropy, clipfrac, grad norm) from the W&B run, moved from wandb's "
                     "training_step to the traces' step (training_step - 1); turn states and tool use from the traces")
    else:
        notes.append("open-instruct logs trainer metrics (loss, KL, entropy, clipfrac) to wandb only: metrics are "
                     "derived from the traces (reward, turn states, tool use from request_info, generated length)")
    notes.append("log-probs are vLLM's sampling log-probs (processed: after temperature and top-p/top-k): logprob "
                 "is that, no trainer-side log-probs (no train/inference mismatch), no entropy")
    if tok is not None:
        notes.append("control-token log-probs (lp_ctrl_*) are known only where that token was sampled; the "
                     "control-token probabilities (ctrl/*, ctx/*) are sampling rates, which estimate them")
    notes.append("the traces' step is open-instruct's 0-based data step; wandb's training_step is step + 1")
    notes.append("kept as rollout columns but read by no detector: advantage, dataset, ground_truth, tool_runtimes, "
                 "tool_outputs / tool_errors text; metric read by no detector: batch/filtered_prompts_pct")
    notes.append("with async_steps > 1 (default 8) a step's samples may come from a policy up to async_steps "
                 "updates older (model_step is not saved), so a change in the traces can show up to that many "
                 "steps after the update that caused it")


def _read(run: RunFiles, issues: IssueLog) -> list[Record]:
    """Every readable record of the run. A step written by several starts of a resumed run is
    read from the last of them only (the one trained on; it may hold another number of
    groups); within one start, the last write of a ``(step, sample_idx)`` wins."""
    nonfinite = NonFinite()
    start_of = {name: k for k, (name, _) in enumerate(run.starts)}
    by_key: dict[tuple[int, int, int], int] = {}
    out: list[Record | None] = []
    starts: list[int] = []
    last: dict[int, int] = {}  # step -> the last start that wrote it
    first_file: dict[tuple[int, int], Path] = {}  # (start, step) -> a file of it
    dup_steps: dict[Path, set[int]] = {}
    for f in run.shards:
        m = SHARD_RE.match(f.name)
        k = start_of.get(m["run"], 0) if m else 0
        counts = TraceCounts()
        n_good = 0
        for line_no, obj in iter_jsonl(f):
            if isinstance(obj, LineError):
                issues.line_error(obj)
                continue
            rec = parse_record(obj, f, line_no, issues, nonfinite, counts)
            if rec is None:
                continue
            n_good += 1
            if rec.sample_idx is not None:
                key = (k, rec.step, rec.sample_idx)
                if key in by_key:
                    out[by_key[key]] = None
                    dup_steps.setdefault(f, set()).add(rec.step)
                by_key[key] = len(out)
            last[rec.step] = max(last.get(rec.step, k), k)
            first_file.setdefault((k, rec.step), f)
            out.append(rec)
            starts.append(k)
        counts.report(f, issues)
        if n_good == 0:
            issues.add(f, None, "no readable rollout lines in this file")
    for (k, step), f in first_file.items():
        if last[step] > k:
            dup_steps.setdefault(first_file[(last[step], step)], set()).add(step)
    for f, steps in dup_steps.items():
        s = sorted(steps)
        issues.add(f, None, f"step(s) {s[:5]}{'...' if len(s) > 5 else ''} written again (a resumed run re-writes "
                            "the steps it had prepared): the last start's samples of each are used")
    nonfinite.flush(issues)
    return [r for r, k in zip(out, starts) if r is not None and k == last[r.step]]


# ---- which steps a file holds (scan cache) ---------------------------------------------------


def step_of_file(rel: str, single_file: bool) -> int | str:
    """What a fingerprint file holds, for the scan cache: ``"global"`` for every open-instruct
    file. A shard (``<run>_rollouts_<shard>.jsonl``) is numbered by samples written, not by step,
    and is appended to, so any step may live in it; the metadata and the tokenizer files change
    how every step is read."""
    return "global"


def run_alias(p: Path, name: str) -> str:
    """The run that ``name`` names: itself, or the first start of the run it resumed."""
    run = resolve(layout(Path(p)), name)
    return run.name if run is not None else name
