"""Which checkpoint a ``--resume`` starts from: the latest one that loads.

Why: a run killed while the disk filled up, or a checkpoint copied half, used to end the resume
in a safetensors traceback. Each checkpoint, newest first, must load whole (weights and
tokenizer, ``optimizer.pt`` with ``weights_only=True``, ``trainer_state.json``); one that does not
is named with the reason and the next older one is tried.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from diagnose.error_line import error_line
from diagnose.model.resolve import load_model_and_tokenizer


def load_latest_usable(ckpts: list[tuple[int, Path]], *, dtype: Any, device: str,
                       console: Console) -> tuple[Path, Any, Any]:
    """``(checkpoint dir, model, tokenizer)`` of the newest checkpoint that loads; raises
    ``ValueError`` naming every checkpoint and why when none does (the CLI's exit 1)."""
    failures = []
    for step, path in reversed(ckpts):
        try:
            state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            if not isinstance(state, dict) or int(state.get("step", -1)) != step:
                raise ValueError(f"trainer_state.json does not hold step {step}")
            torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
            model, tokenizer = load_model_and_tokenizer(str(path), dtype=dtype, device=device)
        except Exception as e:  # noqa: BLE001 - any unreadable part makes the checkpoint unusable
            failures.append(f"{path}: {error_line(e)}")
            console.print(f"[yellow]warning:[/] {escape(failures[-1])}; checkpoint unusable"
                          + ("; trying the previous one" if len(failures) < len(ckpts) else ""),
                          highlight=False, soft_wrap=True)
            continue
        if failures:
            console.print(f"[yellow]resuming from {escape(path.name)}[/]: the steps after it are run again and the "
                          "unusable checkpoint(s) replaced", highlight=False, soft_wrap=True)
        return path, model, tokenizer
    raise ValueError("no checkpoint can be resumed from:\n  " + "\n  ".join(failures))
