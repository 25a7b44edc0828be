"""Helper for the kill test in tests/test_rundir.py (not a test module).

Usage: python tests/_kill_writer.py RUN_DIR N_ROWS

Writes token step files (and a metrics line per step) in an endless loop until it is
killed.  The content of every step is a deterministic function of the step (see
``expected_tokens``), so the test can verify each surviving file exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diagnose.rundir import RunWriter  # noqa: E402

CONTROL_TOKENS = [
    {"name": "im_end", "text": "<|im_end|>", "token_id": 2, "role": "turn_end"},
    {"name": "tool_call", "text": "<tool_call>", "token_id": 3, "role": "call_open"},
]
SAMPLE_LEN = 1000


def expected_tokens(step: int, n_rows: int) -> dict[str, np.ndarray]:
    """The arrays written for ``step`` (numpy, straight to write_tokens)."""
    rng = np.random.default_rng(step)  # random (incompressible) so files are large
    idx = np.arange(n_rows, dtype=np.int64)
    position = idx % SAMPLE_LEN
    logprob = -rng.exponential(size=n_rows).astype(np.float32)
    logprob[position == 5] = np.nan
    return {
        "sample_id": idx // SAMPLE_LEN,
        "turn": (position // 250).astype(np.int64),
        "position": position,
        "token_id": rng.integers(0, 50_000, n_rows),
        "logprob": logprob,
        "sampler_logprob": logprob + rng.normal(0, 0.01, n_rows).astype(np.float32),
        "entropy": rng.random(n_rows, dtype=np.float32),
        "is_generated": (position % 3) != 0,
        "lp_ctrl": rng.normal(-5, 1, (n_rows, 2)).astype(np.float32),
    }


def main() -> None:
    run_dir, n_rows = sys.argv[1], int(sys.argv[2])
    w = RunWriter(
        run_dir, config={"kill_test": True}, model={"name": "none"}, tokenizer={},
        control_tokens=CONTROL_TOKENS, seeds={"seed": 0},
    )
    step = 0
    while True:
        w.write_tokens(step, expected_tokens(step, n_rows))
        w.log_metrics(step, {"reward": float(step), "kl": float("nan")})
        step += 1


if __name__ == "__main__":
    main()
