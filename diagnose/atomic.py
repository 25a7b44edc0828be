"""Atomic file writers: write to a temp file in the same directory, fsync, ``os.replace``.

Every file the project writes goes through this module, so a reader never sees a
half-written file under its final name: after a crash (even ``SIGKILL``) a path
holds either the complete old content, the complete new content, or does not
exist.  What can be left behind is a temp file named ``.<name>.<random>.tmp``
in the same directory; readers must ignore dot-files / ``*.tmp`` files.

Functions:

* :func:`atomic_path` - context manager yielding a temp path to write to (for
  libraries that want a path, e.g. ``DataFrame.write_parquet``).
* :func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_write_json`.
* :func:`atomic_dir` - same idea for a whole directory (e.g. a checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "is_temp_name",
    "temp_path_for",
]

TMP_SUFFIX = ".tmp"


def temp_path_for(path: str | os.PathLike[str]) -> Path:
    """A fresh temp path next to ``path``: ``<dir>/.<name>.<random>.tmp``."""
    path = Path(path)
    return path.parent / f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}"


def is_temp_name(name: str) -> bool:
    """True for names this module uses for temp files/dirs (readers skip them)."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable (best effort; no-op on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    with suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path in ``path``'s directory; on success it replaces ``path`` atomically.

    The body must create the file at the yielded path.  On normal exit the temp
    file is fsync'ed and ``os.replace``'d onto ``path`` (and the directory is
    fsync'ed); if the body raises, the temp file is removed and the exception
    propagates.  Parent directories are created.

    >>> with atomic_path("out/table.parquet") as tmp:      # doctest: +SKIP
    ...     df.write_parquet(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(
                f"atomic_path({str(path)!r}): the body did not create the temp file {str(tmp)!r}"
            )
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    if fsync:
        _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + ``os.replace``). Returns the path."""
    path = Path(path)
    with atomic_path(path, fsync=False) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    if fsync:
        _fsync_dir(path.parent)
    return path


def atomic_write_text(
    path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", fsync: bool = True
) -> Path:
    """Write ``text`` to ``path`` atomically. Returns the path."""
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


def _json_default(obj: Any) -> Any:
    """Fallback encoder: paths, enums, numpy/torch scalars and arrays, dataclasses, sets."""
    import dataclasses
    import enum

    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if hasattr(obj, "tolist"):  # numpy arrays/scalars, torch tensors
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def _sanitize_nonfinite(obj: Any) -> Any:
    """Replace non-finite floats by the strings "nan" / "inf" / "-inf" (strict JSON has no NaN)."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _sanitize_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize_nonfinite(v) for v in obj]
    return obj


def atomic_write_json(
    path: str | os.PathLike[str],
    obj: Any,
    *,
    indent: int | None = 2,
    sort_keys: bool = False,
    fsync: bool = True,
) -> Path:
    """Write ``obj`` as strict JSON (UTF-8, trailing newline) to ``path`` atomically.

    Non-JSON values are converted (paths -> str, enums -> value, numpy/torch ->
    lists/scalars, dataclasses -> dicts, anything else -> ``str``); non-finite
    floats become the strings ``"nan"``, ``"inf"``, ``"-inf"`` so the file is
    valid JSON for every parser.  Returns the path.
    """
    # Round-trip through the default encoder first so that converted values
    # (e.g. numpy floats holding NaN) are sanitized too.
    plain = json.loads(json.dumps(obj, default=_json_default, allow_nan=True))
    text = json.dumps(
        _sanitize_nonfinite(plain), indent=indent, sort_keys=sort_keys, ensure_ascii=False,
        allow_nan=False,
    )
    return atomic_write_text(path, text + "\n", fsync=fsync)


@contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory next to ``path``; on success it is renamed to ``path``.

    Readers therefore only ever see a complete directory under its final name.
    If ``path`` already exists: with ``overwrite=False`` a ``FileExistsError`` is
    raised up front; with ``overwrite=True`` the old directory is moved aside and
    deleted after the new one is in place (there is a short window in which
    ``path`` does not exist, but never one in which it is incomplete).
    On failure the temp directory is removed.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                _fsync_file(child)
        old: Path | None = None
        if path.exists():
            old = temp_path_for(path)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            _remove(old)
    except BaseException:
        _remove(tmp)
        raise
