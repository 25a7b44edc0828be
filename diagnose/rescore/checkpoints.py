"""Which checkpoints a run has, as Hugging Face model directories, whatever trainer saved them.

Layouts (docs/rescore.md):

* ours: ``checkpoints/step-NNNNNN/`` (complete only with ``trainer_state.json``, docs/run-format.md);
* TRL: ``checkpoint-N/`` in the output directory (``Trainer._save_checkpoint``: ``save_pretrained``
  weights, config, tokenizer, plus pickles that are never opened here);
* verl: ``global_step_N/actor/`` (``verl/utils/checkpoint/fsdp_checkpoint_manager.py``
  ``FSDPCheckpointManager.save_checkpoint``): ``actor/huggingface/`` always holds config and
  tokenizer, and the weights only when ``save_contents`` includes ``hf_model``; otherwise the
  weights are FSDP shards ``model_world_size_<W>_rank_<R>.pt`` that must be merged first;
* a folder of ``save_pretrained`` directories (``--checkpoints DIR/*``), the step read from the
  trailing number of each name.

Any of these may be a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``,
what TRL saves with ``peft_config``) instead of a model: it is loaded over its base
(`diagnose.model.lora`).

Torch-free: discovery only looks at names and stats.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from diagnose.adapters.trl import CHECKPOINT_RE as _TRL
from diagnose.model.files import WEIGHT_FILE_RE
from diagnose.model.lora import ADAPTER_WEIGHTS, adapter_problem, is_adapter_dir
from diagnose.regular_file import not_regular, read_text
from diagnose.rundir.schema import CHECKPOINTS_DIR, STEP_DIR_RE as _NATIVE, TRAINER_STATE_JSON

__all__ = ["Checkpoint", "discover_checkpoints", "merge_hint", "weight_files"]

_VERL = re.compile(r"^global_step_(\d+)$")
_TRAILING = re.compile(r"(\d+)$")
_FSDP_SHARD = re.compile(r"^model_world_size_\d+_rank_\d+\.pt$")
_MAX_DEPTH = 4


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint: ``name`` (its path relative to the run where it is inside it), ``step``,
    ``path`` (the HF model directory to load) and ``problem`` (why it cannot be loaded as it is,
    in one line; None when it looks loadable)."""

    name: str
    step: int | None
    path: Path
    problem: str | None = None


def weight_files(d: Path) -> list[Path]:
    """The weight files of a ``save_pretrained`` directory (safetensors when there are any), or
    the adapter weights of a PEFT adapter folder."""
    if is_adapter_dir(d):
        return [d / ADAPTER_WEIGHTS] if (d / ADAPTER_WEIGHTS).is_file() else []
    try:
        # not only regular files: a weight file that is a pipe is named by the loader's check
        files = sorted(p for p in d.iterdir() if not p.is_dir() and WEIGHT_FILE_RE.match(p.name))
    except OSError:
        return []
    st = [p for p in files if p.suffix == ".safetensors"]
    return st or files


def merge_hint(actor: Path, step: int | None) -> str:
    """The one line that says how to turn verl FSDP shards into an HF directory (verl's
    ``verl/model_merger/__main__.py`` usage)."""
    target = actor.parent / "actor_hf"
    return (f"only FSDP shards (model_world_size_*_rank_*.pt), no HF weights: merge them with "
            f"`python -m verl.model_merger merge --backend fsdp --local_dir {actor} --target_dir {target}` "
            f"and pass --checkpoints {target}")


