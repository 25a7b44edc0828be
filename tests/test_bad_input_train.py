"""Bad input to `train-minimal`: config files (binary, UTF-16, unknown keys, wrong types, out
of range), --set overrides, a task file with malformed calls, and --resume over a corrupt
latest checkpoint. No case trains more than a few tiny steps. Table: docs/reliability.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _bad_input import (  # noqa: F401 - no_hang: the autouse watchdog
    BAD_TASK_LINES,
    Case,
    garbage,
    invoke,
    named_pipe,
    no_hang,
    run_case,
    task_file_bytes,
    tree_hashes,
)

from train_minimal.cli import app

TINY = ["--set", "sft.steps=2", "--set", "grpo.steps=1", "--set", "rollout.prompts_per_step=1",
        "--set", "rollout.group_size=2", "--set", "rollout.max_turns=1", "--set", "rollout.max_new_tokens=4",
        "--set", "sft.batch_size=2", "--set", "grpo.micro_batch_size=2", "--set", "log.eval_every=0",
        "--set", "log.checkpoint_every=1", "--set", "log.probe_tasks=1", "--set", "data.train_tasks=4",
        "--set", "data.eval_tasks=1"]


def config(data: bytes, name: str = "c.toml", *extra: str):
    def build(tmp: Path) -> list[str]:
        (tmp / name).write_bytes(data)
        return ["run", "--config", str(tmp / name), "--out", str(tmp / "out"), *extra]
    return build


def override(*sets: str):
    def build(tmp: Path) -> list[str]:
        return ["run", "--preset", "smoke", *[a for s in sets for a in ("--set", s)], "--out", str(tmp / "out")]
    return build


BAD_NUMBERS = ["grpo.steps=-5", "sft.steps=-1", "rollout.prompts_per_step=0", "rollout.max_new_tokens=-1",
               "rollout.max_turns=0", "log.checkpoint_every=0", "grpo.micro_batch_size=0", "sft.batch_size=0",
               "data.train_tasks=-1", "log.probe_every=-1", "grpo.epsilon=-1", "rollout.top_p=2", "rollout.top_p=0",
               "grpo.beta=-0.1", "sft.system_prompt_rate=1.5", "rollout.temperature=inf", "grpo.lr=nan",
               "grpo.max_grad_norm=-1", "supervision.off_policy_k=-1", "log.keep_checkpoints=-2"]

CASES = [
    Case("config-binary", config(garbage(300)), 2, ["c.toml", "not a text config"]),
    Case("config-nul-bytes", config(b"[grpo]\x00\x00steps = 1\n"), 2, ["c.toml"]),
    Case("config-utf16-read-as-text", config("[grpo]\nstepz = 2\n".encode("utf-16")), 2,
         ["unknown config key 'grpo.stepz'", "did you mean 'grpo.steps'"]),
    Case("config-utf16-yaml", config("grpo:\n  stepz: 2\n".encode("utf-16"), "c.yaml"), 2, ["grpo.stepz"]),
    Case("config-latin1", config("name = \"r\xe9sum\xe9\"\n".encode("latin-1")), 2, ["c.toml", "byte"]),
    Case("config-toml-syntax-error", config(b"[grpo\nsteps = 1\n"), 2, ["c.toml", "line 1"]),
    Case("config-yaml-syntax-error", config(b"grpo: [1, 2\n", "c.yaml"), 2, ["c.yaml", "line"]),
    Case("config-unknown-key", config(b"[grpo]\nstepz = 2\n"), 2, ["unknown config key 'grpo.stepz'"]),
    Case("config-unknown-section", config(b"[gpro]\nsteps = 2\n"), 2, ["unknown config key 'gpro'"]),
    Case("config-wrong-type-string", config(b'[grpo]\nsteps = "two"\n'), 2, ["grpo.steps: expected int"]),
    Case("config-wrong-type-float-for-int", config(b"[grpo]\nsteps = 2.5\n"), 2, ["grpo.steps: expected int"]),
    Case("config-wrong-type-table", config(b"grpo = 3\n"), 2, ["grpo: expected a table"]),
    Case("config-wrong-literal", config(b'[rollout]\nbackend = "tpu"\n'), 2, ["rollout.backend", "'tpu'"]),
    Case("config-top-level-list", config(b"- 1\n- 2\n", "c.yaml"), 2, ["c.yaml", "table of settings"]),
    Case("config-empty-file-nothing-to-train", config(b""), 2, ["nothing to train"]),
    Case("config-is-a-directory", lambda tmp: ((tmp / "d.toml").mkdir(), ["run", "--config", str(tmp / "d.toml")])[1],
         2, ["d.toml", "a directory, not a file"]),
    Case("config-missing", lambda tmp: ["run", "--config", str(tmp / "none.toml")], 2, ["none.toml"]),
    Case("config-a-named-pipe", lambda tmp: (named_pipe(tmp / "p.toml"),
                                             ["run", "--config", str(tmp / "p.toml")])[1], 2,
         ["p.toml: cannot read config: a named pipe (FIFO), not a regular file"]),
    Case("config-symlink-loop", lambda tmp: (__import__("os").symlink(tmp / "l.toml", tmp / "l.toml"),
                                             ["run", "--config", str(tmp / "l.toml")])[1], 2, ["l.toml"]),
    Case("config-negative-steps", config(b"[grpo]\nsteps = -5\n"), 2, ["grpo.steps: must be >= 0, got -5"]),
    Case("preset-unknown", lambda tmp: ["run", "--preset", "nope"], 2, ["unknown preset 'nope'"]),
    Case("set-without-equals", override("grpo.steps"), 2, ["expected KEY=VALUE"]),
    Case("set-unknown-key", override("grpo.stepz=3"), 2, ["unknown config key 'grpo.stepz'"]),
    Case("stop-after-negative", lambda tmp: ["run", "--preset", "smoke", "--stop-after", "-1", "--out",
                                             str(tmp / "o")], 2, ["--stop-after"]),
    *[Case(f"set-{s}", override(s), 2, [s.split("=")[0] + ":"]) for s in BAD_NUMBERS],
]


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_train_minimal_bad_config(case: Case, tmp_path: Path) -> None:
    run_case(app, case, tmp_path)
    assert not (tmp_path / "out").exists(), "nothing is trained or written on a bad configuration"


# ------------------------------------------------------------------ task file


def test_task_file_with_malformed_calls_is_named_and_skipped(tmp_path: Path) -> None:
    tf = tmp_path / "tasks.jsonl"
    tf.write_bytes(task_file_bytes())
    before = tree_hashes(tmp_path)
    out = invoke(app, ["sft", "--preset", "smoke", "--set", f"data.task_file={tf}", *TINY, "--set", "sft.steps=1",
                       "--set", "log.probe_every=0", "--out", str(tmp_path / "out")])
    assert out.code == 0, out.text
    flat = " ".join(out.text.split())
    for line in BAD_TASK_LINES:
        assert f"tasks.jsonl:{line}" in flat, (line, flat)
    assert "Traceback" not in flat
    assert {k: v for k, v in tree_hashes(tmp_path).items() if not k.startswith("out/")} == before


def test_task_file_with_no_usable_task_exits_1(tmp_path: Path) -> None:
    tf = tmp_path / "tasks.jsonl"
    tf.write_bytes(garbage(500))
    out = invoke(app, ["run", "--preset", "smoke", "--set", f"data.task_file={tf}", *TINY, "--out",
                       str(tmp_path / "out")])
    assert out.code == 1 and "tasks.jsonl" in out.err and "no usable task" in out.err, out.text


# ------------------------------------------------------------------ resume over a corrupt checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad_train") / "run"
    res = invoke(app, ["run", "--preset", "smoke", *TINY, "--out", str(out)])
    assert res.code == 0, res.text
    return out


@pytest.mark.parametrize("damage", ["weights-cut-in-half", "weights-missing", "optimizer-garbage",
                                    "trainer-state-garbage", "optimizer-a-named-pipe", "tokenizer-a-named-pipe",
                                    "trainer-state-a-named-pipe"])
def test_resume_with_corrupt_latest_checkpoint_falls_back(trained: Path, tmp_path: Path, damage: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    latest = sorted((run / "checkpoints").iterdir())[-1]
    target = {"weights-cut-in-half": latest / "model.safetensors", "weights-missing": latest / "model.safetensors",
              "optimizer-garbage": latest / "optimizer.pt", "trainer-state-garbage": latest / "trainer_state.json",
              "optimizer-a-named-pipe": latest / "optimizer.pt", "tokenizer-a-named-pipe": latest / "tokenizer.json",
              "trainer-state-a-named-pipe": latest / "trainer_state.json"}
    f = target[damage]
    if damage == "weights-missing":
        f.unlink()
    elif damage.endswith("a-named-pipe"):  # never opened for reading: it would block the resume
        named_pipe(f)
    elif damage == "weights-cut-in-half":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        f.write_bytes(garbage(200))
    out = invoke(app, ["run", "--preset", "smoke", *TINY, "--set", "grpo.steps=2", "--out", str(run), "--resume"])
    assert out.code == 0, out.text
    flat = " ".join(out.text.split())
    if damage == "trainer-state-a-named-pipe":  # not a complete checkpoint to the reader: named as skipped
        assert f"{latest.name}/trainer_state.json: a named pipe (FIFO), not a regular file; checkpoint skipped" in flat
    else:
        assert latest.name in flat and "checkpoint unusable" in flat and "resuming from step-000002" in flat, flat
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], steps  # step 3 re-run once, step 4 new


def test_resume_with_every_checkpoint_corrupt_exits_1(trained: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for d in (run / "checkpoints").iterdir():
        (d / "model.safetensors").write_bytes(b"")
    out = invoke(app, ["run", "--preset", "smoke", *TINY, "--out", str(run), "--resume"])
    assert out.code == 1 and "no checkpoint can be resumed from" in out.err, out.text
    first = out.err.strip().splitlines()[0]
    assert "step-000003" in first and "3 tried" in first, first  # the reasons on the line, not after a colon
    assert "Traceback" not in out.text


RUN_JSON_DAMAGE = {
    "garbage": (lambda f: f.write_bytes(garbage(300)), "run.json: unreadable or not valid JSON ('utf-8' codec"),
    "truncated": (lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
                  "run.json: unreadable or not valid JSON (Expecting"),
    "empty": (lambda f: f.write_bytes(b""), "run.json: unreadable or not valid JSON (Expecting value"),
    "not-an-object": (lambda f: f.write_text("[1, 2]"), "run.json: expected a JSON object, got list"),
}


@pytest.mark.parametrize("damage", list(RUN_JSON_DAMAGE))
def test_resume_with_a_broken_run_json_names_it(trained: Path, tmp_path: Path, damage: str) -> None:
    """A run.json that is no JSON object: named with what is wrong, before any checkpoint is
    tried (it said "no checkpoint can be resumed from:" with nothing after the colon); exit 1,
    nothing of the run changed."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    edit, why = RUN_JSON_DAMAGE[damage]
    edit(run / "run.json")
    before = tree_hashes(run)
    out = invoke(app, ["run", "--preset", "smoke", *TINY, "--out", str(run), "--resume"])
    flat = " ".join(out.err.split())
    assert out.code == 1 and why in flat and "cannot resume" in flat, out.text
    assert "no checkpoint can be resumed" not in flat and "Traceback" not in out.text
    assert tree_hashes(run) == before, "an input was modified"


def test_resume_with_metrics_jsonl_a_named_pipe_names_it(trained: Path, tmp_path: Path) -> None:
    """metrics.jsonl is repaired and appended to on resume: a pipe in its place (opening it to
    append would block) is named with the file, exit 1, before run.json is touched."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    named_pipe(run / "metrics.jsonl")
    before = tree_hashes(run)
    out = invoke(app, ["run", "--preset", "smoke", *TINY, "--out", str(run), "--resume"])
    flat = " ".join(out.err.split())
    assert out.code == 1 and "metrics.jsonl: a named pipe (FIFO), not a regular file; cannot resume" in flat, out.text
    assert "Traceback" not in out.text
    assert tree_hashes(run) == before, "an input was modified"


def test_resume_without_checkpoint_exits_1(tmp_path: Path) -> None:
    out = invoke(app, ["run", "--preset", "smoke", *TINY, "--out", str(tmp_path / "none"), "--resume"])
    assert out.code == 1 and "nothing to resume" in out.err, out.text
