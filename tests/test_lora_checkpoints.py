"""LoRA (peft) checkpoints of a real `trl.GRPOTrainer` run: `DiagnoseCallback` probes the
peft-wrapped policy, and `diagnose rescore` / `diagnose probe --model` load the adapter folders TRL
saves (`Trainer._save_checkpoint` -> `PeftModel.save_pretrained`: ``adapter_config.json`` +
``adapter_model.safetensors``, no ``config.json``) over their base, from ``adapter_config.json``
or ``--base``; merged checkpoints load too; ``adapter_model.bin`` (a pickle) is refused.

The run: examples/trl_grpo_tool_use.py on the embedded tiny model with ``peft_config``, 2 steps."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("trl", reason="a real TRL + peft run: needs the trl extra")
peft = pytest.importorskip("peft", reason="LoRA adapters: needs the peft package (the dev extra)")

from diagnose.cli import app  # noqa: E402
from diagnose.model.lora import AdapterError, adapter_base, is_adapter_dir, load_adapter_model  # noqa: E402
from diagnose.rescore.checkpoints import discover_checkpoints  # noqa: E402
from diagnose.rescore.pipeline import RescoreConfig, RescoreError, rescore_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # examples/ is not installed with the package
from examples.trl_grpo_tool_use import build_trainer  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """2 real GRPO steps with a LoRA adapter (lr high enough that the adapter moves the logits),
    a checkpoint every step, the callback probing every step."""
    out = tmp_path_factory.mktemp("lora") / "run"
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = build_trainer(out, max_steps=2, n_tasks=8, probe_every=1, lr=5e-3, peft_config=cfg)
    trainer.train()
    return out


def _inputs(tok) -> torch.Tensor:
    return torch.tensor([tok('<|im_start|>assistant\n<tool_call>\n{"name": "find_account"')["input_ids"]])


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_trl_saves_adapter_folders_and_the_callback_probes_the_peft_model(lora_run):
    ck = lora_run / "checkpoint-2"
    assert (ck / "adapter_config.json").is_file() and (ck / "adapter_model.safetensors").is_file()
    assert not (ck / "model.safetensors").exists() and is_adapter_dir(ck)
    assert sorted(p.name for p in (lora_run / "diagnose" / "probe").glob("step-*.parquet")) == [
        "step-000001.parquet", "step-000002.parquet"]
    found = discover_checkpoints(lora_run)
    assert [(c.name, c.step, c.problem) for c in found] == [("checkpoint-1", 1, None), ("checkpoint-2", 2, None)]


def test_merged_adapter_equals_the_peft_model_and_differs_from_the_base(lora_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ck = lora_run / "checkpoint-2"
    base_dir = adapter_base(ck)
    tok = AutoTokenizer.from_pretrained(ck)
    ids = _inputs(tok)
    merged = _logits(load_adapter_model(ck), ids)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    plain = _logits(base, ids)
    unmerged = _logits(peft.PeftModel.from_pretrained(base, str(ck)).eval(), ids)
    assert torch.allclose(merged, unmerged, atol=1e-4)
    assert (merged - plain).abs().max() > 1e-3  # the adapter is applied, not just the base


def test_rescore_reads_adapter_checkpoints(lora_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns(".diagnose"))
    rep = rescore_run(run, RescoreConfig(samples=4))
    assert sorted(rep.computed) == ["checkpoint-1", "checkpoint-2"] and not rep.skipped
    # a cached re-run; a new base is another model, so it is recomputed
    assert sorted(rescore_run(run, RescoreConfig(samples=4)).cached) == ["checkpoint-1", "checkpoint-2"]
    rep2 = rescore_run(run, RescoreConfig(samples=4, base=str(adapter_base(run / "checkpoint-2"))))
    assert sorted(rep2.computed) == ["checkpoint-1", "checkpoint-2"]


def _moved_base(lora_run: Path, tmp_path: Path) -> Path:
    """The run as if trained elsewhere: the adapters name a base that is not on this machine."""
    run = tmp_path / "elsewhere"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns(".diagnose"))
    for cfg_file in run.glob("checkpoint-*/adapter_config.json"):
        cfg = json.loads(cfg_file.read_text())
        cfg["base_model_name_or_path"] = "/nonexistent/models/tiny-base"
        cfg_file.write_text(json.dumps(cfg))
    return run


def test_base_not_on_this_machine_needs_base_option(lora_run, tmp_path):
    run = _moved_base(lora_run, tmp_path)
    ck = run / "checkpoint-2"
    with pytest.raises(AdapterError, match=r"adapter_config\.json.*/nonexistent/models/tiny-base.*--base DIR"):
        adapter_base(ck)
    rep = rescore_run(run, RescoreConfig(samples=4))
    assert not rep.computed and len(rep.skipped) == 2 and "--base DIR" in rep.skipped[0][1]
    base = adapter_base(lora_run / "checkpoint-2")
    res = runner.invoke(app, ["rescore", str(run), "--samples", "4", "--base", str(base)])
    assert res.exit_code == 0, res.output
    assert "rescored 2 checkpoint(s)" in res.output


def test_probe_model_on_an_adapter_folder(lora_run, tmp_path):
    run = _moved_base(lora_run, tmp_path)
    ck = run / "checkpoint-2"
    res = runner.invoke(app, ["probe", "--model", str(ck), "--tasks", "2", "--out", str(tmp_path / "p1"), "--json"])
    assert res.exit_code == 2 and "--base DIR" in res.output  # the recorded base is not here: said, not a traceback
    base = adapter_base(lora_run / "checkpoint-2")
    res = runner.invoke(app, ["probe", "--model", str(ck), "--base", str(base), "--tasks", "2",
                              "--out", str(tmp_path / "p2"), "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout.strip().splitlines()[-1])
    assert payload["kind"] == "model" and len(payload["summary"]) == 1
    assert {r["measure"] for r in payload["results"]} >= {"native", "likelihood"}


def test_merged_checkpoint_loads_like_the_adapter(lora_run, tmp_path):
    from transformers import AutoTokenizer

    ck = lora_run / "checkpoint-2"
    merged_dir = tmp_path / "ckpts" / "merged-2"
    load_adapter_model(ck).save_pretrained(merged_dir)
    AutoTokenizer.from_pretrained(ck).save_pretrained(merged_dir)
    found = discover_checkpoints(lora_run, str(merged_dir))
    assert found[0].step == 2 and found[0].problem is None and not is_adapter_dir(merged_dir)
    from diagnose.capability.runner import load_checkpoint

    model, tok = load_checkpoint(merged_dir)
    ids = _inputs(tok)
    assert torch.allclose(_logits(model, ids), _logits(load_adapter_model(ck), ids), atol=1e-4)


def test_pickled_adapter_is_refused_and_never_unpickled(lora_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns(".diagnose"))
    ck = run / "checkpoint-2"
    (ck / "adapter_model.safetensors").rename(ck / "adapter_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called on a user file"))
    found = {c.name: c for c in discover_checkpoints(run)}
    assert "adapter_model.bin is a pickle" in found["checkpoint-2"].problem
    with pytest.raises(AdapterError, match="pickle"):
        load_adapter_model(ck)
    rep = rescore_run(run, RescoreConfig(samples=4))
    assert rep.computed == ["checkpoint-1"] and "pickle" in rep.skipped[0][1]
    res = runner.invoke(app, ["probe", "--model", str(ck), "--tasks", "1", "--out", str(tmp_path / "p")])
    assert res.exit_code == 2 and "pickle" in res.output


def test_rescore_error_without_any_tokenizer_names_the_base(lora_run, tmp_path):
    run = _moved_base(lora_run, tmp_path)
    for ck in run.glob("checkpoint-*"):
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (ck / f).unlink(missing_ok=True)
    with pytest.raises(RescoreError, match="no checkpoint holds tokenizer files, and .*--base DIR"):
        rescore_run(run, RescoreConfig(samples=4))
