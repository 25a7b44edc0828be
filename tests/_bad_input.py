"""Shared pieces of the bad-input campaign (tests/test_bad_input_*.py, docs/reliability.md).

A case is one bad input given to one command as a new user would: what it must print (the file,
and the line where there is one), the documented exit code, never a traceback, and no input
modified (every file under the case's directory hashed before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

HTML_PAYLOAD = '<script>alert("x-7f3a")</script><img src=x onerror=alert(1)>[bold red]markup-9c1e[/bold red]'
SMALL_RUN = {"steps": 12, "samples_per_step": 8, "tokens_per_sample": 48}

runner = CliRunner()


@dataclass
class Case:
    """``build(dir) -> argv`` writes the bad input under ``dir`` and returns the command's
    arguments; ``code`` the documented exit code; ``names`` strings the output must hold (the
    file, ``file:line``, the reason)."""

    id: str
    build: Callable[[Path], list[str]]
    code: int | tuple[int, ...]
    names: Sequence[str] = ()
    absent: Sequence[str] = ()
    note: str = ""
    marks: list = field(default_factory=list)
    #: with `run_case_both`: the scan's --json must report at least this many steps (partial results)
    min_steps: int | None = None

    def param(self):
        return pytest.param(self, id=self.id, marks=self.marks)

    def on(self, base) -> "Case":
        """This case with a builder ``build(dir, base)`` bound to ``base`` (a shared base run)."""
        return replace(self, build=lambda tmp: self.build(tmp, base))


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root`` (symlinks not followed), by relative path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for n in filenames:
            p = Path(dirpath) / n
            if p.is_symlink() or not p.is_file():
                out[str(p.relative_to(root))] = "link"
                continue
            try:
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
            except OSError:
                out[str(p.relative_to(root))] = "unreadable"
    return out


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + "\n" + self.err


def invoke(app, argv: Sequence[str], env: dict[str, str] | None = None) -> Outcome:
    res = runner.invoke(app, [str(a) for a in argv], env=env)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(res.exception))
        raise AssertionError(f"uncaught {type(res.exception).__name__} (a user would see a traceback):\n{tb}")
    return Outcome(res.exit_code, res.stdout or "", res.stderr or "")


def check(case: Case, outcome: Outcome) -> None:
    codes = case.code if isinstance(case.code, tuple) else (case.code,)
    assert outcome.code in codes, f"exit {outcome.code}, documented {codes}\n{outcome.text[-3000:]}"
    assert "Traceback" not in outcome.text, outcome.text[-3000:]
    flat = " ".join(outcome.text.split())  # rich wraps long lines
    for name in case.names:
        assert name in outcome.text or name in flat, f"{name!r} not named in:\n{outcome.text[-3000:]}"
    for name in case.absent:
        assert name not in outcome.text, f"{name!r} printed:\n{outcome.text[-3000:]}"


def run_case(app, case: Case, tmp: Path, env: dict[str, str] | None = None) -> Outcome:
    argv = case.build(tmp)
    before = tree_hashes(tmp)
    outcome = invoke(app, argv, env)
    check(case, outcome)
    assert tree_hashes(tmp) == before, "an input was modified"
    return outcome


def issues_text(data: dict) -> str:
    """A scan's --json issues and notes as the terminal names them (``path:line: message``)."""
    lines = [f"{i['path']}:{i['line']}: {i['message']}" if i.get("line") else f"{i['path']}: {i['message']}"
             for i in data.get("issues", [])]
    return "\n".join(lines + [str(n) for n in data.get("notes", [])])


def run_case_both(app, case: Case, tmp: Path, env: dict[str, str] | None = None) -> tuple[Outcome, dict | None]:
    """`run_case` for a scan, in both forms: the terminal output, then ``--json`` (the same exit
    code, the same names in its ``issues``, a JSON object on stdout when the scan ran, at least
    ``case.min_steps`` steps). Returns the terminal outcome and the JSON (None on exit 2)."""
    argv = case.build(tmp)
    before = tree_hashes(tmp)
    term = invoke(app, argv, env)
    check(case, term)
    js = invoke(app, [*argv, "--json"], env)
    data = json.loads(js.out) if js.code in (0, 1) else None
    as_text = Outcome(js.code, issues_text(data) if data else js.out, js.err)
    check(case, as_text)
    assert js.code == term.code, f"--json exit {js.code}, terminal {term.code}"
    if case.min_steps is not None and data is not None:
        assert data["n_steps"] >= case.min_steps, f"{data['n_steps']} steps scanned, expected >= {case.min_steps}"
    assert tree_hashes(tmp) == before, "an input was modified"
    record_row(case, "scan", term, data, tmp)
    return term, data


