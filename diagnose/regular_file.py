"""User files are read only when they are regular files: a named pipe, a socket or a device
(in a run folder, a model folder, or given as an input) is named, never opened for reading.

Why: opening a FIFO for reading blocks until a writer comes (forever, for a pipe nobody
writes), and a character device can stream without end, so one ``mkfifo metrics.jsonl`` hung the
scan. Every reader of user input goes through here: `not_regular` before a library opens a path
itself (polars, pyarrow, safetensors, transformers), `open_regular` / `read_bytes` where we open
it ourselves (which cannot block: the file is opened ``O_NONBLOCK`` and checked with ``fstat``
before a byte is read, so a file swapped for a pipe after the check is refused too); a folder
listing that keeps regular files names the other entries with `not_regular` rather than
dropping them (`diagnose.adapters._common.io.unreachable`, the run-directory reader).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import IO, Any

__all__ = [
    "DIRECTORY",
    "NotRegularFile",
    "check_regular",
    "kind_of",
    "not_regular",
    "open_regular",
    "read_bytes",
    "read_text",
]

#: What a non-regular file is, by its ``stat`` type, as messages say it.
_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


#: `not_regular`'s answer for a directory.
DIRECTORY = "a directory, not a file"


class NotRegularFile(OSError):
    """``path`` is not a regular file (a pipe, socket, device or directory). An `OSError`, so every
    reader's ``except OSError`` names it; ``str()`` is the reason alone (callers add the path)."""

    def __init__(self, path: str | os.PathLike[str], why: str, code: int = errno.EINVAL) -> None:
        super().__init__(code, why, str(path))

    def __str__(self) -> str:
        return str(self.strerror)


def kind_of(mode: int) -> str | None:
    """``"a named pipe (FIFO)"``, ``"a socket"``, ... for a ``st_mode`` that is neither a regular
    file nor a directory; None for those two."""
    return next((what for test, what in _KINDS if test(mode)), None)


def _why(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return DIRECTORY
    return f"{kind_of(mode) or 'a special file'}, not a regular file"


def not_regular(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a regular file that can be opened (``"no such file"``, ``"broken
    symlink or symlink loop"``, ``"a directory, not a file"``, ``"a named pipe (FIFO), not a
    regular file"``, ...); None when it is one. Looks at the path only (``stat``), never opens
    it. Callers add what follows (``; not read``, ``; file skipped``)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "broken symlink or symlink loop" if os.path.islink(path) else "no such file"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "broken symlink or symlink loop"
        return f"cannot stat ({e.strerror or e})"
    except ValueError as e:  # a NUL in the name
        return f"not a valid path ({e})"
    return _why(st.st_mode)


def check_regular(path: str | os.PathLike[str]) -> None:
    """Raise `NotRegularFile` (an `OSError`) naming why ``path`` is not a regular file; a missing
    file raises `FileNotFoundError`. For a library that opens the path itself."""
    why = not_regular(path)
    if why is None:
        return
    if why == "no such file":
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
    code = errno.EISDIR if why == DIRECTORY else errno.ELOOP if "symlink" in why else errno.EINVAL
    raise NotRegularFile(path, why, code)


def open_regular(path: str | os.PathLike[str], mode: str = "rb", **kwargs: Any) -> IO[Any]:
    """``open(path, mode)`` for reading, refusing anything but a regular file without blocking on
    it (`NotRegularFile`); other failures raise the usual `OSError`."""
    if any(c in mode for c in "wax+"):
        raise ValueError(f"open_regular reads; got mode {mode!r}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:  # a socket cannot be opened at all (ENXIO): say what it is, not the errno
        why = not_regular(path) if e.errno == errno.ENXIO else None
        if why is not None and why != DIRECTORY:
            raise NotRegularFile(path, why) from None
        raise
    try:
        why = _why(os.fstat(fd).st_mode)
        if why is not None:
            raise NotRegularFile(path, why, errno.EISDIR if why == DIRECTORY else errno.EINVAL)
        os.set_blocking(fd, True)
        return open(fd, mode, closefd=True, **kwargs)  # noqa: SIM115 - the caller closes it
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a regular file (`open_regular`)."""
    with open_regular(path, "rb") as f:
        return f.read()


def read_text(path: str | os.PathLike[str], encoding: str = "utf-8") -> str:
    """The text of a regular file (`open_regular`; decoding errors raise `UnicodeDecodeError`)."""
    return read_bytes(path).decode(encoding)
