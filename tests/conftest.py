"""Shared fixtures. Keep minimal."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default model (default corpus, vocab, size and seed), built once per test
    session into a temporary directory. Read-only for tests: copy it before modifying."""
    from diagnose.model.build import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def probe_models(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Checkpoints of known capability for the capability-probe tests, built once per session
    (tests/_capability_models.py; about 10 s on 2 CPU cores): ``random`` (the untrained embedded
    default), ``healthy`` (a small model overfitted on the first 4 ``test`` tasks) and
    ``collapsed`` (healthy, then taught to end the turn right after ``<tool_call>\\n``); ``tasks``:
    those 4 tasks; ``build``: what each build took. Read-only for tests."""
    from _capability_models import build_collapsed, build_healthy

    from diagnose.tasks import make_tasks

    root = tmp_path_factory.mktemp("probe_models")
    tasks = make_tasks("test", 4)
    healthy = build_healthy(tiny_model_dir, root / "healthy", tasks)
    collapsed = build_collapsed(root / "healthy", root / "collapsed", tasks)
    return {"random": tiny_model_dir, "healthy": root / "healthy", "collapsed": root / "collapsed",
            "tasks": tasks, "build": {"healthy": healthy, "collapsed": collapsed}}


#: the launch folders of `tracker_runs`: name -> (case of tests/fixtures/tracker_runs.py, collapse step)
TRACKER_CASES: dict[str, tuple[str, int | None]] = {
    "trl_collapse": ("trl", 15), "trl_stable": ("trl", None),
    "trl_default": ("trl_default", 15),
    "verl_collapse": ("verl", 15), "verl_stable": ("verl", None),
    "oi_collapse": ("open_instruct", 15), "oi_stable": ("open_instruct", None),
    "trl_tools_crash": ("trl_tools_crash", 15),
}


@pytest.fixture(scope="session")
def tracker_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Launch folders written offline by the trackers' own code (wandb's SDK driven by transformers'
    callbacks, verl's ``Tracking`` and open-instruct's calls; torch's ``SummaryWriter``; the console
    tee'd to ``train.log``), 30 steps each, built once per session (tests/fixtures/tracker_runs.py).
    Read-only for tests: copy one before changing it. ``DIAGNOSE_TRACKER_RUNS=DIR`` keeps them in DIR
    and reuses them in later sessions (delete DIR after changing the writers)."""
    import importlib.util

    from fixtures.tracker_runs import write_cases

    for module in ("wandb", "tensorboard", "verl", "orjson"):  # verl: only found (its __init__ imports Ray)
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (the [trackers] extra; verl: pip install --no-deps verl)")

    keep = os.environ.get("DIAGNOSE_TRACKER_RUNS")
    if keep and all((Path(keep) / name / "train.log").is_file() for name in TRACKER_CASES):
        return {name: Path(keep) / name for name in TRACKER_CASES}
    root = Path(keep) if keep else tmp_path_factory.mktemp("tracker_runs")
    if keep:
        shutil.rmtree(root, ignore_errors=True)
    return write_cases(root, {name: {"case": case, "collapse_at": at} for name, (case, at) in TRACKER_CASES.items()})
