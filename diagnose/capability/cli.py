"""``diagnose probe``: is the tool-use capability still there when the format breaks?

Registered in ``diagnose/cli.py``. Heavy imports (torch, transformers) happen inside the
command, so ``diagnose --help`` stays fast. Error policy as ``diagnose scan``: one line on
stderr naming the file, never a traceback (``DIAGNOSE_DEBUG=1`` shows it for internal errors).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from diagnose.cli_errors import EXIT_INTERNAL, EXIT_USAGE, command_errors, require
from diagnose.versions import versions

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

EXIT_OK = 0
MAX_ERRORS_SHOWN = 20

PROBE_EPILOG = (
    "Exit codes: 0 = probed (checkpoints that could not be loaded are named on stderr and skipped; the "
    "others are probed); 2 = usage error or unreadable input (missing run / model / task file, no usable "
    "task, no checkpoint, no checkpoint loadable); 3 = internal error. Results are written to "
    "<run>/capability/ (or <model>/capability/, or --out DIR/capability/); see docs/probe.md."
)

MEASURE_LABELS = {
    "native": "native",
    "repair_forbid": "repair: forbid",
    "repair_prefill": "repair: prefill",
    "alt_pythonic": "python-list",
    "alt_json": "JSON",
    "likelihood": "likelihood",
}
VERDICT_STYLE = {
    "healthy": "bold green",
    "capability intact, format broken": "bold yellow",
    "capability lost": "bold red",
    "inconclusive": "dim",
}


def _err(msg: str) -> None:
    err_console.print(f"[red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)


def _note(msg: str, style: str = "yellow", label: str = "note") -> None:
    err_console.print(f"[{style}]{label}:[/] {escape(msg)}", highlight=False, soft_wrap=True)


@dataclass
class Target:
    name: str
    step: int | None
    path: Path
    roles: list[str] = field(default_factory=list)


class _Progress:
    """Rich progress over checkpoints x tasks x measures, on stderr. Without a terminal (a pipe, a
    log: where a bar would only show at the end) one line per checkpoint instead."""

    def __init__(self, total: int, show: bool, n_checkpoints: int = 0):
        self.show = show
        self.total = total
        self.label = ""
        self.n_checkpoints, self.done, self.t0 = n_checkpoints, 0, time.perf_counter()

    def __enter__(self) -> _Progress:
        if self.show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=err_console, transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("probing", total=self.total)
        return self

    def checkpoint(self, name: str) -> None:
        self.label = name
        self.done += 1
        if not self.show:
            t = int(time.perf_counter() - self.t0)
            err_console.print(f"probing {escape(name)} ({self.done}/{self.n_checkpoints}; {t // 60}:{t % 60:02d})",
                              highlight=False)

    def __call__(self, measure: str, n: int) -> None:
        if self.show:
            self.bar.update(self.task, advance=n, description=f"{escape(self.label)}: {measure}")

    def __exit__(self, *exc: Any) -> None:
        if self.show:
            self.bar.__exit__(*exc)


def _targets_for_run(run: Path, mode: str, names: list[str] | None) -> tuple[list[Target], Path | None]:
    from diagnose.capability.select import select_checkpoints
    from diagnose.rundir.schema import RunFormatError

    try:
        sel = select_checkpoints(run, mode, names)
    except (RunFormatError, OSError) as e:
        hint = f" (a model directory? use --model {run})" if (run / "config.json").is_file() else ""
        _err(f"{e}{hint}" if str(run) in str(e) else f"{run}: {e}{hint}")
        raise typer.Exit(EXIT_USAGE) from None
    for n in sel.notes:
        _note(n, "dim", "checkpoints")
    if sel.unknown:
        _note(f"{run}: no checkpoint named {', '.join(sel.unknown)} (available: "
              f"{', '.join(sel.available) or 'none'}); skipped", "yellow", "skipped")
    if not sel.checkpoints:
        _err(f"{run}: no checkpoint to probe" + (f" (available: {', '.join(sel.available)})" if sel.available else ""))
        raise typer.Exit(EXIT_USAGE)
    return [Target(c.name, c.step, c.path, c.roles) for c in sel.checkpoints], sel.tokenizer_fallback


def _writable_dir(d: Path) -> bool:
    try:
        (d / "capability").mkdir(parents=True, exist_ok=True)
        probe = d / "capability" / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:.0%}"


def render_tables(summary: list[dict], results: list[dict], meta: dict) -> tuple[Table, Table]:
    """Two tables that fit a terminal: measures x checkpoints (accuracy; repairs with how often
    they fired, likelihood with its chance level), then one verdict row per checkpoint."""
    names = [s["checkpoint"] for s in summary]
    by = {(r["checkpoint"], r["measure"]): r for r in results}
    measures = Table()
    measures.add_column("measure")
    for name in names:
        roles = meta["checkpoints"].get(name, {}).get("roles") or []
        measures.add_column(escape(name) + (f"\n[dim]{escape(', '.join(roles))}[/]" if roles else ""), justify="right")
    for m in meta["config"]["measures"]:
        cells = []
        for name in names:
            r = by.get((name, m), {})
            cell = _pct(r.get("accuracy"))
            chance = meta["checkpoints"].get(name, {}).get("likelihood_chance")
            if m == "likelihood" and chance is not None and r.get("accuracy") is not None:
                cell += f" [dim](chance {chance:.0%})[/]"
            elif r.get("fired_rate") is not None:
                cell += f" [dim](fired {r['fired_rate']:.0%})[/]"
            cells.append(cell)
        measures.add_row(MEASURE_LABELS.get(m, m), *cells)
    verdicts = Table(title="verdict", title_justify="left")
    for c in ("checkpoint", "format", "capability", "gap", "verdict"):
        verdicts.add_column(c, justify="left" if c in ("checkpoint", "verdict") else "right")
    for s in summary:
        gap = s.get("format_gap")
        verdicts.add_row(escape(s["checkpoint"]), _pct(s.get("format_score")), _pct(s.get("capability_score")),
                         "-" if gap is None else f"{gap:+.0%}",
                         f"[{VERDICT_STYLE.get(s['verdict'], 'bold')}]{escape(s['verdict'])}[/]")
    return measures, verdicts


@dataclass
class _Outcome:
    results: list[dict] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)
    per_ckpt: dict[str, dict] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    internal: bool = False  # a bug hit some checkpoint
    tasks: list = field(default_factory=list)  # the tasks probed (a task file's: those that fit the context)
    task_errors: list = field(default_factory=list)  # a task file's tasks over the context (LineError)


def _fit_task_file(out: _Outcome, tok: Any, cfg: Any, task_file: Path) -> None:
    """Keep the first ``cfg.n_tasks`` of the task file's tasks whose gold trajectory fits
    ``cfg.max_context`` tokens; each other one is named and skipped (its work would grow with its
    size: `diagnose.tasks.fit_context`)."""
    from diagnose.tasks import fit_context

    kept, out.task_errors = fit_context(out.tasks, tok, cfg.max_context, "max_context", task_file)
    out.tasks = kept[: cfg.n_tasks]
    for e in out.task_errors[:MAX_ERRORS_SHOWN]:
        _note(str(e), "yellow", "skipped")
    if len(out.task_errors) > MAX_ERRORS_SHOWN:
        _note(f"... and {len(out.task_errors) - MAX_ERRORS_SHOWN} more tasks over the context in {task_file}",
              "yellow", "skipped")


def _probe_targets(targets: list[Target], tasks: list, cfg: Any, device: str, tokenizer_fallback: Path | None, *,
                   auto_tokens: bool, task_file: Path | None = None, base: Path | None = None) -> _Outcome:
    """Load and probe every target in turn; one that cannot be loaded (or hits a bug) is named on
    stderr and skipped, the others are still probed. A task file's tasks: the first
    ``cfg.n_tasks`` that fit the context of the first tokenizer that loads (every checkpoint
    probes the same tasks)."""
    import gc

    import torch

    from diagnose.capability.runner import ProbeInputError, auto_max_new_tokens, load_checkpoint, probe_model
    from diagnose.capability.verdict import summarize

    out = _Outcome(tasks=list(tasks) if task_file is not None else list(tasks[: cfg.n_tasks]))
    per_target = cfg.n_tasks * len(cfg.measures)

    def skip(tgt: Target, reason: str) -> None:
        out.skipped.append({"checkpoint": tgt.name, "path": str(tgt.path), "reason": reason})

    with _Progress(per_target * len(targets), err_console.is_terminal, len(targets)) as progress:
        for tgt in targets:
            progress.checkpoint(tgt.name)
            t1 = time.perf_counter()
            try:
                model, tok = load_checkpoint(tgt.path, tokenizer_path=tokenizer_fallback, device=device, base=base)
            except ProbeInputError as e:
                _note(f"{e}; skipped", "yellow", "skipped")
                skip(tgt, str(e))
                progress("skipped", per_target)
                continue
            if task_file is not None:
                _fit_task_file(out, tok, cfg, task_file)
                task_file = None
                if not out.tasks:
                    del model, tok
                    break
                cfg.n_tasks = len(out.tasks)
            tasks = out.tasks
            if auto_tokens:
                cfg.max_new_tokens = auto_max_new_tokens(tok, tasks)
            try:
                res = probe_model(model, tok, tasks, cfg, progress=progress)
            except ProbeInputError as e:
                _note(f"{tgt.path}: {e}; skipped", "yellow", "skipped")
                skip(tgt, str(e))
                continue
            except Exception as e:  # noqa: BLE001 - one broken checkpoint must not lose the others
                if os.environ.get("DIAGNOSE_DEBUG"):
                    raise
                out.internal = True
                err_console.print(f"[red]internal error[/] while probing {escape(str(tgt.path))}: "
                                  f"{escape(type(e).__name__)}: {escape(str(e))}; skipped", highlight=False,
                                  soft_wrap=True)
                skip(tgt, f"internal error: {type(e).__name__}: {e}")
                continue
            finally:
                del model, tok
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            rows = [{"checkpoint": tgt.name, "step": tgt.step, **r} for r in res.rows]
            out.results.extend(rows)
            out.summary.append(summarize(tgt.name, tgt.step, rows, chance=res.likelihood_chance, cfg=cfg))
            out.per_ckpt[tgt.name] = {"path": str(tgt.path), "step": tgt.step, "roles": tgt.roles,
                                      "likelihood_chance": res.likelihood_chance,
                                      "likelihood_by_kind": res.likelihood_by_kind, "notes": res.notes,
                                      "seconds": round(time.perf_counter() - t1, 2)}
    return out


def probe(
    run: Path = typer.Argument(None, metavar="RUN", show_default=False,
                               help="A run directory written by train-minimal (its checkpoints/ are probed)."),
    model: Path = typer.Option(None, "--model", help="Probe one Hugging Face model directory (or PEFT adapter "
                                                     "folder) instead of a run.", show_default=False),
    base: Path = typer.Option(None, "--base", help="Base model of a LoRA adapter (default: the one its "
                                                   "adapter_config.json names, when it is on this machine).",
                              show_default=False),
    task_file: Path = typer.Option(None, "--task-file", help="Tasks from a JSONL task file (docs/environment.md) "
                                                             "instead of generated held-out tasks.", show_default=False),
    checkpoints: str = typer.Option(None, "--checkpoints", help="Comma-separated checkpoints: step-000120,240,...",
                                    show_default=False),
    around_episodes: bool = typer.Option(False, "--around-episodes", help="Checkpoints before onset / at trough "
                                         "of every collapse episode found by scan, and the last (the default)."),
    all_: bool = typer.Option(False, "--all", help="Every complete checkpoint."),
    tasks: int = typer.Option(100, "--tasks", min=1, help="Number of tasks (the same for every checkpoint)."),
    split: str = typer.Option("test", "--split", help="Split of the generated tasks (test, content_ood, ...)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the generated tasks."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", min=1, show_default=False,
                                       help="Token limit per assistant turn (default: from the gold turns)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:1, ... (auto: cuda if available)."),
    out: Path = typer.Option(None, "--out", help="Write DIR/capability/ instead of the run's / model's directory.",
                             file_okay=False, show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object on stdout."),
) -> None:
    """Is the tool-use capability still there when the format breaks? Per checkpoint, on the same
    held-out tasks: native greedy accuracy, accuracy with minimal format repairs (forbid premature
    control tokens in an open call; prefill the call prefix), accuracy in other call syntaxes
    (python list, JSON), and a teacher-forced likelihood probe (gold call vs distractors); then a
    format score, a capability score, the gap and a verdict.

    By default probes the checkpoints around each collapse episode that `diagnose scan` finds (before onset, at the trough, the last); with no episode, the first and the last."""
    with command_errors("probing", err_console, command="diagnose probe"):
        require("model", "diagnose probe")
        _probe(run, model, task_file, checkpoints, around_episodes, all_, tasks, split, seed, max_new_tokens,
               device, out, as_json, base)


def _probe(run: Path | None, model: Path | None, task_file: Path | None, checkpoints: str | None,
           around_episodes: bool, all_: bool, n_tasks: int, split: str, seed: int, max_new_tokens: int | None,
           device: str, out: Path | None, as_json: bool, base: Path | None = None) -> None:
    # ---- usage
    if (run is None) == (model is None):
        _err("give a run directory or --model PATH (not both)")
        raise typer.Exit(EXIT_USAGE)
    modes = [m for m, on in (("names", checkpoints is not None), ("around", around_episodes), ("all", all_)) if on]
    if len(modes) > 1:
        _err("--checkpoints, --around-episodes and --all exclude each other")
        raise typer.Exit(EXIT_USAGE)
    if modes and model is not None:
        _err("--checkpoints / --around-episodes / --all select checkpoints of a run; --model probes one model")
        raise typer.Exit(EXIT_USAGE)
    from diagnose.tasks import SPLITS

    if task_file is None and split not in SPLITS:
        _err(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        raise typer.Exit(EXIT_USAGE)
    target_path = run if run is not None else model
    if not os.path.lexists(target_path):
        _err(f"{target_path}: no such file or directory")
        raise typer.Exit(EXIT_USAGE)

    # ---- tasks
    from diagnose.capability.config import ProbeConfig
    from diagnose.capability.tasksets import load_taskset

    try:
        taskset = load_taskset(n_tasks, split=split, seed=seed, task_file=task_file)
    except OSError as e:
        _err(f"{task_file}: {e.strerror or e}" if isinstance(e, (IsADirectoryError,)) else str(e))
        raise typer.Exit(EXIT_USAGE) from None
    for e in taskset.errors[:MAX_ERRORS_SHOWN]:
        _note(str(e), "yellow", "skipped")
    if len(taskset.errors) > MAX_ERRORS_SHOWN:
        _note(f"... and {len(taskset.errors) - MAX_ERRORS_SHOWN} more bad lines in {task_file}", "yellow", "skipped")
    if not taskset.tasks:
        _err(f"{task_file}: no usable task ({len(taskset.errors)} bad lines)")
        raise typer.Exit(EXIT_USAGE)

    # ---- what to probe
    tokenizer_fallback = None
    if run is not None:
        targets, tokenizer_fallback = _targets_for_run(run, modes[0] if modes else "around",
                                                       [c for c in (checkpoints or "").split(",") if c.strip()])
        kind = "run"
    else:
        targets = [Target(model.resolve().name or str(model), None, model)]
        kind = "model"

    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = ProbeConfig(n_tasks=min(n_tasks, len(taskset.tasks)), split=split if task_file is None else "file", seed=seed,
                      max_new_tokens=max_new_tokens or ProbeConfig.max_new_tokens)

    # ---- probe
    t0 = time.perf_counter()
    outcome = _probe_targets(targets, taskset.tasks, cfg, device, tokenizer_fallback, auto_tokens=max_new_tokens is None,
                             task_file=task_file, base=base)
    if not outcome.tasks:
        _err(f"{task_file}: no usable task ({len(taskset.errors)} bad lines, {len(outcome.task_errors)} task(s) over "
             f"the limit of {cfg.max_context} tokens (max_context))")
        raise typer.Exit(EXIT_USAGE)
    taskset.tasks, taskset.errors = outcome.tasks[: cfg.n_tasks], taskset.errors + outcome.task_errors
    if not outcome.summary:
        _err(f"{target_path}: no checkpoint could be probed ({len(outcome.skipped)} skipped)")
        raise typer.Exit(EXIT_INTERNAL if outcome.internal else EXIT_USAGE)
    results, summary, per_ckpt, skipped = outcome.results, outcome.summary, outcome.per_ckpt, outcome.skipped

    # ---- write
    from diagnose.capability.results import capability_dir, merge_and_write

    meta = {
        "kind": kind,
        "target": str(Path(target_path).resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tasks": {"source": taskset.source, "n": len(taskset.tasks), "fingerprint": taskset.fingerprint(),
                  "ids": [t.id for t in taskset.tasks], "skipped_lines": len(taskset.errors)},
        "config": cfg.to_json(),
        "thresholds": cfg.thresholds(),
        "device": device,
        "checkpoints": per_ckpt,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t0, 2),
        "versions": versions(),
    }
    out_dir = out if out is not None else Path(target_path)
    written, write_note = None, None
    if _writable_dir(out_dir):
        try:
            written, write_note = merge_and_write(out_dir, results, summary, meta)
        except OSError as e:
            _note(f"{capability_dir(out_dir)}: cannot write ({e.strerror or e}); results only printed", "yellow")
    else:
        hint = "" if out is not None else "; pass --out DIR"
        _note(f"{out_dir}: not writable, results only printed{hint}", "yellow")
    if write_note:
        _note(write_note)

    # ---- print
    if as_json:
        payload = {"kind": kind, "target": meta["target"], "written_to": str(written) if written else None,
                   "tasks": {k: v for k, v in meta["tasks"].items() if k != "ids"}, "config": meta["config"],
                   "summary": summary, "results": results, "checkpoints": per_ckpt, "skipped": skipped}
        sys.stdout.write(json.dumps(_finite(payload), allow_nan=False, default=str) + "\n")
    else:
        title = (f"capability probe: {target_path} ({len(taskset.tasks)} tasks: {taskset.source}; "
                 f"{meta['seconds']:.0f}s)")
        console.print(escape(title), highlight=False, soft_wrap=True)
        for table in render_tables(summary, results, meta):
            console.print(table)
        for s in summary:
            notes = per_ckpt.get(s["checkpoint"], {}).get("notes") or []
            for n in notes:
                _note(f"{s['checkpoint']}: {n}", "dim")
        print_reading(written, summary, results, meta)
        if written:
            err_console.print(f"results written to {escape(str(written))}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_INTERNAL if outcome.internal else EXIT_OK)


def print_reading(written: Path | None, summary: list[dict], results: list[dict], meta: dict) -> None:
    """The verdicts in plain words and the claim the evidence supports (``diagnose.capability.reading``),
    over every checkpoint probed so far (the merged files when written)."""
    import polars as pl

    from diagnose.capability.reading import read_probe
    from diagnose.capability.results import RESULT_SCHEMA, SUMMARY_SCHEMA, CapabilityResults, read_capability

    cap = read_capability(written.parent) if written else None
    if cap is None:
        cap = CapabilityResults(Path("."), pl.DataFrame(results, schema=RESULT_SCHEMA, strict=False),
                                pl.DataFrame(summary, schema=SUMMARY_SCHEMA, strict=False), meta)
    from rich.padding import Padding
    from rich.text import Text

    reading = read_probe(cap)
    console.print(Text("what it means", style="bold"))
    for line in reading.measures:
        console.print(Padding(Text(line, style="dim"), (0, 0, 0, 2), expand=False))
    for c in reading.checkpoints:
        console.print(Padding(Text.assemble((c.title(), "bold"), ": ", c.words), (0, 0, 0, 2), expand=False))
    console.print(Text.assemble(("the evidence supports: ", "bold"), reading.claim))


def _finite(v: Any) -> Any:
    """JSON-safe copy: non-finite floats become null."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v
