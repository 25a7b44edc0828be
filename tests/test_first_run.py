"""Small things a new user sees on the first run: one consistent cache line on the
overview, no transformers progress bars between the trainer's own lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from diagnose.scan.cache import CacheInfo


def test_cache_line_says_one_thing_when_touched_files_did_not_change() -> None:
    info = CacheInfo(signals="cached", episodes="cached", reason="3 file(s) with a new size or modification time")
    text = info.describe()
    assert text.startswith("nothing recomputed: 3 file(s) with a new size or modification time")
    assert "but no file's content changed" in text
    assert "none of them changed" not in text  # would contradict the reason it gives


def test_checkpoint_saves_without_transformers_progress_bars(tmp_path: Path, capfd) -> None:
    pytest.importorskip("transformers")
    from transformers.utils import logging as hf_logging

    from diagnose.model.resolve import load_model_and_tokenizer
    from diagnose.rundir import RunWriter

    model, tok = load_model_and_tokenizer("tiny", device="cpu")
    w = RunWriter(tmp_path / "run", config={}, model={}, tokenizer={}, control_tokens=[], seeds={}, fsync=False)
    hf_logging.enable_progress_bar()
    capfd.readouterr()
    with w.checkpoint(2) as d:  # the trainer's path (train_minimal.trainer.save_checkpoint)
        model.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
    out = capfd.readouterr()
    assert "Writing model shards" not in out.err + out.out
    assert hf_logging.is_progress_bar_enabled(), "the switch is restored after the checkpoint"
    assert (w.checkpoint_dir(2) / "model.safetensors").is_file()
    w.close()
