"""Bad input to `diagnose scan` (and `compare`): our own run format and conversation JSONL.
Each case: the file (and line) named, the documented exit code, no traceback, the input
unchanged, the rest of the run still scanned. Table: docs/reliability.md."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from _bad_input import (
    HTML_PAYLOAD,
    Case,
    append,
    as_nobody_cmd,
    conv_line,
    copy_run,
    cut_half,
    garbage,
    good_conversations,
    invoke,
    run_case,
    step_file,
    tree_hashes,
    remove_world_dir,
    world_dir,
    write_base_run,
)

from diagnose.cli import app

M = "metrics.jsonl"
SCANNED = (0, 1)  # the scan ran: 0 no collapse, 1 collapse (the base run collapses at step 6)


pytestmark = pytest.mark.usefixtures("diagnose_home")  # tests/conftest.py


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    return write_base_run(tmp_path_factory.mktemp("bad_scan"))


def native(edit, name: str = "run"):
    """A case builder: copy the base run, apply ``edit(run)``, scan it without the cache."""
    def build(tmp: Path, base: Path) -> list[str]:
        run = copy_run(base, tmp, name)
        edit(run)
        return ["scan", str(run), "--no-cache"]
    return build


def metrics_line(line: bytes):
    return native(lambda r: append(r / M, line))


def _rewrite_metrics(r: Path, fn) -> None:
    lines = (r / M).read_bytes().splitlines(keepends=True)
    (r / M).write_bytes(b"".join(fn(lines)))


def _tokens_frame(r: Path, fn) -> None:
    f = step_file(r, "tokens")
    fn(pl.read_parquet(f)).write_parquet(f)


NATIVE_CASES = [
    Case("metrics-truncated-last-line", native(lambda r: (r / M).write_bytes((r / M).read_bytes()[:-25])), SCANNED,
         ["metrics.jsonl:12", "incomplete last line"]),
    Case("metrics-empty", native(lambda r: (r / M).write_bytes(b"")), SCANNED, ["metrics.jsonl", "empty"]),
    Case("metrics-binary-garbage", native(lambda r: (r / M).write_bytes(garbage(4000))), SCANNED,
         ["metrics.jsonl:1", "not valid UTF-8"]),
    Case("metrics-nul-bytes", metrics_line(b"\x00" * 100 + b"\n"), SCANNED, ["metrics.jsonl:13", "invalid JSON"]),
    Case("metrics-huge-line-64MB", metrics_line(b'{"step": 3, "x": "' + b"a" * (64 * 1024 * 1024) + b"\n"), SCANNED,
         ["metrics.jsonl:13"]),
    Case("metrics-step-1e30", metrics_line(b'{"step": 1e30, "reward": 1}\n'), SCANNED,
         ["metrics.jsonl:13", "invalid 'step' (1e+30"]),
    Case("metrics-step-2^63", metrics_line(b'{"step": 9223372036854775808, "reward": 1}\n'), SCANNED,
         ["metrics.jsonl:13", "9223372036854775808"]),
    Case("metrics-step-negative", metrics_line(b'{"step": -3, "reward": 1}\n'), SCANNED, ["metrics.jsonl:13", "(-3;"]),
    Case("metrics-step-string", metrics_line(b'{"step": "5", "reward": 1}\n'), SCANNED, ["metrics.jsonl:13", "'5'"]),
    Case("metrics-step-fraction", metrics_line(b'{"step": 1.5, "reward": 1}\n'), SCANNED, ["metrics.jsonl:13", "1.5"]),
    Case("metrics-step-null", metrics_line(b'{"step": null, "reward": 1}\n'), SCANNED, ["metrics.jsonl:13", "None"]),
    Case("metrics-step-missing", metrics_line(b'{"reward": 1}\n'), SCANNED, ["metrics.jsonl:13", "'step'"]),
    Case("metrics-step-bool", metrics_line(b'{"step": true, "reward": 1}\n'), SCANNED, ["metrics.jsonl:13", "True"]),
    Case("metrics-not-an-object", metrics_line(b"[1, 2, 3]\n"), SCANNED, ["metrics.jsonl:13", "JSON object"]),
    Case("metrics-reward-NaN", metrics_line(b'{"step": 12, "reward": NaN}\n'), SCANNED),
    Case("metrics-reward-Infinity", metrics_line(b'{"step": 12, "reward": Infinity, "kl": -Infinity}\n'), SCANNED),
    Case("metrics-reward-null", metrics_line(b'{"step": 12, "reward": null}\n'), SCANNED),
    Case("metrics-reward-1e400", metrics_line(b'{"step": 12, "reward": 1e400}\n'), SCANNED),
    Case("metrics-reward-string", metrics_line(b'{"step": 12, "reward": "high"}\n'), SCANNED,
         ["metrics.jsonl", "'reward'", "str"]),
    Case("metrics-reward-list", metrics_line(b'{"step": 12, "reward": [1, 2]}\n'), SCANNED,
         ["metrics.jsonl", "'reward'", "list"]),
    Case("metrics-reward-bool", metrics_line(b'{"step": 12, "reward": true}\n'), SCANNED),
    Case("metrics-nonfinite-bad-type", metrics_line(b'{"step": 12, "reward": null, "nonfinite": 5}\n'), SCANNED,
         ["metrics.jsonl:13", "'nonfinite'"]),
    Case("metrics-duplicated-steps", native(lambda r: _rewrite_metrics(r, lambda ls: ls + ls)), SCANNED,
         ["metrics.jsonl:13", "step 0 logged again (first on line 1)"]),
    Case("metrics-steps-out-of-order", native(lambda r: _rewrite_metrics(r, lambda ls: ls[::-1])), SCANNED),
    Case("metrics-is-a-directory", native(lambda r: ((r / M).unlink(), (r / M).mkdir())), SCANNED,
         ["metrics.jsonl", "unreadable"]),
    Case("metrics-symlink-loop", native(lambda r: ((r / M).unlink(), os.symlink(r / M, r / M))), SCANNED,
         ["metrics.jsonl", "symlink loop"]),
    Case("metrics-missing", native(lambda r: (r / M).unlink()), SCANNED, ["metrics.jsonl", "missing"]),
    Case("tokens-parquet-cut-in-half", native(lambda r: cut_half(step_file(r, "tokens"))), SCANNED,
         ["tokens/step-000003.parquet", "truncated or corrupt"]),
    Case("tokens-parquet-empty", native(lambda r: step_file(r, "tokens").write_bytes(b"")), SCANNED,
         ["tokens/step-000003.parquet", "0 bytes"]),
    Case("tokens-parquet-garbage", native(lambda r: step_file(r, "tokens").write_bytes(garbage(3000))), SCANNED,
         ["tokens/step-000003.parquet"]),
    Case("tokens-wrong-column-type", native(lambda r: _tokens_frame(
        r, lambda df: df.with_columns(pl.col("logprob").cast(pl.String)))), SCANNED,
        ["tokens/step-000003.parquet", "logprob"]),
    Case("tokens-missing-column", native(lambda r: _tokens_frame(r, lambda df: df.drop("token_id"))), SCANNED,
         ["tokens/step-000003.parquet", "token_id"]),
    Case("tokens-NaN-logprobs", native(lambda r: _tokens_frame(
        r, lambda df: df.with_columns(pl.lit(float("nan"), dtype=pl.Float32).alias("logprob")))), SCANNED),
    Case("tokens-rows-of-another-step", native(lambda r: shutil.copy(step_file(r, "tokens", 0),
                                                                       step_file(r, "tokens", 5))), SCANNED,
         ["tokens/step-000005.parquet", "the file name says 5"]),
    Case("tokens-step-name-beyond-int64", native(lambda r: shutil.copy(
        step_file(r, "tokens", 0), r / "tokens" / "step-99999999999999999999.parquet")), SCANNED,
        ["step-99999999999999999999.parquet"]),
    Case("tokens-dir-symlink-loop", native(lambda r: (shutil.rmtree(r / "tokens"), os.symlink(r / "tokens",
                                                                                                 r / "tokens"))),
         SCANNED, ["tokens", "symlink loop"]),
    Case("tokens-file-symlink-loop", native(lambda r: os.symlink(r / "tokens" / "step-000077.parquet",
                                                                 r / "tokens" / "step-000077.parquet")),
         SCANNED, ["step-000077.parquet", "symbolic links"]),
    Case("rollouts-parquet-cut-in-half", native(lambda r: cut_half(step_file(r, "rollouts"))), SCANNED,
         ["rollouts/step-000003.parquet", "truncated or corrupt"]),
    Case("probe-parquet-garbage", native(lambda r: step_file(r, "probe").write_bytes(garbage(999, 3))), SCANNED,
         ["probe/step-000003.parquet"]),
    Case("run-json-garbage", native(lambda r: (r / "run.json").write_bytes(garbage(300))), SCANNED,
         ["run.json", "not valid JSON"]),
    Case("run-json-utf16", native(lambda r: (r / "run.json").write_bytes(
        (r / "run.json").read_text().encode("utf-16"))), SCANNED, ["run.json"]),
    Case("run-json-not-an-object", native(lambda r: (r / "run.json").write_text("[1, 2]")), SCANNED,
         ["run.json", "JSON object"]),
    Case("run-json-control-tokens-wrong-type", native(lambda r: (r / "run.json").write_text(json.dumps(
        {**json.loads((r / "run.json").read_text()), "control_tokens": "im_end"}))), SCANNED,
        ["run.json", "'control_tokens'"]),
    Case("run-json-empty", native(lambda r: (r / "run.json").write_bytes(b"")), SCANNED, ["run.json"]),
    Case("run-dir-missing", lambda tmp, base: ["scan", str(tmp / "nope"), "--no-cache"], 2,
         ["nope", "no such file"]),
    Case("run-dir-symlink-loop", lambda tmp, base: (os.symlink(tmp / "loop", tmp / "loop"),
                                                    ["scan", str(tmp / "loop"), "--no-cache"])[1], 2, ["loop"]),
    Case("run-dir-empty", lambda tmp, base: ((tmp / "empty").mkdir(), ["scan", str(tmp / "empty"), "--no-cache"])[1],
         2, ["empty", "no known run layout"]),
    Case("run-dir-only-garbage", lambda tmp, base: ((tmp / "g").mkdir(), (tmp / "g" / "x.bin").write_bytes(
        garbage(100)), ["scan", str(tmp / "g"), "--no-cache"])[2], 2, ["no known run layout"]),
    Case("path-with-rich-markup", native(lambda r: None, name="[red]run[/red]"), SCANNED, ["[red]run[/red]"]),
]

CONV_CASES = [
    Case("conv-truncated-last-line", lambda tmp, b: _conv(tmp, good_conversations()[:-30]), SCANNED,
         ["c.jsonl:12", "truncated"]),
    Case("conv-empty-file", lambda tmp, b: _conv(tmp, b""), 2, ["c.jsonl"]),
    Case("conv-binary-garbage", lambda tmp, b: _conv(tmp, garbage(5000)), 2, ["c.jsonl"]),
    Case("conv-garbage-lines-among-good", lambda tmp, b: _conv(tmp, good_conversations() + garbage(200) + b"\n"),
         SCANNED, ["c.jsonl:13", "UTF-8"]),
    Case("conv-utf16", lambda tmp, b: _conv(tmp, good_conversations().decode().encode("utf-16")), 2, ["c.jsonl"]),
    Case("conv-huge-line-over-64MB", lambda tmp, b: _conv(tmp, good_conversations() + b'{"x": "'
                                                          + b"a" * (64 * 1024 * 1024 + 10) + b'"}\n'), SCANNED,
         ["c.jsonl:13", "longer than"]),
    Case("conv-messages-wrong-type", lambda tmp, b: _conv(tmp, good_conversations() + b'{"messages": "hi"}\n'),
         SCANNED, ["c.jsonl:13", "'messages'"]),
    Case("conv-content-wrong-type", lambda tmp, b: _conv(tmp, good_conversations() + conv_line(
        messages=[{"role": "assistant", "content": 5}])), SCANNED, ["c.jsonl:13", "content is int"]),
    Case("conv-unknown-role", lambda tmp, b: _conv(tmp, good_conversations() + conv_line(
        messages=[{"role": "wizard", "content": "x"}])), SCANNED, ["c.jsonl:13", "'wizard'"]),
    Case("conv-malformed-tool-calls", lambda tmp, b: _conv(tmp, good_conversations() + conv_line(messages=[
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]}])), SCANNED,
        ["c.jsonl:13", "tool_calls[0] is malformed"]),
    Case("conv-step-1e30", lambda tmp, b: _conv(tmp, good_conversations() + conv_line(step=1e30)), SCANNED,
         ["c.jsonl:13", "1e+30"]),
    Case("conv-step-negative", lambda tmp, b: _conv(tmp, good_conversations() + conv_line(step=-4)), SCANNED,
         ["c.jsonl:13", "-4"]),
    Case("conv-reward-NaN-and-string", lambda tmp, b: _conv(tmp, good_conversations() + b'{"step": 3, "reward": NaN, '
                                                            b'"messages": []}\n' + conv_line(reward="x")), SCANNED),
    Case("conv-duplicated-lines", lambda tmp, b: _conv(tmp, good_conversations() * 2), SCANNED),
    Case("conv-steps-out-of-order", lambda tmp, b: _conv(tmp, b"".join(reversed(
        good_conversations().splitlines(keepends=True)))), SCANNED),
]


def _conv(tmp: Path, data: bytes) -> list[str]:
    (tmp / "c.jsonl").write_bytes(data)
    return ["scan", str(tmp / "c.jsonl"), "--no-cache"]


@pytest.mark.parametrize("case", [c.param() for c in NATIVE_CASES + CONV_CASES])
def test_scan_bad_input(case: Case, tmp_path: Path, base_run: Path) -> None:
    run_case(app, case.on(base_run), tmp_path)


def test_scan_json_lists_the_skipped_step(tmp_path: Path, base_run: Path) -> None:
    """`"step": 1e30` is skipped and named like smaller bad steps; the rest of the run is scanned."""
    run = copy_run(base_run, tmp_path)
    append(run / M, b'{"step": 1e30, "reward": 1}\n{"step": -3, "reward": 1}\n')
    out = invoke(app, ["scan", str(run), "--json", "--no-cache"])
    data = json.loads(out.out)
    lines = sorted(i["line"] for i in data["issues"])
    assert lines == [13, 14] and all(i["path"].endswith("metrics.jsonl") for i in data["issues"])
    assert data["n_steps"] == 12


def test_model_text_escaped_in_terminal_and_html(tmp_path: Path, base_run: Path) -> None:
    """Model text holding HTML / JS / rich markup: shown literally on the terminal, escaped in
    the HTML report."""
    run = copy_run(base_run, tmp_path)
    for f in sorted((run / "rollouts").glob("step-*.parquet")):
        df = pl.read_parquet(f)
        df.with_columns((pl.lit(HTML_PAYLOAD) + pl.col("completion")).alias("completion")).write_parquet(f)
    report = tmp_path / "report.html"
    out = invoke(app, ["scan", str(run), "--no-cache", "--report", str(report)])
    assert out.code in SCANNED
    assert "[bold red]markup-9c1e[/bold red]" in " ".join(out.out.split())  # printed, not interpreted
    html = report.read_text()
    assert "x-7f3a" in html and '<script>alert("x-7f3a")' not in html and "<img src=x" not in html


# ------------------------------------------------------------------ compare


def test_compare_names_a_corrupt_file_and_exits_2(tmp_path: Path, base_run: Path) -> None:
    a = copy_run(base_run, tmp_path, "a")
    b = copy_run(base_run, tmp_path, "b")
    cut_half(step_file(b, "tokens"))
    before = tree_hashes(tmp_path)
    out = invoke(app, ["compare", str(a), str(b), "--no-cache"])
    assert out.code == 2 and "tokens/step-000003.parquet" in " ".join(out.err.split()), out.text
    assert "Traceback" not in out.text and out.out.strip(), "the comparison is still printed"
    assert tree_hashes(tmp_path) == before


def test_compare_clean_runs_exit_0(tmp_path: Path, base_run: Path) -> None:
    out = invoke(app, ["compare", str(base_run), str(base_run), "--no-cache"])
    assert out.code == 0 and not out.err.strip(), out.text


def test_compare_missing_run_exits_2(tmp_path: Path, base_run: Path) -> None:
    out = invoke(app, ["compare", str(base_run), str(tmp_path / "gone"), "--no-cache"])
    assert out.code == 2 and "gone" in out.err


# ------------------------------------------------------------------ another user: unreadable files


@pytest.fixture(scope="module")
def nobody():
    cmd = as_nobody_cmd()
    if cmd is None:
        pytest.skip("no way to run as a non-root user here (setpriv missing or nobody cannot import diagnose); "
                    "root reads mode-000 files, so the permission cases need one")
    return cmd


def _as_user(prefix: list[str], args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DIAGNOSE_HOME": str(home), "HOME": str(home)}
    return subprocess.run([*prefix, sys.executable, "-m", "diagnose.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd="/")


@pytest.fixture(scope="module")
def locked(tmp_path_factory, base_run: Path, nobody) -> dict[str, Path]:
    root = world_dir("perm")
    (root / "home").mkdir(mode=0o777)
    (root / "home").chmod(0o777)
    runs = {}
    for name, lock in (("metrics", lambda r: (r / M).chmod(0)), ("tokens", lambda r: step_file(r, "tokens").chmod(0)),
                       ("dir", lambda r: r.chmod(0)), ("clean", lambda r: None)):
        r = root / name
        shutil.copytree(base_run, r)
        for p in [r, *r.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        lock(r)
        runs[name] = r
    (root / "conv.jsonl").write_bytes(good_conversations())
    (root / "conv.jsonl").chmod(0)
    runs["conv"] = root / "conv.jsonl"
    runs["home"] = root / "home"
    yield runs
    remove_world_dir(root)


def test_unreadable_metrics_named(nobody, locked) -> None:
    res = _as_user(nobody, ["scan", str(locked["metrics"]), "--no-cache"], locked["home"])
    assert res.returncode in SCANNED and "Traceback" not in res.stderr + res.stdout
    assert "metrics.jsonl" in res.stdout and "Permission denied" in res.stdout


def test_unreadable_step_file_named(nobody, locked) -> None:
    res = _as_user(nobody, ["scan", str(locked["tokens"]), "--no-cache"], locked["home"])
    assert res.returncode in SCANNED and "Traceback" not in res.stderr + res.stdout
    flat = " ".join(res.stdout.split())
    assert "tokens/step-000003.parquet" in flat and "ermission denied" in flat


def test_unreadable_run_dir_exits_2(nobody, locked) -> None:
    res = _as_user(nobody, ["scan", str(locked["dir"]), "--no-cache"], locked["home"])
    assert res.returncode == 2 and str(locked["dir"]) in res.stderr and "Traceback" not in res.stderr


def test_unreadable_conversations_exit_2(nobody, locked) -> None:
    res = _as_user(nobody, ["scan", str(locked["conv"]), "--no-cache"], locked["home"])
    assert res.returncode == 2 and "conv.jsonl" in res.stderr and "Traceback" not in res.stderr


def test_compare_with_an_unreadable_file_names_it_and_exits_2(nobody, locked) -> None:
    res = _as_user(nobody, ["compare", str(locked["clean"]), str(locked["metrics"]), "--no-cache"], locked["home"])
    flat = " ".join(res.stderr.split())
    assert res.returncode == 2, res.stdout + res.stderr
    assert "metrics.jsonl" in flat and "Permission denied" in flat and "Traceback" not in flat