def record_row(case: Case, command: str, outcome: Outcome, data: dict | None, tmp: Path) -> None:
    """Append the case's docs/reliability.md row to ``$BAD_INPUT_TABLE`` when set (the table is
    regenerated from the cases: ``BAD_INPUT_TABLE=rows.md pytest tests/test_bad_input_foreign.py``)."""
    out = os.environ.get("BAD_INPUT_TABLE")
    if not out:
        return
    short = lambda s: " ".join(str(s).replace(str(tmp) + "/", "").split()).replace("|", "\\|")  # noqa: E731
    if data is not None:
        seen = f"scanned ({data['verdict']}, {data['n_steps']} steps)"
        issues = [i for i in data.get("issues", [])]
        if issues:
            first = "; ".join(short(f"{Path(i['path']).name}:{i['line']}: {i['message']}" if i.get("line")
                                    else f"{Path(i['path']).name}: {i['message']}")[:220] for i in issues[:2])
            seen += f"; skipped: {first}" + (f" (+{len(issues) - 2} more)" if len(issues) > 2 else "")
        else:
            seen += ", nothing skipped"
    else:
        seen = short(next((ln for ln in outcome.err.splitlines() if ln.strip()), outcome.out))[:300]
    with open(out, "a") as f:
        f.write(f"| {case.id} | `{command}` | {outcome.code} | {seen} |\n")


# ------------------------------------------------------------------ inputs


def write_base_run(root: Path) -> Path:
    """``root/base``: the native run the cases copy and spoil (synthetic, ``SMALL_RUN``, a collapse
    at step 6)."""
    from diagnose.synth import write_synthetic_run

    d = root / "base"
    write_synthetic_run(d, collapse_at=6, seed=1, **SMALL_RUN)
    return d


def copy_run(base: Path, tmp: Path, name: str = "run") -> Path:
    d = tmp / name
    shutil.copytree(base, d, symlinks=True)
    return d


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def cut_half(path: Path) -> None:
    b = path.read_bytes()
    path.write_bytes(b[: len(b) // 2])


def garbage(n: int, seed: int = 0) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def step_file(run: Path, kind: str, i: int = 3) -> Path:
    return sorted((run / kind).glob("step-*.parquet"))[i]


GOOD_CONV = {"id": "c1", "step": 1, "reward": 1.0, "messages": [
    {"role": "system", "content": "tools"},
    {"role": "user", "content": "what is 2+2?"},
    {"role": "assistant", "content": '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call>'},
    {"role": "tool", "content": "4"},
    {"role": "assistant", "content": "4"},
]}


def conv_line(**over) -> bytes:
    return (json.dumps({**GOOD_CONV, **over}) + "\n").encode()


def good_conversations(n: int = 12) -> bytes:
    return b"".join(conv_line(id=f"c{i}", step=i, reward=float(i % 3 == 0)) for i in range(n))


# ------------------------------------------------------------------ another user


def as_nobody_cmd() -> list[str] | None:
    """The prefix that runs a command the way a user without rights to a file does (root reads a
    mode-000 file, so permission cases need this), or None when that cannot be done here.

    ``nobody`` (setpriv) where it can run this interpreter with its packages; else root without
    the capabilities that bypass file permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), which
    is subject to the same mode bits (here the interpreter lives under /root, mode 700)."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0:
        return []
    if setpriv is None:
        return None
    drop = "-dac_override,-dac_read_search"
    for prefix in ([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"],
                   [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}"]):
        probe = subprocess.run([*prefix, sys.executable, "-c", "import typer, polars, diagnose.cli"],
                               capture_output=True, timeout=60, cwd="/")
        if probe.returncode == 0:
            return prefix
    return None


def world_dir(name: str) -> Path:
    """A directory ``nobody`` can reach (pytest's tmp dirs are mode 700 for root)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix=f"bad-input-{name}-", dir="/tmp"))
    d.chmod(0o755)
    return d


def remove_world_dir(root: Path) -> None:
    """Give back the modes a permission case took away, then remove ``root`` (`world_dir`)."""
    for p in [root, *root.rglob("*")]:
        try:
            p.chmod(0o755)
        except OSError:
            pass
    shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ task files (diagnose/tasks/taskfile.py)

GOOD_TASK = {"id": "t1", "messages": [{"role": "user", "content": "add 2 and 2"}],
             "tools": [{"type": "function", "function": {"name": "add", "parameters": {
                 "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}],
             "ground_truth": [[{"name": "add", "arguments": {"a": 2, "b": 2}}]], "tool_outputs": [[4]],
             "final_answer": "4"}


def _task(**over) -> bytes:
    return (json.dumps({**GOOD_TASK, **over}) + "\n").encode()


BAD_TASK_LINES = (3, 4, 5, 6, 7, 8, 9)


def task_file_bytes() -> bytes:
    """Two good tasks, then one bad line each: call name not a string, arguments not JSON, a call
    of a tool not in 'tools', NaN arguments, ground_truth not a list, not JSON, binary garbage."""
    return b"".join([
        _task(id="t1"), _task(id="t2", messages=[{"role": "user", "content": HTML_PAYLOAD}]),
        _task(id="b1", ground_truth=[[{"name": 5, "arguments": {}}]]),
        _task(id="b2", ground_truth=[[{"function": {"name": "add", "arguments": "{not json"}}]]),
        _task(id="b3", ground_truth=[[{"name": "mul", "arguments": {}}]]),
        b'{"id": "b4", "messages": [{"role": "user", "content": "x"}], "tools": ' + json.dumps(GOOD_TASK["tools"]).encode()
        + b', "ground_truth": [[{"name": "add", "arguments": {"a": NaN}}]]}\n',
        _task(id="b5", ground_truth="add(2, 2)"),
        b"{not json\n",
        garbage(40, 7).replace(b"\n", b" ") + b"\n",
    ])
