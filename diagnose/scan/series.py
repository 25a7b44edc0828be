"""A signal as numpy arrays: its finite values and the steps they belong to, in step order.

Everything that reads a signal's values (the episode detection, the figures, the reports'
numbers) reads them here, as ``(steps, values)``: x before y, as a plot takes them.

    steps, values = finite_series(result.signals, "reward")
    table = SignalTable(result.signals)      # many series of one table: converted once
    steps, values = table.series("entropy")
"""

from __future__ import annotations

import numpy as np
import polars as pl

__all__ = ["SignalTable", "finite_series", "level", "smoothed_peak", "window_median"]

_EMPTY_STEPS = np.empty(0, dtype=np.int64)


def _finite(steps: np.ndarray, values: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    v = values.cast(pl.Float64).to_numpy()
    ok = np.isfinite(v)
    return steps[ok], v[ok]


class SignalTable:
    """The signals of a run sorted by step, each series converted to numpy once (the episode
    detection reads every signal several times)."""

    def __init__(self, signals: pl.DataFrame):
        self.frame = signals.sort("step") if "step" in signals.columns else signals
        self.columns = list(self.frame.columns)
        self.steps = (self.frame.get_column("step").cast(pl.Int64).to_numpy() if "step" in self.columns
                      else _EMPTY_STEPS)
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the signal's finite values; empty when the table lacks it."""
        if name not in self._cache:
            if name == "step" or name not in self.columns or "step" not in self.columns:
                self._cache[name] = (_EMPTY_STEPS, np.empty(0))
            else:
                self._cache[name] = _finite(self.steps, self.frame.get_column(name))
        return self._cache[name]


def finite_series(signals: pl.DataFrame | SignalTable, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a signal's finite values, sorted by step."""
    if isinstance(signals, SignalTable):
        return signals.series(name)
    if name == "step" or name not in signals.columns or "step" not in signals.columns:
        return _EMPTY_STEPS, np.empty(0)
    df = signals.select("step", name).sort("step")
    return _finite(df.get_column("step").to_numpy(), df.get_column(name))


def window_median(steps: np.ndarray, values: np.ndarray, lo: float, hi: float) -> float:
    """Median of the values at steps ``lo..hi`` (inclusive); NaN when there are none."""
    m = (steps >= lo) & (steps <= hi)
    return float(np.median(values[m])) if m.any() else float("nan")


def level(signals: pl.DataFrame, name: str, where: str, n: int = 5) -> float | None:
    """Median of the first / last ``n`` finite values (``where``: ``start`` | ``end``)."""
    _, v = finite_series(signals, name)
    if v.size == 0:
        return None
    part = v[:n] if where == "start" else v[-n:]
    return float(np.median(part))


def smoothed_peak(signals: pl.DataFrame, name: str, n: int = 5) -> float | None:
    """Max of the trailing ``n``-step medians (a peak that one lucky step cannot make)."""
    _, v = finite_series(signals, name)
    if v.size == 0:
        return None
    w = min(n, v.size)
    return float(max(np.median(v[max(0, i - w + 1): i + 1]) for i in range(w - 1, v.size)))
