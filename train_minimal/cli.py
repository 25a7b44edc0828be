"""`train-minimal sft|grpo|run --preset NAME | --config FILE --out runs/NAME [--set key=value ...]`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from train_minimal.config import ConfigError, TrainConfig, build_config, merge
from train_minimal.presets import preset as get_preset

app = typer.Typer(name="train-minimal", help="Minimal SFT/GRPO trainer for multi-step tool use.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
err = Console(stderr=True, soft_wrap=True)

PresetOpt = typer.Option(None, "--preset", help="Named configuration (smoke, collapse, stable).")
ConfigOpt = typer.Option(None, "--config", help="TOML or YAML config file (applied over the preset).")
OutOpt = typer.Option(None, "--out", help="Run directory (default runs/<name>).")
SetOpt = typer.Option([], "--set", help="Override, e.g. --set grpo.lr=3e-4 (repeatable).")
ResumeOpt = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out.")
InitOpt = typer.Option(None, "--init-from", help="Start from these weights (e.g. an SFT run's checkpoint).")
StopOpt = typer.Option(None, "--stop-after", help="Stop cleanly (with a checkpoint) after this global step.")


def _config(preset: str | None, config: Path | None, overrides: list[str], phase: dict) -> TrainConfig:
    try:
        base = merge(get_preset(preset), phase) if preset else phase
        return build_config(base, config, overrides)
    except (ConfigError, KeyError) as exc:
        err.print(f"[red]config error:[/] {exc.args[0] if exc.args else exc}")
        raise typer.Exit(2) from None


def _run(cfg: TrainConfig, out: Path | None, resume: bool, init_from: str | None, stop_after: int | None) -> None:
    from train_minimal.trainer import TrainingError, train

    out_dir = out or Path("runs") / cfg.name
    try:
        train(cfg, out_dir, resume=resume, console=console, init_from=init_from, stop_after=stop_after)
    except (TrainingError, FileExistsError, ValueError, OSError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"run written to {out_dir}")


@app.command()
def run(preset: str = PresetOpt, config: Path = ConfigOpt, out: Path = OutOpt, set_: list[str] = SetOpt,
        resume: bool = ResumeOpt, init_from: str = InitOpt, stop_after: int = StopOpt) -> None:
    """SFT warm start then GRPO, as configured."""
    _run(_config(preset, config, set_, {}), out, resume, init_from, stop_after)


@app.command()
def sft(preset: str = PresetOpt, config: Path = ConfigOpt, out: Path = OutOpt, set_: list[str] = SetOpt,
        resume: bool = ResumeOpt, init_from: str = InitOpt, stop_after: int = StopOpt) -> None:
    """SFT on gold trajectories only (the configuration's GRPO steps are dropped)."""
    _run(_config(preset, config, set_ + ["grpo.steps=0"], {}), out, resume, init_from, stop_after)


@app.command()
def grpo(preset: str = PresetOpt, config: Path = ConfigOpt, out: Path = OutOpt, set_: list[str] = SetOpt,
         resume: bool = ResumeOpt, init_from: str = InitOpt, stop_after: int = StopOpt) -> None:
    """GRPO only (the configuration's SFT warm start is dropped); start from --init-from."""
    _run(_config(preset, config, set_ + ["sft.steps=0"], {}), out, resume, init_from, stop_after)


if __name__ == "__main__":  # pragma: no cover
    app()
