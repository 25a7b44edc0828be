"""One line for an exception, the way every message shown to users words it.

A leaf module (imports nothing), so the light analysis core can use it without the CLI's typer and
rich; `diagnose.cli_errors`, the error policy, re-exports it.
"""

from __future__ import annotations

__all__ = ["error_line"]


def error_line(e: BaseException, limit: int | None = 300) -> str:
    """``Type: first line of the message``, or the type alone when the message is empty; the
    message cut to ``limit`` characters (None: not cut). Tracebacks and the rest of a multi-line
    message (a pyarrow or transformers error can run to pages) stay out of the line."""
    lines = str(e).strip().splitlines()
    head = lines[0][:limit] if lines else ""
    return f"{type(e).__name__}: {head}" if head else type(e).__name__
