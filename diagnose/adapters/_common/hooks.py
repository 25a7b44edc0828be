"""The optional `diagnose.adapters.Adapter` hooks' defaults, for a format whose path is always
one run (native, conversations: ``from ... import run_alias, runs``), and `the_run`, with which
the ``load`` of a format whose folders hold several runs reads the one `load_run` chose.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def runs(path: Path) -> list[str]:
    """No runs to choose from: ``path`` is one run."""
    return []


def run_alias(path: Path, name: str) -> str:
    """No other names: a run is named by its own name only."""
    return name


def the_run(found: Mapping[str, T], name: str | None) -> T | None:
    """The run ``name`` of ``found`` (as `load_run` chose it), or without a name the only one
    (None when there is none). Choosing among several is `load_run`'s (`choose_run`), never a
    format's: several runs and no name is a caller's error."""
    if name is not None:
        return found[name]
    if len(found) > 1:
        raise ValueError(f"{len(found)} runs here ({', '.join(found)}): load_run(..., run=NAME) chooses one")
    return next(iter(found.values()), None)
