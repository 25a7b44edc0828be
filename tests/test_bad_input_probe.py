"""Bad input to `diagnose probe`: checkpoints with missing, cut or NaN weights, a broken
config or tokenizer, task files with malformed calls. Exit codes (PROBE_EPILOG): 0 = probed
(unloadable checkpoints named and skipped), 2 = unreadable input / nothing loadable. Table:
docs/reliability.md."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _bad_input import (
    BAD_TASK_LINES,
    Case,
    cut_half,
    garbage,
    invoke,
    run_case,
    task_file_bytes,
    tree_hashes,
)

from diagnose.cli import app

TINY_TRAIN = ["sft.steps=3", "grpo.steps=0", "sft.batch_size=2", "log.eval_every=0", "log.probe_every=0",
              "log.checkpoint_every=1", "data.train_tasks=4", "data.eval_tasks=1"]
PROBE = ["--tasks", "1", "--max-new-tokens", "4", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("diagnose_home")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from train_minimal.cli import app as train_app

    out = tmp_path_factory.mktemp("bad_probe") / "run"
    res = invoke(train_app, ["run", "--preset", "smoke", *[a for s in TINY_TRAIN for a in ("--set", s)],
                             "--out", str(out)])
    assert res.code == 0, res.text
    return out


def nan_weights(ckpt: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    f = ckpt / "model.safetensors"
    sd = load_file(f)
    k = next(iter(sd))
    sd[k] = torch.full_like(sd[k], float("nan"))
    save_file(sd, f, metadata={"format": "pt"})


DAMAGE = {
    "weights-missing": (lambda c: (c / "model.safetensors").unlink(), "no *.safetensors weights"),
    "weights-cut-in-half": (lambda c: cut_half(c / "model.safetensors"), "model does not load"),
    "weights-empty": (lambda c: (c / "model.safetensors").write_bytes(b""), "model does not load"),
    "weights-NaN": (nan_weights, "non-finite weights"),
    "weights-pickle-only": (lambda c: ((c / "model.safetensors").rename(c / "pytorch_model.bin")),
                            "never unpickles"),
    "config-garbage": (lambda c: (c / "config.json").write_bytes(garbage(100)), "config.json"),
    "config-missing": (lambda c: (c / "config.json").unlink(), "config.json: missing"),
    "tokenizer-garbage": (lambda c: (c / "tokenizer.json").write_bytes(garbage(100)), "tokenizer"),
}


def one_checkpoint(damage: str):
    def build(tmp: Path, trained: Path) -> list[str]:
        run = tmp / "run"
        shutil.copytree(trained, run)
        ckpts = sorted((run / "checkpoints").iterdir())
        for c in ckpts[:-1]:
            shutil.rmtree(c)
        DAMAGE[damage][0](ckpts[-1])
        return ["probe", str(run), "--all", *PROBE]
    return build


def task_file(data: bytes):
    def build(tmp: Path, trained: Path) -> list[str]:
        (tmp / "tasks.jsonl").write_bytes(data)
        return ["probe", str(trained), "--task-file", str(tmp / "tasks.jsonl"), *PROBE]
    return build


CASES = [
    *[Case(f"only-checkpoint-{d}", one_checkpoint(d), 2, ["step-000003", why, "no checkpoint could be probed"])
      for d, (_, why) in DAMAGE.items()],
    Case("task-file-binary", task_file(garbage(400)), 2, ["tasks.jsonl", "no usable task"]),
    Case("task-file-empty", task_file(b""), 2, ["tasks.jsonl", "no usable task"]),
    Case("task-file-utf16", task_file(task_file_bytes().decode("utf-8", "replace").encode("utf-16")), 2,
         ["tasks.jsonl:1"]),
    Case("task-file-missing", lambda tmp, t: ["probe", str(t), "--task-file", str(tmp / "none.jsonl"), *PROBE], 2,
         ["none.jsonl"]),
    Case("model-dir-missing", lambda tmp, t: ["probe", "--model", str(tmp / "nomodel"), *PROBE], 2, ["nomodel"]),
    Case("model-dir-empty", lambda tmp, t: ((tmp / "m").mkdir(), ["probe", "--model", str(tmp / "m"), *PROBE])[1],
         2, ["config.json: missing"]),
    Case("run-without-checkpoints", lambda tmp, t: (shutil.copytree(t, tmp / "r", ignore=shutil.ignore_patterns(
        "checkpoints")), ["probe", str(tmp / "r"), *PROBE])[1], 2, ["checkpoint"]),
    Case("unknown-checkpoint-name", lambda tmp, t: ["probe", str(t), "--checkpoints", "step-999", *PROBE], 2,
         ["step-999"]),
    Case("checkpoint-name-garbage", lambda tmp, t: ["probe", str(t), "--checkpoints", "<script>x", *PROBE], 2,
         ["<script>x"]),
]


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_probe_bad_input(case: Case, tmp_path: Path, trained: Path) -> None:
    before = tree_hashes(trained)
    run_case(app, case.on(trained), tmp_path)
    assert tree_hashes(trained) == before


def test_probe_partial_results_name_every_bad_checkpoint_and_task_line(tmp_path: Path, trained: Path) -> None:
    """Checkpoints with NaN and missing weights next to a good one, and a task file with
    malformed calls next to good tasks: the bad ones are named
    (file and line) and skipped, the good checkpoint is probed on the good tasks, exit 0."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    c1, c2, c3 = sorted((run / "checkpoints").iterdir())
    nan_weights(c1)
    (c2 / "model.safetensors").unlink()
    (tmp_path / "tasks.jsonl").write_bytes(task_file_bytes())
    inputs = tree_hashes(tmp_path)
    out = invoke(app, ["probe", str(run), "--all", "--task-file", str(tmp_path / "tasks.jsonl"), *PROBE])
    flat = " ".join(out.text.split())
    assert out.code == 0, flat
    assert "step-000001/model.safetensors: non-finite weights" in flat and "step-000002: no *.safetensors" in flat
    for line in BAD_TASK_LINES:
        assert f"tasks.jsonl:{line}" in flat, (line, flat)
    assert "step-000003" in flat and "Traceback" not in flat
    after = tree_hashes(tmp_path)
    assert {k: v for k, v in after.items() if "/capability/" not in k} == inputs
