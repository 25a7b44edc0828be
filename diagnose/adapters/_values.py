"""Coercion of JSON values: numbers and step numbers."""

from __future__ import annotations

import math
from typing import Any


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
    """A JSON value as a step number (non-negative int; integral floats accepted), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    if isinstance(v, int) and v >= 0:
        return v
    return None
