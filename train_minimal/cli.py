"""`train-minimal sft|grpo|run --preset NAME | --config FILE --out runs/NAME [--set key=value ...]`.

Exit codes: 0 = trained (or stopped cleanly); 1 = the run failed (a message names why: a file, a
checkpoint, non-finite losses); 2 = bad configuration or usage; 3 = internal error.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from diagnose.cli_usage import PlainUsageCommand
from train_minimal.config import ConfigError, TrainConfig, build_config, merge
from train_minimal.presets import PRESETS
from train_minimal.presets import preset as get_preset

app = typer.Typer(name="train-minimal", help="Minimal SFT/GRPO trainer for multi-step tool use.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
err = Console(stderr=True, soft_wrap=True)

PresetOpt = typer.Option(None, "--preset", help="Named configuration: " + ", ".join(PRESETS) + " (train_minimal/presets.py).")
ConfigOpt = typer.Option(None, "--config", help="TOML or YAML config file (applied over the preset).")
OutOpt = typer.Option(None, "--out", help="Run directory (default runs/<name>).")
SetOpt = typer.Option([], "--set", help="Override, e.g. --set grpo.lr=3e-4 (repeatable).")
ResumeOpt = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out.")
InitOpt = typer.Option(None, "--init-from", help="Start from these weights (e.g. an SFT run's checkpoint).")
StopOpt = typer.Option(None, "--stop-after", min=1, help="Stop cleanly (with a checkpoint) after this global step.")


def _config(preset: str | None, config: Path | None, overrides: list[str], phase: dict) -> TrainConfig:
    try:
        base = merge(get_preset(preset), phase) if preset else phase
        return build_config(base, config, overrides)
    except (ConfigError, KeyError) as exc:
        err.print(f"[red]config error:[/] {escape(str(exc.args[0] if exc.args else exc))}", highlight=False)
        raise typer.Exit(2) from None


def _run(cfg: TrainConfig, out: Path | None, resume: bool, init_from: str | None, stop_after: int | None) -> None:
    if cfg.sft.steps + cfg.grpo.steps == 0:
        err.print("[red]config error:[/] nothing to train: sft.steps + grpo.steps is 0", highlight=False)
        raise typer.Exit(2)
    from train_minimal.trainer import TrainingError, train

    out_dir = out or Path("runs") / cfg.name
    try:
        train(cfg, out_dir, resume=resume, console=console, init_from=init_from, stop_after=stop_after)
    except (TrainingError, FileExistsError, ValueError, OSError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None
    except Exception as exc:  # noqa: BLE001 - never a traceback for users; DIAGNOSE_DEBUG=1 shows it
        if os.environ.get("DIAGNOSE_DEBUG"):
            raise
        err.print(f"[red]internal error:[/] {escape(type(exc).__name__)}: {escape(str(exc))} "
                  "(set DIAGNOSE_DEBUG=1 for the traceback)", highlight=False)
        raise typer.Exit(3) from None
    console.print(f"run written to {out_dir}")


@app.command(cls=PlainUsageCommand, short_help="SFT warm start, then GRPO, as configured.")
def run(preset: str = PresetOpt, config: Path = ConfigOpt, out: Path = OutOpt, set_: list[str] = SetOpt,
        resume: bool = ResumeOpt, init_from: str = InitOpt, stop_after: int = StopOpt) -> None:
    """SFT warm start then GRPO, as configured."""
    _run(_config(preset, config, set_, {}), out, resume, init_from, stop_after)


@app.command(cls=PlainUsageCommand, short_help="SFT on gold trajectories only.")
def sft(preset: str = PresetOpt, config: Path = ConfigOpt, out: Path = OutOpt, set_: list[str] = SetOpt,
        resume: bool = ResumeOpt, init_from: str = InitOpt, stop_after: int = StopOpt) -> None:
    """SFT on gold trajectories only (the configuration's GRPO steps are dropped)."""
    _run(_config(preset, config, set_ + ["grpo.steps=0"], {}), out, resume, init_from, stop_after)


@app.command(cls=PlainUsageCommand, short_help="GRPO only (start from --init-from).")
def grpo(preset: str = PresetOpt, config: Path = ConfigOpt, out: Path = OutOpt, set_: list[str] = SetOpt,
         resume: bool = ResumeOpt, init_from: str = InitOpt, stop_after: int = StopOpt) -> None:
    """GRPO only (the configuration's SFT warm start is dropped); start from --init-from."""
    _run(_config(preset, config, set_ + ["sft.steps=0"], {}), out, resume, init_from, stop_after)


if __name__ == "__main__":  # pragma: no cover
    app()
