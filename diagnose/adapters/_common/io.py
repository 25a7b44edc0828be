"""Reading what is on disk: file and folder listing, the first JSONL object of a file, and
cheap parquet validation/reading (a truncated file fails on its footer, not mid-read).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from diagnose.jsonl import iter_jsonl


def _entries(directory: Path, *, dirs: bool) -> list[Path]:
    """Sorted plain files (``dirs=False``, temp files skipped) or sub-directories of
    ``directory``, without dot entries; [] if unreadable."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return []
    out = []
    for e in entries:
        if e.name.startswith(".") or (not dirs and e.name.endswith(".tmp")):
            continue
        try:
            if e.is_dir() if dirs else e.is_file():
                out.append(Path(e.path))
        except OSError:
            continue
    return out


def visible_files(directory: Path) -> list[Path]:
    """Plain files in ``directory`` (sorted), without dot/temp files; [] if unreadable."""
    return _entries(directory, dirs=False)


def subdirs(directory: Path) -> list[Path]:
    """Sub-directories of ``directory`` (sorted), without dot directories; [] if unreadable."""
    return _entries(directory, dirs=True)


def unreachable(root: Path, depth: int = 3, limit: int = 20_000) -> list[tuple[Path, str]]:
    """``(path, why)`` of what under ``root`` cannot be read (``depth`` levels, dot entries
    skipped, at most ``limit`` entries looked at): symlinks that lead nowhere (broken, a loop),
    regular files and folders the user may not read. The listings above skip them silently, so
    the adapters' sources name them through this (``load_run``). Files are opened, never read."""
    out: list[tuple[Path, str]] = []
    todo, seen = [(root, 0)], 0
    while todo and seen < limit:
        d, level = todo.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            if d != root:
                out.append((d, f"unreadable folder: {e.strerror or e}; not read"))
            continue
        for e in entries:
            seen += 1
            if e.name.startswith("."):
                continue
            try:
                if e.is_symlink():
                    if not os.path.exists(e.path):
                        out.append((Path(e.path), "broken symlink or symlink loop; not read"))
                elif e.is_dir(follow_symlinks=False):
                    if level + 1 < depth:
                        todo.append((Path(e.path), level + 1))
                elif e.is_file(follow_symlinks=False):
                    with open(e.path, "rb"):
                        pass
            except OSError as err:
                out.append((Path(e.path), f"unreadable: {err.strerror or err}; not read"))
    return sorted(out)


def first_object(path: Path, max_lines: int = 20) -> dict[str, Any] | None:
    """The first good JSON-object line of a JSONL file (looking at ``max_lines`` lines at most)."""
    try:
        for n, (_, obj) in enumerate(iter_jsonl(path, max_line_bytes=8 * 1024 * 1024)):
            if isinstance(obj, dict):
                return obj
            if n + 1 >= max_lines:
                return None
    except OSError:
        return None
    return None


def check_parquet(path: Path) -> tuple[pl.Schema | None, str | None]:
    """Cheap validation of a parquet file (footer, column-chunk bounds): ``(schema, None)`` or
    ``(None, why it is unreadable)``; the one check, `diagnose.parquet_check`."""
    from diagnose.parquet_check import check_parquet as check

    footer, why = check(path)
    return (footer.schema if footer is not None else None), why


def read_parquet(path: Path, columns: Sequence[str] | None = None) -> tuple[pl.DataFrame | None, str | None]:
    """Read a (pre-checked) parquet file; ``(None, why)`` if the data pages turn out corrupt."""
    try:
        return pl.read_parquet(path, columns=list(columns) if columns is not None else None), None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001
        return None, f"unreadable parquet data: {_short(e)}"


def _short(e: BaseException, n: int = 200) -> str:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) <= n else s[: n - 3] + "..."
