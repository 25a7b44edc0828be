"""The `diagnose` command line (typer + rich).

Exit codes are part of the interface (scripts gate on them): 0 = ran, 1 = nothing readable,
2 = bad usage (typer's own) or a missing input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from diagnose.jsonl import LineError

app = typer.Typer(
    name="diagnose",
    help="Collapse diagnostics for RL of LLM agents on multi-step tool use.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

MAX_ERRORS_SHOWN = 20


def report_line_errors(errors: list[LineError], what: str = "line") -> None:
    """Print bad lines to stderr, capped, so a huge corrupt file does not flood the terminal."""
    for e in errors[:MAX_ERRORS_SHOWN]:
        err_console.print(f"[yellow]skipped[/] {e}", markup=True, highlight=False)
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


@app.command()
def formats(
    path: Path = typer.Argument(..., help="Conversation JSONL: one {id, messages, tools?} per line."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object to stdout."),
) -> None:
    """Classify every assistant turn (healthy call / healthy response / polluted / collapsed)."""
    from diagnose.conversations import read_conversations
    from diagnose.format_summary import summarize, turn_table

    if not path.is_file():
        err_console.print(f"[red]error:[/] {path}: no such file")
        raise typer.Exit(2)
    convs, errors = read_conversations(path)
    report_line_errors(errors)
    if not convs:
        err_console.print(f"[red]error:[/] {path}: no readable conversation ({len(errors)} bad lines)")
        raise typer.Exit(1)
    summary = summarize(turn_table(convs), len(convs))
    summary["skipped_lines"] = len(errors)
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    console.print(states_table(summary, f"{path}: {summary['conversations']} conversations, "
                                        f"{summary['assistant_turns']} assistant turns"))
    if summary["errors"]:
        console.print(errors_table(summary))


@app.command("build-model")
def build_model(
    out: Path = typer.Option(None, help="Output directory (default: the embedded default's cache dir)."),
    size: str = typer.Option("tiny", help="tiny | small"),
    seed: int = typer.Option(0),
) -> None:
    """Build the embedded tiny Qwen2 model and tokenizer (no downloads)."""
    from diagnose.tinymodel import build_tiny_model, ensure_default_model

    with console.status("training tokenizer and building model"):
        path = ensure_default_model() if out is None else build_tiny_model(out, size=size, seed=seed)
    console.print(f"model ready: {path}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Where to write the demo conversations."),
    tasks: int = typer.Option(24, help="Tasks per source."),
    seed: int = typer.Option(0),
) -> None:
    """Main job on the embedded default: build the tiny model, roll it out on the tool-use
    environment beside gold trajectories, and classify every turn."""
    from diagnose.demo import run_demo

    run_demo(out, n_tasks=tasks, seed=seed, console=console)


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
