"""Which files of an open-instruct ``rollouts_save_path`` belong to which run.

open-instruct writes every run flat into one folder (``rl_utils.py`` ``save_rollout_metadata``:
``<run_name>_metadata.jsonl``; ``_save_rollouts``: ``<run_name>_rollouts_<shard:06d>.jsonl``).
``grpo_fast.py`` ``setup_runtime_variables`` sets ``run_name = f"{exp_name}__{seed}__{int(time.time())}"``
at every start, so a run resumed from its checkpoint (``DataPreparationActor.set_state``: the
data step restarts at ``last_consumed_step + 1``, ``total_samples_written`` at 0) writes under a
new name, from a step > 0. Such starts are one run: a later start of the same ``exp_name`` and
``seed`` whose first step is > 0 continues the one before it. A later start from step 0 is a
new run (started again from scratch), kept apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from diagnose.adapters._common.io import first_object, visible_files
from diagnose.adapters._common.values import as_step

__all__ = ["META_RE", "SHARD_RE", "RunFiles", "layout", "resolve"]

SHARD_RE = re.compile(r"^(?P<run>.+)_rollouts_(?P<shard>\d+)\.jsonl$")
META_RE = re.compile(r"^(?P<run>.+)_metadata\.jsonl$")
#: ``grpo_fast.py``: ``f"{args.exp_name}__{args.seed}__{int(time.time())}"``
RUN_NAME_RE = re.compile(r"^(?P<exp>.+)__(?P<seed>-?\d+)__(?P<t>\d+)$")


@dataclass
class RunFiles:
    """One run: ``name`` (its first start's run name), ``shards`` in write order (start by
    start, shard by shard: later writes of a step come later), ``meta`` and ``starts``
    (``(run_name, first step)`` of each start, resumed ones after the first)."""

    name: str
    shards: list[Path] = field(default_factory=list)
    meta: list[Path] = field(default_factory=list)
    starts: list[tuple[str, int | None]] = field(default_factory=list)


def _shard_order(f: Path) -> tuple[int, str]:
    m = SHARD_RE.match(f.name)
    return (int(m["shard"]) if m else 0, str(f))


def _first_step(shards: list[Path]) -> int | None:
    for f in shards:
        obj = first_object(f)
        if obj is not None:
            return as_step(obj.get("step"))
    return None


def _by_name(p: Path) -> dict[str, dict[str, list[Path]]]:
    out: dict[str, dict[str, list[Path]]] = {}
    for f in visible_files(p):
        m = SHARD_RE.match(f.name)
        kind = "shards"
        if not m:
            m, kind = META_RE.match(f.name), "meta"
        if m:
            out.setdefault(m["run"], {"shards": [], "meta": []})[kind].append(f)
    return {r: v for r, v in out.items() if v["shards"]}


def layout(p: Path) -> dict[str, RunFiles]:
    """The runs at ``p`` (a save-path folder; a sub-folder is another save path), by name; a
    shard path: its own start only."""
    p = Path(p)
    if p.is_file():
        m = SHARD_RE.match(p.name)
        if not m:
            return {}
        meta = p.with_name(f"{m['run']}_metadata.jsonl")
        return {m["run"]: RunFiles(m["run"], [p], [meta] if meta.is_file() else [], [(m["run"], None)])}
    found = _by_name(p)
    chains: dict[tuple[str, str], RunFiles] = {}
    runs: dict[str, RunFiles] = {}

    def order(name: str) -> tuple[int, str]:
        m = RUN_NAME_RE.match(name)
        return (int(m["t"]) if m else 0, name)

    for name in sorted(found, key=order):
        shards = sorted(found[name]["shards"], key=_shard_order)
        m = RUN_NAME_RE.match(name)
        key = (m["exp"], m["seed"]) if m else None
        chain = chains.get(key) if key else None
        first = _first_step(shards) if chain is not None else None  # read only where it decides
        if chain is not None and first is not None and first > 0:
            chain.shards += shards
            chain.meta += found[name]["meta"]
            chain.starts.append((name, first))
            continue
        run = RunFiles(name, shards, list(found[name]["meta"]), [(name, first)])
        runs[name] = run
        if key:
            chains[key] = run
    return dict(sorted(runs.items()))


def resolve(runs: dict[str, RunFiles], name: str) -> RunFiles | None:
    """The run that ``name`` is (the first start's name) or is a resumed start of."""
    if name in runs:
        return runs[name]
    return next((r for r in runs.values() if any(s == name for s, _ in r.starts)), None)
