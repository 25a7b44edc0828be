"""Helpers shared by the scan tests."""

import pytest

from diagnose.rundir import RunReader
from diagnose.source import RunSource


def source(path) -> RunSource:
    """A native run's source, read directly with the run reader (no adapter)."""
    r = RunReader(path)
    return RunSource(r.run_dir, "native", r.metrics().lazy(), r.rollouts(), r.tokens(), r.probe(), r.control_tokens)


def json_close(a, b, path="") -> None:
    """Recursive equality of two scan JSONs, floats to 1e-9 relative (polars' parallel sums
    differ in the last bits between runs), lists of signal entries compared in signal order
    (moves of exactly equal strength may come in either order)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            json_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        if a and all(isinstance(x, dict) and "signal" in x for x in a + b):
            a, b = sorted(a, key=lambda x: x["signal"]), sorted(b, key=lambda x: x["signal"])
        for i, (x, y) in enumerate(zip(a, b)):
            json_close(x, y, f"{path}[{i}]")
    else:
        assert a == b, path
