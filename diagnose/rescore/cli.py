"""``diagnose rescore RUN``: the command's body (registered in ``diagnose/cli.py``, which imports
this module inside the command so ``diagnose --help`` never loads torch).

Exit codes: 0 = rescored (checkpoints that could not be used are one line each on stderr; the
others were scored); 2 = usage error, unreadable run, no usable checkpoint, missing [model] extra;
3 = internal error.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from diagnose.cli_errors import EXIT_USAGE, command_errors, require

def rescore_command(run: Path, checkpoints: str | None, tokenizer: str | None, samples: int, device: str,
                    dtype: str, batch_tokens: int, fmt: str | None, base: str | None = None) -> None:
    err = Console(stderr=True, soft_wrap=True)
    out = Console()
    with command_errors(f"rescoring {run}", err, "diagnose rescore"):
        require("model", "diagnose rescore")
        from diagnose.adapters import UnknownRunLayout
        from diagnose.rescore.pipeline import RescoreConfig, RescoreError, rescore_run
        from diagnose.rundir import RunFormatError

        cfg = RescoreConfig(checkpoints=checkpoints, tokenizer=tokenizer, samples=samples, device=device,
                            dtype=dtype, batch_tokens=batch_tokens, format=fmt, base=base)
        if samples < 1:
            err.print("[red]error:[/] --samples must be >= 1", highlight=False)
            raise typer.Exit(EXIT_USAGE)
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                       TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal)
        task = bar.add_task("rescoring", total=None)

        def progress(desc: str, done: int, total: int) -> None:
            bar.update(task, description=escape(desc), completed=done, total=total)

        def log(msg: str) -> None:
            err.print(f"[yellow]skipped:[/] {escape(msg)}", highlight=False, soft_wrap=True)

        try:
            with bar:
                rep = rescore_run(run, cfg, progress=progress, log=log)
        except (RescoreError, UnknownRunLayout, RunFormatError) as e:
            err.print(f"[red]error:[/] {escape(str(e).splitlines()[0])}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USAGE) from None
        for name, why in rep.skipped_early:
            err.print(f"[yellow]skipped:[/] {escape(name)}: {escape(why)}", highlight=False, soft_wrap=True)
        for n in rep.notes:
            err.print(f"[dim]note:[/] {escape(n)}", highlight=False, soft_wrap=True)
        out.print(f"rescored {len(rep.computed)} checkpoint(s), {len(rep.cached)} cached, {len(rep.skipped)} skipped; "
                  f"probe set {rep.probe_size} rollouts; {rep.tokens_scored} rollout tokens re-scored in "
                  f"{rep.seconds:.1f} s; tables in {escape(str(rep.store))}", highlight=False)
        if not rep.computed and not rep.cached:
            err.print("[red]error:[/] no checkpoint could be used", highlight=False)
            raise typer.Exit(EXIT_USAGE)
