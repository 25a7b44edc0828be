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
from _bad_input import (  # noqa: F401 - no_hang: the autouse watchdog
    HTML_PAYLOAD,
    copy_run,
    cut_half,
    garbage,
    named_pipe,
    no_hang,
    step_file,
    tree_hashes,
    write_base_run,
)

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
                                    "capability-mixed-writes", "everything-empty", "metrics-a-named-pipe",
                                    "capability-a-named-pipe"])
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
    elif damage == "metrics-a-named-pipe":
        named_pipe(run / "metrics.jsonl")
    elif damage == "capability-a-named-pipe":
        (run / "capability").mkdir()
        named_pipe(run / "capability" / "summary.parquet")
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
    if damage.endswith("a-named-pipe"):
        assert "a named pipe (FIFO)" in (cap.error or "") + " ".join(map(str, scan.value.issues))
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


@pytest.mark.parametrize(("make", "what"), [
    (named_pipe, "a named pipe (FIFO), not a directory"),
    (lambda p: p.write_text("x"), "a file, not a directory"),
    (lambda p: None, "no such directory"),
])
def test_dashboard_command_on_a_root_that_is_no_directory_says_what_it_is(tmp_path: Path, make, what) -> None:
    """A runs root that is a pipe or a file is said to be one (it said "no such directory")."""
    from _bad_input import invoke

    from diagnose.cli import app

    make(tmp_path / "root")
    out = invoke(app, ["dashboard", str(tmp_path / "root")])
    assert out.code == 2 and f"root: {what} (the runs root holds run directories)" in " ".join(out.err.split())
    assert "Traceback" not in out.text


# ------------------------------------------------------------------ every page on corrupt runs (AppTest)

PAGES = ("views/overview.py", "views/control_tokens.py", "views/episodes.py", "views/tokens.py", "views/probe.py",
         "views/compare.py")
APP = Path(__file__).resolve().parent.parent / "dashboards" / "app.py"


def _corrupt(run: Path, damage: str) -> None:
    if damage == "run-json-garbage":  # control tokens known by name only: the token viewer raised on them
        (run / "run.json").write_bytes(garbage(100))
    elif damage == "run-json-token-ids-wrong-type":
        import json

        info = json.loads((run / "run.json").read_text())
        info["control_tokens"] = [{**t, "token_id": "im_end"} for t in info["control_tokens"]]
        (run / "run.json").write_text(json.dumps(info))
    elif damage == "tokens-all-garbage":
        for f in (run / "tokens").glob("*.parquet"):
            f.write_bytes(garbage(500))
    elif damage == "tokens-without-token-id":  # every step file: the step the viewer shows too
        for f in (run / "tokens").glob("*.parquet"):
            pl.read_parquet(f).drop("token_id").write_parquet(f)
    elif damage == "rollouts-all-garbage":
        for f in (run / "rollouts").glob("*.parquet"):
            f.write_bytes(garbage(500))
    elif damage == "everything-empty":
        for f in run.rglob("*"):
            if f.is_file():
                f.write_bytes(b"")
    elif damage == "named-pipes":  # never opened for reading (a read would block the page), named
        named_pipe(run / "metrics.jsonl")
        named_pipe(step_file(run, "tokens"))
        (run / "capability").mkdir()
        named_pipe(run / "capability" / "summary.parquet")


CORRUPT = ("run-json-garbage", "run-json-token-ids-wrong-type", "tokens-all-garbage", "tokens-without-token-id",
           "rollouts-all-garbage", "everything-empty", "named-pipes")


@pytest.fixture(scope="module")
def corrupt_root(tmp_path_factory, base_run: Path) -> Path:
    """A runs root holding a good run and one run per kind of corruption."""
    root = tmp_path_factory.mktemp("corrupt_root")
    copy_run(base_run, root, "good")
    for damage in CORRUPT:
        _corrupt(copy_run(base_run, root, damage), damage)
    return root


def _page(root: Path, run: str, page: str):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=120)
    at.session_state["run"] = run
    at.run()
    if page != PAGES[0]:
        at.switch_page(page).run()
    return at


def _one_line_errors(at) -> list[str]:
    assert not at.exception, [e.value for e in at.exception]  # streamlit's traceback box
    errors = [str(e.value) for e in at.error]
    for e in errors:
        assert "\n" not in e.strip() and "Traceback" not in e, e
    return errors


@pytest.mark.parametrize("damage", CORRUPT)
def test_every_page_on_a_corrupt_run_shows_one_line_and_keeps_the_others(corrupt_root: Path, damage: str,
                                                                           monkeypatch, caplog) -> None:
    """The token viewer of a run whose run.json is garbage showed a traceback box (and the server
    logged one): every page on every corrupt run shows what it can, or one line saying why; the
    same page on the good run, picked next in the same session, is whole."""
    monkeypatch.setenv("DIAGNOSE_RUNS_ROOT", str(corrupt_root))
    monkeypatch.delenv("DIAGNOSE_DEBUG", raising=False)
    def inputs() -> dict[str, str]:  # the scan cache (.diagnose/) is the dashboard's own output
        return {k: v for k, v in tree_hashes(corrupt_root / damage).items() if not k.startswith(".diagnose")}

    before = inputs()
    for page in PAGES:
        at = _page(corrupt_root, damage, page)
        _one_line_errors(at)
        assert [t.value for t in at.title], page
        at.selectbox(key="run").set_value("good").run()  # the others stay usable
        assert not _one_line_errors(at), page
    assert "Traceback" not in caplog.text
    assert inputs() == before, "an input was modified"


def test_a_page_that_fails_shows_one_line_and_logs_no_traceback(tmp_path: Path, base_run: Path, monkeypatch,
                                                                caplog) -> None:
    """Whatever a page raises on a run (here the token loader, made to fail) becomes one error
    line on that page and one log line; the sidebar and the other pages still work."""
    copy_run(base_run, tmp_path, "good")
    monkeypatch.setenv("DIAGNOSE_RUNS_ROOT", str(tmp_path))
    monkeypatch.delenv("DIAGNOSE_DEBUG", raising=False)

    def boom(*args, **kwargs):
        raise RuntimeError("cannot read this\nsecond line of the message")

    monkeypatch.setattr(data, "token_rows", boom)
    at = _page(tmp_path, "good", "views/tokens.py")
    errors = _one_line_errors(at)
    assert errors == ["This page, for the run 'good', could not be drawn: RuntimeError: cannot read this "
                      "(the other runs and pages are not affected; DIAGNOSE_DEBUG=1 shows the traceback)"], errors
    assert at.selectbox(key="run").options == ["good"]  # the sidebar is there
    assert "RuntimeError: cannot read this" in caplog.text and "Traceback" not in caplog.text
    at.switch_page("views/overview.py").run()
    assert not _one_line_errors(at)
