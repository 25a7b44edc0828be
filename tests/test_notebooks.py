"""The notebooks run top to bottom, unattended, with nbclient: on their embedded synthetic demo
runs (no environment variable), and pointed at generated runs through DIAGNOSE_RUN /
DIAGNOSE_RUNS (a text-only adapter run included). They are stored without outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install -e '.[dev]')")

from diagnose.synth import write_synthetic_run  # noqa: E402
from diagnose.synth.foreign import write_trl_run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT = 180


def execute(name: str, cwd: Path, monkeypatch: pytest.MonkeyPatch, **env: str):
    """Run a notebook in a fresh python3 kernel; returns the executed notebook."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("PLOTLY_RENDERER", "json")  # small outputs: figures as JSON, not embedded plotly.js
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    for k in ("DIAGNOSE_RUN", "DIAGNOSE_RUNS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def output_text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if "text" in o:
                out.append(o["text"])
            for v in o.get("data", {}).values():
                out.append(v if isinstance(v, str) else json.dumps(v)[:2000])
    return "\n".join(out)


def test_notebooks_are_stored_without_outputs():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == ["collapse_episode.ipynb", "compare_supervision.ipynb"]
    for name in names:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, name
            # no copied analysis code: the notebooks import diagnose
        src = "\n".join(c.source for c in nb.cells)
        assert "from diagnose" in src and "import dashboards" not in src


def test_collapse_episode_on_the_demo_run(tmp_path, monkeypatch):
    nb = execute("collapse_episode.ipynb", tmp_path, monkeypatch)
    text = output_text(nb)
    assert "SYNTHETIC demo run" in text
    assert "COLLAPSE at step" in text
    assert "implicated: <|im_end|>" in text
    assert "of them ending a collapsed turn" in text
    assert "not probed yet" in text


def test_collapse_episode_on_a_text_only_run(tmp_path, monkeypatch):
    trl = write_trl_run(tmp_path / "trl", steps=30, collapse_at=18).path  # no token probabilities
    text = output_text(execute("collapse_episode.ipynb", tmp_path, monkeypatch, DIAGNOSE_RUN=str(trl)))
    assert "SYNTHETIC demo run" not in text
    assert "no token traces with control tokens in this run" in text or "no collapse episode" in text
    assert "not probed yet" in text


def test_compare_supervision_on_the_demo_runs(tmp_path, monkeypatch):
    nb = execute("compare_supervision.ipynb", tmp_path, monkeypatch)
    text = output_text(nb)
    assert "SYNTHETIC stand-in runs" in text
    assert "synthetic-no-supervision: COLLAPSE" in text and "synthetic-stable: HEALTHY" in text


def test_compare_supervision_on_given_runs(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    write_synthetic_run(a, steps=40, collapse_at=22, samples_per_step=16, tokens_per_sample=48)
    write_synthetic_run(b, steps=40, collapse_at=None, samples_per_step=16, tokens_per_sample=48, seed=1)
    text = output_text(execute("compare_supervision.ipynb", tmp_path, monkeypatch,
                               DIAGNOSE_RUNS=os.pathsep.join([str(a), str(b)])))
    assert "SYNTHETIC stand-in" not in text and "a: COLLAPSE" in text and "b: HEALTHY" in text
