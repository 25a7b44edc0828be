"""Synthetic runs with known ground truth, for tests and benchmarks.

``native``: runs in our run-directory format v1 (:func:`write_synthetic_run`).
"""

from diagnose.synth.native import SyntheticTruth, write_synthetic_run

__all__ = ["SyntheticTruth", "write_synthetic_run"]
