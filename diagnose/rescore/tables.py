"""Where `diagnose rescore` keeps its tables, what they are keyed on, and how a scan uses them.

Torch-free: `diagnose scan` calls `attach_rescored` on every run it loads.

    <run>/.diagnose/rescore/                # or $DIAGNOSE_HOME/rescore/<hash>/ for a read-only run
    ├── manifest.json                       # keys, the fixed probe set, one entry per finished checkpoint
    ├── probe/step-NNNNNN.parquet           # measure 1 at checkpoint step N (run-format probe table)
    └── tokens/step-NNNNNN.parquet          # measure 2: the rollouts of step M re-scored (tokens table)

Every table is written atomically before the manifest entry that lists it, and readers read only
the tables the manifest lists: a rescore killed midway leaves the finished checkpoints and no
partial table. The manifest lists its tables' stats, and `attach_rescored` puts the manifest and
the tables in the run's fingerprint, so the scan cache notices a new rescore.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl

from diagnose.atomic import atomic_path, atomic_write_json
from diagnose.regular_file import not_regular, read_text
from diagnose.scan.cache import cache_dir_candidates, run_root, abs_path
from diagnose.source import RunSource

__all__ = ["MANIFEST", "RESCORE_VERSION", "RescoreStore", "attach_rescored", "rescore_dirs"]

#: Layout and meaning of the rescore tables; a change recomputes every checkpoint.
RESCORE_VERSION = 1
MANIFEST = "manifest.json"
SUBDIR = "rescore"


def rescore_dirs(run: str | os.PathLike[str]) -> list[Path]:
    """Where a run's rescore tables may live, in lookup order: beside the scan cache inside the
    run (``<run>/.diagnose/rescore``), then the home cache (``.../rescore/<hash>``), as
    `diagnose.scan.cache.cache_dir_candidates` places the scan cache."""
    out = []
    for c in cache_dir_candidates(run):
        out.append(c.parent / SUBDIR if c.name == "scan" else c.parent.parent / SUBDIR / c.name)
    return out


def file_stat(path: Path) -> list[int]:
    try:
        st = path.stat()
    except OSError:
        return [-1, -1]
    return [st.st_size, st.st_mtime_ns]


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


class RescoreStore:
    """The rescore directory of one run: the manifest and the per-checkpoint tables."""

    def __init__(self, run: str | os.PathLike[str], directory: Path | None = None):
        self.root = run_root(abs_path(run))
        self.dir = directory or self._find() or self._writable()
        self.manifest: dict[str, Any] = self._read(self.dir) or {}

    @staticmethod
    def _read(d: Path) -> dict[str, Any] | None:
        try:
            man = json.loads(read_text(d / MANIFEST))
        except (OSError, ValueError):
            return None
        if not isinstance(man, dict) or man.get("version") != RESCORE_VERSION:
            return None
        return man

    def _find(self) -> Path | None:
        for d in rescore_dirs(self.root):
            if self._read(d) is not None:
                return d
        return None

    def _writable(self) -> Path:
        dirs = rescore_dirs(self.root)
        for d in dirs:
            try:
                d.mkdir(parents=True, exist_ok=True)
                probe = d / f".write-test-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
                return d
            except OSError:
                continue
        return dirs[-1]

    # ---- keys -------------------------------------------------------------------------------

    def reset_if(self, global_key: dict[str, Any]) -> bool:
        """Drop every entry when the run-wide key (version, tokenizer, samples, probe set)
        changed; True if they were dropped."""
        if self.manifest.get("global_key") == global_key:
            return False
        dropped = bool(self.manifest.get("checkpoints"))
        self.manifest = {"version": RESCORE_VERSION, "global_key": global_key, "checkpoints": {}}
        return dropped

    def entry(self, name: str, key: dict[str, Any]) -> dict[str, Any] | None:
        """The finished entry of checkpoint ``name`` if its key matches and its tables are intact."""
        e = (self.manifest.get("checkpoints") or {}).get(name)
        if not isinstance(e, dict) or e.get("key") != key:
            return None
        for rel, st in (e.get("files") or {}).items():
            if file_stat(self.dir / rel) != st:
                return None
        return e

    # ---- writing ----------------------------------------------------------------------------

    def write_table(self, kind: str, step: int, frame: pl.DataFrame) -> str:
        from diagnose.rundir.schema import step_filename

        rel = f"{kind}/{step_filename(step)}"
        with atomic_path(self.dir / rel) as tmp:
            frame.write_parquet(tmp, compression="zstd", statistics=True)
        return rel

    def commit(self, name: str, entry: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        """Record a finished checkpoint (after its tables are written) and rewrite the manifest."""
        entry = dict(entry)
        entry["files"] = {rel: file_stat(self.dir / rel) for rel in entry.get("tables", {}).values() if rel}
        cps = dict(self.manifest.get("checkpoints") or {})
        cps[name] = entry
        self.manifest["checkpoints"] = cps
        self.manifest.update(extra or {})
        self.manifest["written"] = datetime.now(timezone.utc).isoformat()
        atomic_write_json(self.dir / MANIFEST, self.manifest)

    def drop(self, names: list[str]) -> None:
        cps = {k: v for k, v in (self.manifest.get("checkpoints") or {}).items() if k not in names}
        self.manifest["checkpoints"] = cps
        if self.dir.is_dir():
            atomic_write_json(self.dir / MANIFEST, self.manifest)

    # ---- reading ----------------------------------------------------------------------------

    def entries(self) -> list[dict[str, Any]]:
        """Finished entries in step order, each whose tables are intact."""
        out = []
        for name, e in (self.manifest.get("checkpoints") or {}).items():
            if not isinstance(e, dict):
                continue
            if all(file_stat(self.dir / rel) == st for rel, st in (e.get("files") or {}).items()):
                out.append({**e, "name": name})
        return sorted(out, key=lambda e: (e.get("step") is None, e.get("step") or 0))

    def tables(self, kind: str) -> list[Path]:
        rels = sorted({e["tables"][kind] for e in self.entries() if (e.get("tables") or {}).get(kind)})
        return [self.dir / r for r in rels if not_regular(self.dir / r) is None]  # a pipe is never scanned


def _steps_text(steps: list[int]) -> str:
    if len(steps) <= 6:
        return ", ".join(map(str, steps))
    return f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"


def attach_rescored(src: RunSource) -> RunSource:
    """``src`` with the rescored tables of its run filling ``probe`` / ``tokens`` where the adapter
    had none (and the control tokens they were scored for), a note naming the source, and the
    rescore manifest and tables in its fingerprint (so the scan cache is invalidated when they
    change, or appear). A run never rescored comes back unchanged but for the fingerprint."""
    try:
        dirs = rescore_dirs(src.path)
    except OSError:
        return src
    fp = dict(src.fingerprint())
    files = dict(fp.get("files") or {})
    for d in dirs:
        files[str(d / MANIFEST)] = file_stat(d / MANIFEST)
    store = None
    for d in dirs:
        if RescoreStore._read(d) is not None:
            store = RescoreStore(src.path, d)
            break
    changes: dict[str, Any] = {}
    if store is not None:
        entries = store.entries()
        for e in entries:
            for rel in (e.get("files") or {}):
                files[str(store.dir / rel)] = file_stat(store.dir / rel)
        used = []
        probe_files, token_files = store.tables("probe"), store.tables("tokens")
        if src.probe is None and probe_files:
            changes["probe"] = pl.scan_parquet(probe_files)
            used.append(f"fixed probe on {len(store.manifest.get('probe_set') or [])} early healthy rollouts")
        if src.tokens is None and token_files:
            changes["tokens"] = pl.scan_parquet(token_files)
            tsteps = sorted(e["rollout_step"] for e in entries if e.get("rollout_step") is not None
                            and (e.get("tables") or {}).get("tokens"))
            used.append(f"rollout tokens re-scored at steps {_steps_text(tsteps)}")
        if used:
            if not src.control_tokens:
                changes["control_tokens"] = list(store.manifest.get("control_tokens") or [])
            steps = [e["step"] for e in entries if e.get("step") is not None]
            # the adapter's "no token probabilities / no control-token signals" is no longer true
            stale = ("no control-token signals", "no token probabilities")
            notes = [n for n in src.notes if not any(x in n for x in stale)] if "tokens" in changes else list(src.notes)
            notes.append(f"control-token signals rescored from checkpoints ({len(entries)} checkpoints, steps "
                         f"{_steps_text(steps)}; `diagnose rescore`, tables in {store.dir}): " + "; ".join(used))
            changes["notes"] = notes
    changes["_fingerprint"] = {**fp, "files": files}
    return dataclasses.replace(src, **changes)
