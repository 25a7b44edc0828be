"""Bad input to the dashboard: its data layer (dashboards/data.py: discovery, path checks,
loaders) and one page under AppTest with model text holding HTML / JS. The dashboard never
reads or shows anything from outside its runs root, never raises, and modifies no input.
Table: docs/reliability.md."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import polars as pl
import pytest
from _bad_input import HTML_PAYLOAD, copy_run, cut_half, garbage, step_file, tree_hashes, write_base_run

pytest.importorskip("streamlit")
from dashboards import data  # noqa: E402


pytestmark = pytest.mark.usefixtures("diagnose_home")  # tests/conftest.py


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    return write_base_run(tmp_path_factory.mktemp("bad_dash"))


@pytest.fixture
def world(tmp_path: Path, base_run: Path) -> dict[str, Path]:
    """``outside/secret`` (a run and a file outside the root) and ``root/`` with one good run."""
    outside = tmp_path / "outside"
    copy_run(base_run, outside, "secret")
    (outside / "passwd").write_text("root:x:0:0\n")
    root = tmp_path / "root"
    copy_run(base_run, root, "good")
    return {"outside": outside, "root": root}


def rels(root: Path) -> list[str]:
    return [r.rel for r in data.discover_runs(root)]


def test_symlinked_run_dir_outside_is_not_discovered_nor_resolved(world) -> None:
    (world["root"] / "linked").symlink_to(world["outside"] / "secret", target_is_directory=True)
    assert rels(world["root"]) == ["good"]
    with pytest.raises(data.OutsideRoot):
        data.resolve_run(world["root"], "linked")


def test_symlinked_parent_dir_outside_is_not_followed(world) -> None:
    (world["root"] / "deep").mkdir()
    (world["root"] / "deep" / "out").symlink_to(world["outside"], target_is_directory=True)
    assert rels(world["root"]) == ["good"]
    with pytest.raises(data.OutsideRoot):
        data.resolve_run(world["root"], "deep/out/secret")


@pytest.mark.parametrize("what", ["metrics.jsonl", "tokens", "tokens/step-000003.parquet", "run.json"])
def test_run_holding_a_symlink_to_outside_is_refused(world, what: str) -> None:
    run = world["root"] / "good"
    target = {"metrics.jsonl": world["outside"] / "passwd", "tokens": world["outside"] / "secret" / "tokens",
              "tokens/step-000003.parquet": world["outside"] / "secret" / "tokens" / "step-000003.parquet",
              "run.json": world["outside"] / "secret" / "run.json"}[what]
    p = run / what
    shutil.rmtree(p) if p.is_dir() else p.unlink()
    p.symlink_to(target, target_is_directory=target.is_dir())
    with pytest.raises(data.OutsideRoot, match="symlink leading outside"):
        data.resolve_run(world["root"], "good")


def test_links_inside_the_root_and_loops_are_not_refused(world) -> None:
    run = world["root"] / "good"
    (run / "loop").symlink_to(run / "loop")
    (run / "again.jsonl").symlink_to(run / "metrics.jsonl")
    assert data.resolve_run(world["root"], "good") == run.resolve()


@pytest.mark.parametrize("rel", ["..", "../outside/secret", "/etc", "good/../../outside/secret", "good/\x00"])
def test_names_from_the_page_cannot_leave_the_root(world, rel: str) -> None:
    with pytest.raises((data.OutsideRoot, ValueError)):
        data.resolve_run(world["root"], rel)


def test_symlink_loops_in_the_root_do_not_hang_discovery(world) -> None:
    (world["root"] / "a").mkdir()
    (world["root"] / "a" / "b").symlink_to(world["root"] / "a", target_is_directory=True)
    (world["root"] / "self").symlink_to(world["root"] / "self")
    assert rels(world["root"]) == ["good"]


def test_root_that_is_a_symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert data.discover_runs(tmp_path / "loop") == []


@pytest.mark.parametrize("damage", ["metrics-garbage", "tokens-cut", "run-json-garbage", "capability-garbage",
                                    "capability-mixed-writes", "everything-empty"])
def test_loaders_return_messages_and_partial_results(world, damage: str) -> None:
    run = world["root"] / "good"
    if damage == "metrics-garbage":
        (run / "metrics.jsonl").write_bytes(garbage(2000))
    elif damage == "tokens-cut":
        cut_half(step_file(run, "tokens"))
    elif damage == "run-json-garbage":
        (run / "run.json").write_bytes(garbage(100))
    elif damage == "capability-garbage":
        (run / "capability").mkdir()
        (run / "capability" / "summary.parquet").write_bytes(garbage(100))
    elif damage == "capability-mixed-writes":
        from diagnose.capability.results import write_capability

        write_capability(run, [{"checkpoint": "a", "measure": "native"}], [{"checkpoint": "a"}], {})
        keep = (run / "capability" / "summary.parquet").read_bytes()
        write_capability(run, [{"checkpoint": "b", "measure": "native"}], [{"checkpoint": "b"}], {})
        (run / "capability" / "summary.parquet").write_bytes(keep)
    else:
        for f in run.rglob("*"):
            if f.is_file():
                f.write_bytes(b"")
    before = tree_hashes(run)
    scan, src, cap = data.scan(run), data.source(run), data.capability(run)
    for loaded in (scan, src, cap):
        assert loaded.ok or (loaded.error and "Traceback" not in loaded.error)
    if damage.startswith("capability"):
        assert not cap.ok and "capability" in cap.error
        assert scan.ok
    elif damage != "everything-empty":
        assert scan.ok and scan.value.issues, "the run is scanned, the bad file named"
        assert any(("metrics.jsonl" in str(i)) or ("step-000003" in str(i)) or ("run.json" in str(i))
                   for i in scan.value.issues)
    after = {k: v for k, v in tree_hashes(run).items() if not k.startswith(".diagnose")}
    assert after == before, "an input was modified"


def test_garbage_tokenizer_falls_back_to_ids(tmp_path: Path) -> None:
    tok = tmp_path / "tokenizer.json"
    tok.write_bytes(garbage(300))
    out = data.decode_tokens(tok, [1, 2, 3])
    assert set(out) == {1, 2, 3}


def test_model_text_is_escaped_on_the_page(tmp_path: Path, base_run: Path, monkeypatch) -> None:
    from streamlit.testing.v1 import AppTest

    root = tmp_path / "root"
    run = copy_run(base_run, root, "html")
    for f in sorted((run / "rollouts").glob("step-*.parquet")):
        df = pl.read_parquet(f)
        df.with_columns((pl.lit(HTML_PAYLOAD) + pl.col("completion")).alias("completion")).write_parquet(f)
    monkeypatch.setenv("DIAGNOSE_RUNS_ROOT", str(root))
    app = Path(__file__).resolve().parent.parent / "dashboards" / "app.py"
    at = AppTest.from_file(str(app), default_timeout=120)
    at.session_state["run"] = "."
    at.run()
    at.switch_page("views/episodes.py").run()
    assert not at.exception, [e.value for e in at.exception]
    body = "\n".join(h.proto.body for h in at.html)
    assert "x-7f3a" in body, "the rollouts with the payload are shown"
    assert "<script>" not in body and "<img src=x" not in body
    assert "&lt;script&gt;" in body


def test_dashboard_command_on_a_root_that_is_a_symlink_loop(tmp_path: Path) -> None:
    from _bad_input import invoke

    from diagnose.cli import app

    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    out = invoke(app, ["dashboard", str(tmp_path / "loop")])
    assert out.code == 2 and "loop" in out.err and "Traceback" not in out.text
