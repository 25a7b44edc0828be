"""`--help` of every `diagnose` and `train-minimal` command, as an 80-column terminal shows it:
nothing wider than 80 columns, no identifier (an option, a format name, a path) split across
lines, usage lines in the plain ``RUN`` / ``[RUN]`` convention, and the command lists one line
per command with what README calls each command."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from diagnose.adapters import FORMATS
from diagnose.cli import app as diagnose_app
from train_minimal.cli import app as train_app

runner = CliRunner()
WIDTH = 80
# an identifier: a word holding _ / . or an inner -, e.g. open_instruct, docs/scan.md, --fail-on
IDENT = re.compile(r"(?<![\w./<>-])(?:--?)?[\w<>]+(?:[_./-][\w<>]+)+/?")


def _help(app: typer.Typer, args: list[str]) -> str:
    res = runner.invoke(app, [*args, "--help"], env={"COLUMNS": str(WIDTH), "TERMINAL_WIDTH": str(WIDTH)},
                        color=False)
    assert res.exit_code == 0, res.output
    return res.output


def _commands(app: typer.Typer) -> dict:
    group = typer.main.get_command(app)
    return dict(group.commands)


def _identifiers(cmd) -> set[str]:
    """Identifiers written in the command's own help texts (its docstring's first paragraph,
    its parameters' help, choices and names)."""
    texts = [(cmd.help or "").split("\n\n")[0], cmd.epilog or ""]
    for p in cmd.params:
        texts.append(getattr(p, "help", None) or "")
        texts += [p.metavar or ""] if p.param_type_name == "argument" else list(p.opts)
        texts += [str(getattr(c, "value", c)) for c in getattr(getattr(p, "type", None), "choices", None) or []]
    return {m.group(0).rstrip(".,;:)") for t in texts for m in IDENT.finditer(t)}


CASES = [("diagnose", diagnose_app, name) for name in _commands(diagnose_app)] + \
        [("train-minimal", train_app, name) for name in _commands(train_app)]


@pytest.mark.parametrize(("prog", "app", "name"), CASES, ids=[f"{p} {n}" for p, _, n in CASES])
def test_command_help_fits_80_columns_without_splitting_identifiers(prog, app, name):
    out = _help(app, [name])
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= WIDTH, out
    usage = next(line for line in lines if "Usage:" in line)
    assert "{" not in usage and "}" not in usage, usage  # typer's {run}: a placeholder left unfilled?
    flat = [line.strip(" │╭╮╰╯─") for line in lines]
    for ident in _identifiers(_commands(app)[name]):
        assert any(ident in line for line in flat), f"{prog} {name} --help: {ident!r} split or missing:\n{out}"


def test_identifier_check_catches_a_split():
    """The check above fails on the split the issue saw (`open_inst` / `ruct` in a choices column)."""
    text = "│ --format  <auto|native|trl|open_inst │\n│           ruct|verl>               │"
    flat = [line.strip(" │╭╮╰╯─") for line in text.splitlines()]
    assert not any("open_instruct" in line for line in flat)
    assert "open_instruct" in {m.group(0) for m in IDENT.finditer("layouts: auto, open_instruct, verl")}


def test_format_choices_are_listed_whole():
    out = _help(diagnose_app, ["scan"])
    flat = " ".join(line.strip(" │") for line in out.splitlines())
    for fmt in FORMATS:
        assert re.search(rf"(?<![\w]){re.escape(fmt)}(?![\w])", flat), (fmt, out)


@pytest.mark.parametrize(("app", "prog"), [(diagnose_app, "diagnose"), (train_app, "train-minimal")])
def test_command_list_one_line_per_command(app, prog):
    out = _help(app, [])
    assert max(len(line) for line in out.splitlines()) <= WIDTH, out
    rows = [line.strip("│ ").split(None, 1) for line in out.splitlines() if line.startswith("│ ")]
    described = {r[0]: r[1].strip(" │") for r in rows if len(r) == 2 and r[0] in _commands(app)}
    assert set(described) == set(_commands(app)), out
    for name, cmd in _commands(app).items():
        short = cmd.short_help or (cmd.help or "").split("\n\n")[0]
        # the whole short help on the command's own line: nothing wrapped mid-phrase onto the next
        assert described[name] == " ".join(short.split()), f"{prog} {name}: {described[name]!r} vs {short!r}"


def test_demo_is_not_called_the_main_job():
    """README calls `bash scripts/demo.sh` the main job; `diagnose demo` is the format-engine tour."""
    out = _help(diagnose_app, [])
    demo_line = next(line for line in out.splitlines() if line.startswith("│ demo "))
    assert "main job" not in demo_line.lower() and "tour" in demo_line
