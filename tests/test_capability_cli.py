"""`diagnose probe`: runs and model directories, --json, results on disk, bad input, exit codes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diagnose.capability import read_capability
from diagnose.cli import app

runner = CliRunner()


def invoke(*args: object):
    res = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


def _no_control_tokens_tokenizer(out: Path) -> None:
    """A working tokenizer without any ChatML / Hermes control token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate("the a tool call answer is".split())}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[UNK]").save_pretrained(out)


@pytest.fixture(scope="module")
def probe_run(probe_models, tmp_path_factory) -> Path:
    """A run whose checkpoints are: 10 healthy, 20 collapsed, 30 corrupt weights, 40 a tokenizer
    without control tokens."""
    from transformers import AutoTokenizer

    from diagnose.control_tokens import ControlTokenRegistry
    from diagnose.rundir import RunWriter

    run = tmp_path_factory.mktemp("probe_cli") / "run"
    tok = AutoTokenizer.from_pretrained(probe_models["healthy"], local_files_only=True)
    w = RunWriter(run, config={"name": "probe-test"}, model={"path": str(probe_models["healthy"])},
                  tokenizer={"name": "tiny"}, control_tokens=ControlTokenRegistry.from_tokenizer(tok).to_json(),
                  seeds={"seed": 0})
    for step in range(0, 41, 2):
        w.log_metrics(step, {"reward": 0.5, "accuracy": 0.5})
    for step, src in ((10, "healthy"), (20, "collapsed"), (30, "healthy"), (40, "healthy")):
        with w.checkpoint(step) as tmp:
            shutil.copytree(probe_models[src], tmp, dirs_exist_ok=True)
    w.close()
    (run / "checkpoints" / "step-000030" / "model.safetensors").write_bytes(b"not a safetensors file")
    bad_tok = run / "checkpoints" / "step-000040"
    for f in bad_tok.glob("tokenizer*"):
        f.unlink()
    (bad_tok / "chat_template.jinja").unlink(missing_ok=True)
    _no_control_tokens_tokenizer(bad_tok)
    return run


