"""One usage-line style for the `diagnose` and `train-minimal` commands.

Typer writes a required argument as ``{RUN}`` on the usage line, which reads like a format
placeholder left unfilled; the convention users know from click, git or pip is ``RUN`` (required)
and ``[RUN]`` (optional). ``PlainUsageCommand`` is given to every command as ``cls``.
"""

from __future__ import annotations

import typer
from typer.core import TyperCommand


class PlainUsageCommand(TyperCommand):
    """A typer command whose usage line shows required arguments as ``RUN``, not ``{RUN}``."""

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in super().collect_usage_pieces(ctx)]
