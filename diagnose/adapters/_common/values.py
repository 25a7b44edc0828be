"""Coercion of JSON values: numbers and step numbers."""

from __future__ import annotations

import math
from typing import Any

from diagnose.rundir.schema import step_value


def as_float(v: Any) -> float | None:
    """A JSON scalar as float (bools as 0/1), else None."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        try:
            return float(v)
        except OverflowError:
            return math.inf if v > 0 else -math.inf
    return None


def as_step(v: Any) -> int | None:
    """A JSON value as a step number (int or integral float in 0..2^63-1), else None
    (`diagnose.rundir.schema.step_value`, the one check)."""
    return step_value(v)