@pytest.fixture()
def task_file(tmp_path, probe_models) -> Path:
    """The 4 fixture tasks as a task file (same prompts, recorded tool outputs), plus broken lines."""
    from diagnose.tasks import gold_messages

    lines = []
    for t in probe_models["tasks"]:
        msgs = gold_messages(t)
        outputs = [[json.loads(m["content"]) for m in msgs if m["role"] == "tool"]]
        # regroup the tool outputs per call turn
        flat, outs = outputs[0], []
        for turn in t.gold_turns:
            if turn:
                outs.append(flat[: len(turn)])
                flat = flat[len(turn):]
        lines.append(json.dumps({"id": t.id, "messages": t.messages, "tools": t.tools,
                                 "ground_truth": [[c.to_dict() for c in turn] for turn in t.gold_turns],
                                 "tool_outputs": outs, "final_answer": t.answer_value}))
    lines.insert(1, "{not json")
    lines.insert(3, json.dumps({"id": "x", "messages": [], "tools": []}))
    f = tmp_path / "tasks.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def test_probe_run_checkpoints_json_and_files(probe_run):
    res = invoke("probe", probe_run, "--checkpoints", "step-000010,20", "--tasks", "4", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    verdicts = {s["checkpoint"]: s["verdict"] for s in out["summary"]}
    assert verdicts == {"step-000010": "healthy", "step-000020": "capability intact, format broken"}
    assert {r["measure"] for r in out["results"]} == {"native", "repair_forbid", "repair_prefill", "alt_pythonic",
                                                      "alt_json", "likelihood"}
    assert out["written_to"] == str(probe_run / "capability")
    saved = read_capability(probe_run)
    assert saved is not None and saved.summary["verdict"].to_list() == ["healthy", "capability intact, format broken"]
    assert saved.summary["step"].to_list() == [10, 20]
    assert saved.results.height == 12
    assert saved.meta["tasks"]["n"] == 4 and saved.meta["thresholds"]["capable_min"] == 0.2
    assert saved.meta["checkpoints"]["step-000020"]["roles"] == ["requested"]
    # probing one more checkpoint later keeps the earlier ones (same tasks, same settings)
    res = invoke("probe", probe_run, "--checkpoints", "step-000010", "--tasks", "4")
    assert res.exit_code == 0, res.output
    assert read_capability(probe_run).summary["checkpoint"].to_list() == ["step-000010", "step-000020"]
    for words in ("native", "repair: forbid", "fired", "likelihood", "chance", "healthy"):
        assert words in res.stdout
    # other tasks: earlier results are replaced, and it says so
    res = invoke("probe", probe_run, "--checkpoints", "step-000010", "--tasks", "3")
    assert res.exit_code == 0 and "replaced" in res.stderr
    assert read_capability(probe_run).summary["checkpoint"].to_list() == ["step-000010"]


def test_bad_checkpoints_are_named_and_skipped(probe_run, tmp_path):
    res = invoke("probe", probe_run, "--all", "--tasks", "2", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    err = res.stderr
    assert "step-000030" in err and "model does not load" in err
    assert str(probe_run / "checkpoints" / "step-000040" / "tokenizer.json") in err
    assert "control tokens" in err and "missing roles" in err
    saved = read_capability(tmp_path)
    assert saved.summary["checkpoint"].to_list() == ["step-000010", "step-000020"]
    assert [s["checkpoint"] for s in saved.meta["skipped"]] == ["step-000030", "step-000040"]
    # nothing loadable: exit 2
    res = invoke("probe", probe_run, "--checkpoints", "30,40", "--tasks", "2", "--out", tmp_path)
    assert res.exit_code == 2 and "no checkpoint could be probed" in res.stderr


def test_default_selection_without_episodes(probe_run, tmp_path):
    res = invoke("probe", probe_run, "--tasks", "1", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    assert "first and last checkpoint" in res.stderr
    saved = read_capability(tmp_path)
    assert saved.summary["checkpoint"].to_list() == ["step-000010"]  # step 40's tokenizer is unusable
    assert saved.meta["checkpoints"]["step-000010"]["roles"] == ["first"]


def test_model_dir_with_task_file(probe_models, task_file, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(probe_models["collapsed"], model)
    res = invoke("probe", "--model", model, "--task-file", task_file, "--json")
    assert res.exit_code == 0, res.output
    assert f"{task_file}:1" not in res.stderr and f"{task_file}:2" in res.stderr and f"{task_file}:4" in res.stderr
    out = json.loads(res.stdout)
    assert out["tasks"]["n"] == 4 and out["tasks"]["skipped_lines"] == 2
    (summary,) = out["summary"]
    assert summary["checkpoint"] == "model" and summary["step"] is None
    assert summary["verdict"] == "capability intact, format broken"  # the replay environment agrees
    assert read_capability(model).meta["kind"] == "model"


def test_read_only_model_dir(probe_models, tmp_path):
    """A model directory the user cannot write: the probe says so and names --out. Root writes
    anywhere, so as root the command runs without the rights that bypass file modes
    (tests/_bad_input.py `as_nobody_cmd`)."""
    import subprocess
    import sys

    from _bad_input import as_nobody_cmd, remove_world_dir, world_dir

    prefix = as_nobody_cmd()
    if prefix is None:
        pytest.skip("running as root with no way to drop the rights that bypass file modes (setpriv missing)")
    world = world_dir("ro-probe")
    model, out, home = world / "ro", world / "elsewhere", world / "home"
    shutil.copytree(probe_models["healthy"], model)
    for d in (out, home):
        d.mkdir(mode=0o777)
        d.chmod(0o777)
    model.chmod(0o555)
    env = {**os.environ, "HOME": str(home), "DIAGNOSE_HOME": str(home)}

    def probe(*extra):
        return subprocess.run([*prefix, sys.executable, "-m", "diagnose.cli", "probe", "--model", str(model),
                               "--tasks", "1", *extra], capture_output=True, text=True, env=env, timeout=300, cwd="/")

    try:
        res = probe()
        assert res.returncode == 0 and "not writable" in res.stderr and "--out" in res.stderr, res.stderr
        assert not (model / "capability").exists()
        res = probe("--out", str(out))
        assert res.returncode == 0, res.stderr
        assert read_capability(out) is not None
    finally:
        remove_world_dir(world)


@pytest.mark.parametrize(("args", "message"), [
    ((), "give a run directory or --model"),
    (("RUN", "--model", "MODEL"), "not both"),
    (("MISSING",), "no such file or directory"),
    (("RUN", "--all", "--checkpoints", "10"), "exclude each other"),
    (("--model", "MODEL", "--all"), "select checkpoints of a run"),
    (("RUN", "--checkpoints", "step-000099"), "no checkpoint to probe"),
    (("--model", "MODEL", "--task-file", "MISSING"), "task file not found"),
    (("--model", "MODEL", "--task-file", "BAD"), "no usable task"),
    (("--model", "MODEL", "--split", "nope"), "unknown split"),
    (("--model", "NOTAMODEL"), "config.json"),
])
def test_usage_errors_exit_2(args, message, probe_run, probe_models, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{nope\n[]\n")
    (tmp_path / "notamodel").mkdir()
    subst = {"RUN": probe_run, "MODEL": probe_models["healthy"], "MISSING": tmp_path / "missing", "BAD": bad,
             "NOTAMODEL": tmp_path / "notamodel"}
    res = invoke("probe", *[subst.get(a, a) for a in args], "--tasks", "1", "--out", tmp_path)
    assert res.exit_code == 2, res.output
    assert message in res.stderr, res.stderr


def test_a_bug_in_one_checkpoint_exits_3_and_keeps_the_others(probe_run, tmp_path, monkeypatch):
    import diagnose.capability.runner as runner_mod

    real = runner_mod.probe_model

    def flaky(model, tok, tasks, cfg, progress=None):
        flaky.calls = getattr(flaky, "calls", 0) + 1
        if flaky.calls == 1:  # the first checkpoint
            raise RuntimeError("boom")
        return real(model, tok, tasks, cfg, progress=progress)

    monkeypatch.setattr(runner_mod, "probe_model", flaky)
    res = invoke("probe", probe_run, "--checkpoints", "10,20", "--tasks", "1", "--out", tmp_path)
    assert res.exit_code == 3, res.output
    assert "internal error" in res.stderr and "boom" in res.stderr and "step-000010" in res.stderr
    assert read_capability(tmp_path).summary["checkpoint"].to_list() == ["step-000020"]


def test_a_model_dir_given_as_run(probe_models, tmp_path):
    res = invoke("probe", probe_models["healthy"], "--tasks", "1", "--out", tmp_path)
    assert res.exit_code == 2 and "use --model" in res.stderr


def test_help_documents_exit_codes():
    res = invoke("probe", "--help")
    assert res.exit_code == 0 and "Exit codes" in res.stdout and "3 = internal error" in res.stdout


@pytest.mark.slow
def test_probe_a_trainer_run(tmp_path):
    """The trainer -> probe contract: probe a run written by `train-minimal run --preset smoke`."""
    from typer.testing import CliRunner as Runner

    from train_minimal.cli import app as train_app

    run = tmp_path / "smoke"
    res = Runner().invoke(train_app, ["run", "--preset", "smoke", "--out", str(run)])
    assert res.exit_code == 0, res.output
    res = invoke("probe", run, "--tasks", "3", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [s["checkpoint"] for s in out["summary"]] == ["step-000003", "step-000006"]
    assert all(s["verdict"] in ("capability lost", "healthy", "capability intact, format broken", "inconclusive")
               for s in out["summary"])