def _name(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _native_step(d: Path) -> int | None:
    try:
        v = json.loads(read_text(d / TRAINER_STATE_JSON)).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _verl(gs: Path, root: Path, step: int) -> Checkpoint:
    actor = gs / "actor" if (gs / "actor").is_dir() else gs
    for cand in (actor / "huggingface", actor):
        if (cand / "config.json").is_file() and weight_files(cand):
            return Checkpoint(_name(gs, root), step, cand)
    if any(_FSDP_SHARD.match(p.name) for p in actor.glob("model_world_size_*_rank_*.pt")):
        return Checkpoint(_name(gs, root), step, actor, merge_hint(actor, step))
    return Checkpoint(_name(gs, root), step, actor, "no HF weights (config.json + *.safetensors) found in actor/")


def _one(d: Path, root: Path) -> Checkpoint:
    """A directory given explicitly (or found by name) as a checkpoint."""
    name = d.name
    m = _VERL.match(name)
    if m:
        return _verl(d, root, int(m.group(1)))
    if name == "actor" and _VERL.match(d.parent.name):
        return _verl(d.parent, root, int(_VERL.match(d.parent.name).group(1)))
    step = None
    m = _NATIVE.match(name)
    if m:
        step = _native_step(d)
        if step is None:
            why = not_regular(d / TRAINER_STATE_JSON)
            if why == "no such file":
                return Checkpoint(_name(d, root), int(m.group(1)), d,
                                  "incomplete checkpoint (no trainer_state.json: still being written, or crashed)")
            if why is not None:
                return Checkpoint(_name(d, root), int(m.group(1)), d, f"{TRAINER_STATE_JSON}: {why}")
            step = int(m.group(1))
    else:
        m = _TRL.match(name) or _TRAILING.search(name)
        step = int(m.group(1)) if m else None
    if is_adapter_dir(d):
        problem = adapter_problem(d)
        if problem:
            return Checkpoint(_name(d, root), step, d, problem)
    elif not (d / "config.json").is_file():
        return Checkpoint(_name(d, root), step, d, "not a Hugging Face model directory (no config.json)")
    if not weight_files(d):
        return Checkpoint(_name(d, root), step, d, "no weight files (model*.safetensors / pytorch_model*.bin)")
    if step is None:
        return Checkpoint(_name(d, root), None, d, "no step in the directory name (name it step-N or checkpoint-N)")
    return Checkpoint(_name(d, root), step, d)


def _walk_verl(root: Path) -> list[Path]:
    out: list[Path] = []
    stack = [(root, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            subs = [e for e in os.scandir(d) if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
        except OSError:
            continue
        for e in subs:
            if _VERL.match(e.name):
                out.append(Path(e.path))
            elif depth < _MAX_DEPTH:
                stack.append((Path(e.path), depth + 1))
    return out


def _found(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    dirs: list[Path] = []
    native = root / CHECKPOINTS_DIR
    if native.is_dir():
        dirs += [p for p in native.iterdir() if p.is_dir() and _NATIVE.match(p.name)]
    dirs += [p for p in root.iterdir() if p.is_dir() and _TRL.match(p.name)]
    dirs += _walk_verl(root)
    if not dirs:  # a folder of save_pretrained directories
        dirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                and ((p / "config.json").is_file() or is_adapter_dir(p))]
    return dirs


def _given(spec: str, root: Path) -> list[Path]:
    out: list[Path] = []
    for part in [s.strip() for s in spec.split(",") if s.strip()]:
        pat = part if os.path.isabs(part) else str(root / part)
        if glob.has_magic(part):
            out += [Path(p) for p in sorted(glob.glob(pat)) if Path(p).is_dir()]
        else:
            p = Path(part) if Path(part).exists() else Path(pat)
            out.append(p)
    return out


def discover_checkpoints(run: str | os.PathLike[str], spec: str | None = None) -> list[Checkpoint]:
    """The run's checkpoints in step order (unknown steps last). ``spec``: a glob (relative to
    the run or absolute) or a comma-separated list of directories; None: look in the run for
    the layouts above. A path that does not exist is a `Checkpoint` with a problem."""
    root = Path(run)
    if root.is_file():
        root = root.parent
    dirs = _given(spec, root) if spec else _found(root)
    seen: set[Path] = set()
    out: list[Checkpoint] = []
    for d in dirs:
        key = d.resolve() if d.exists() else d
        if key in seen:
            continue
        seen.add(key)
        if not d.is_dir():
            out.append(Checkpoint(_name(d, root), None, d, "no such directory"))
            continue
        out.append(_one(d, root))
    out.sort(key=lambda c: (c.step is None, c.step if c.step is not None else 0, c.name))
    return out
