"""Which verl dump files and values make up a run, on layouts verl 0.8.0.dev's own code writes
(each fixture names the verl file and function it follows; real Qwen2.5 ids): dumps another
launch overwrote or wrote past this experiment's steps, the dump of the step in progress, the
values ``_dump_generations`` writes, a ``validation_data_dir`` that is the ``rollout_data_dir``,
DAPO's overlong penalty, and what ``response_length/*`` measure."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from diagnose.adapters import load_run

from fixtures.verl_layout import write_verl_run



# ---- two experiments writing into one trainer.rollout_data_dir ------------------------------


def test_shared_rollout_dir_is_not_merged(tmp_path, tok):
    """Two experiments launched from one folder with the same ``trainer.rollout_data_dir``:
    ``RayPPOTrainer._dump_generations`` opens ``<global_steps>.jsonl`` with "w", so the second
    (shorter) run overwrites steps 1..6 and the first run's 7..12 stay. Reading the second run
    must not take those as its own (its file logger ends at step 6), and the first run's reader
    must be told its dumps were overwritten."""
    cwd = tmp_path / "launch"
    a = write_verl_run(cwd, 12, 6, seed=21, tokenizer=tok, experiment="exp_a", validation_dir=None,
                       prompts_per_step=2, n=2)
    old = time.time() - 3600
    for f in a.rollout_dir.glob("*.jsonl"):
        os.utime(f, (old, old))
    os.utime(a.metrics_path, (old, old))
    b = write_verl_run(cwd, 6, None, seed=22, tokenizer=tok, experiment="exp_b", validation_dir=None,
                       prompts_per_step=2, n=2)
    src = load_run(cwd, run=b.name)
    ro = src.rollouts.collect()
    assert sorted(set(ro.get_column("step").to_list())) == list(range(1, 7))
    text = "\n".join(str(i) for i in src.issues)
    assert "7.jsonl" in text and "12" in text and "another launch" in text
    src_a = load_run(cwd, run=a.name)
    assert any("exp_b" in n and "overwrit" in n for n in src_a.notes + [str(i) for i in src_a.issues])


def test_dump_of_the_step_in_progress_is_kept(tmp_path, tok):
    """verl dumps a step's rollouts (``_log_rollout_data``) before it logs the step's metrics
    (``logger.log`` at the end of the step): a run stopped in between has one more dump step
    than metric lines. That step is its own, not another launch's."""
    run = write_verl_run(tmp_path / "launch", 6, None, seed=23, tokenizer=tok, validation_dir=None,
                         prompts_per_step=2, n=2)
    lines = run.metrics_path.read_bytes().splitlines()
    run.metrics_path.write_bytes(b"\n".join(lines[:-1]) + b"\n")  # step 6 never logged
    os.utime(run.metrics_path, (time.time() - 60, time.time() - 60))
    src = load_run(run.cwd)
    assert sorted(set(src.rollouts.collect().get_column("step").to_list())) == list(range(1, 7))
    assert not src.issues, [str(i) for i in src.issues]


def test_dump_values_as_verl_writes_them(tmp_path):
    """``_dump_generations``: ``json.dumps(entry, ensure_ascii=False)``; reward-extra values may be
    lists or dicts (e.g. a reward function's per-sample breakdown), ``gts`` a list, text with
    U+2028 / U+0085 (json does not escape them); a dict-returning reward function's ``score``
    key overwrites the base ``score`` (same key, later)."""
    d = tmp_path / "rollout_data"
    d.mkdir()
    rows = [{"input": "system\nS\nuser\nq\u2028x\nassistant\n", "output": "答案\u0085是 42", "gts": ["42", "forty-two"],
             "score": 1, "step": 1, "acc": True, "breakdown": {"fmt": 0.5, "ans": 0.5}, "tags": ["a", "b"]},
            {"input": "system\nS\nuser\nq\u2028x\nassistant\n", "output": "", "gts": ["42"], "score": 0.0,
             "step": 1, "acc": False, "breakdown": {"fmt": 0.0}, "tags": []}]
    (d / "1.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    src = load_run(d)
    assert not src.issues, [str(i) for i in src.issues]
    ro = src.rollouts.collect().sort("sample_id")
    assert ro.height == 2 and ro.get_column("group_id").n_unique() == 1
    assert ro.get_column("completion").to_list()[0] == "答案\u0085是 42"
    assert ro.get_column("reward").to_list() == [1.0, 0.0] and ro.get_column("accuracy").to_list() == [1.0, 0.0]
    assert json.loads(ro.get_column("breakdown")[0]) == {"fmt": 0.5, "ans": 0.5}



# ---- metric meanings ----------------------------------------------------------------------


def _metrics_file(tmp_path, rows: list[dict[str, Any]]) -> Path:
    """``verl/utils/tracking.py`` ``FileLogger``: ``<root>/<project>/<experiment>.jsonl``, one
    ``{"step", "data"}`` line per ``logger.log`` (`diagnose.synth.verl.FileLogger`)."""
    from diagnose.synth.verl import FileLogger

    lg = FileLogger("proj", "exp", root=tmp_path)
    for i, r in enumerate(rows, 1):
        lg.log(r, i)
    lg.finish()
    return lg.filepath


def test_response_length_counts_tool_tokens_in_multi_turn_runs(tmp_path):
    """``metric_utils.py`` ``compute_data_metrics`` takes ``response_length/*`` from
    ``_compute_response_info``: the response's *attention mask*, which is 1 on tool-response tokens
    too (``AgentLoopWorker._agent_loop_postprocess``; only ``response_mask`` is 0 there). In a
    multi-turn run it is not the generated length, so it must not become
    ``completions/mean_length`` ("mean generated tokens per rollout"); single-turn, it is."""
    multi = _metrics_file(tmp_path / "m", [{"response_length/mean": 300.0 + i, "response_length/max": 900.0,
                                            "response_length/min": 40.0, "response_length/clip_ratio": 0.1,
                                            "num_turns/min": 2, "num_turns/max": 7, "num_turns/mean": 5.0}
                                           for i in range(4)])
    m = load_run(multi, format="verl")
    cols = m.metrics.collect().columns
    assert "response_length/mean" in cols and "completions/mean_length" not in cols
    assert "completions/max_length" not in cols and "completions/clipped_ratio" in cols
    assert any("response_length" in n and "tool" in n for n in m.notes)
    single = _metrics_file(tmp_path / "s", [{"response_length/mean": 300.0 + i, "response_length/max": 900.0,
                                             "response_length/min": 40.0, "num_turns/min": 2, "num_turns/max": 2,
                                             "num_turns/mean": 2.0} for i in range(4)])
    assert load_run(single, format="verl").metrics.collect().get_column("completions/mean_length").to_list() == \
        [300.0, 301.0, 302.0, 303.0]


def test_validation_and_rollout_dir_the_same_folder(tmp_path, tok):
    """``trainer.validation_data_dir`` = ``trainer.rollout_data_dir``: in ``RayPPOTrainer.fit`` a
    step's ``_log_rollout_data`` dump comes first and ``_validate`` then writes the same
    ``<global_steps>.jsonl`` ("w"), so steps 0, test_freq, 2*test_freq, ... and the last hold
    validation generations (``reward`` right after ``step``: ``_validate`` puts it first into
    ``reward_extra_infos_dict``). Those are not training rollouts, read from the launch folder or
    the dump folder; the other steps are."""
    run = write_verl_run(tmp_path / "launch", 12, 7, seed=31, tokenizer=tok, rollout_dir="dumps",
                         validation_dir="dumps", test_freq=5, prompts_per_step=2, n=2)
    first = json.loads((run.rollout_dir / "5.jsonl").read_text().splitlines()[0])
    assert list(first)[4:6] == ["step", "reward"]
    for path in (run.cwd, run.rollout_dir):
        src = load_run(path)
        steps = sorted(set(src.rollouts.collect().get_column("step").to_list()))
        assert steps == [s for s in range(1, 13) if s not in (5, 10, 12)], path
        assert any("validation" in n and "5, 10, 12" in n for n in src.notes), src.notes


def _dapo_run(tmp_path, dict_score: bool) -> tuple[Path, dict[int, list[float]]]:
    """``verl/workers/reward_manager/dapo.py`` ``DAPORewardManager.__call__`` with
    ``overlong_buffer.enable`` and ``log``: ``reward = score + overlong_reward`` goes into
    ``token_level_scores``; a dict-returning ``compute_score`` (``math_dapo.compute_score``:
    ``score``, ``acc``, ``pred``) puts its *pre-penalty* ``score`` into ``reward_extra_info``,
    which replaces the dumped ``score`` in ``_dump_generations`` (same key); a float one leaves the
    dumped score = ``token_level_scores.sum(-1)`` and logs ``acc`` = the pre-penalty score.
    ``critic/score/mean`` (``compute_data_metrics``) is the mean of ``token_level_scores``."""
    from diagnose.synth.verl import FileLogger, dump_generations

    lg = FileLogger("dapo", "exp", root=tmp_path)
    trained: dict[int, list[float]] = {}
    for step in range(1, 5):
        pre = [1.0, 1.0, -1.0, 1.0]
        over = [0.0, -0.25 * step, 0.0, -0.5]
        rew = [a + b for a, b in zip(pre, over)]
        trained[step] = rew
        extra: dict[str, list[Any]] = {"score": pre, "acc": [p > 0 for p in pre], "pred": ["42"] * 4} if dict_score \
            else {"acc": pre}
        extra |= {"overlong_reward": over, "overlong": [o < 0 for o in over]}
        dump_generations(tmp_path / "rollout_data", step, ["system\nS\nuser\nq\nassistant\n"] * 4,
                         ["#### 42"] * 4, ["42"] * 4, rew, extra)
        lg.log({"critic/score/mean": sum(rew) / 4, "actor/entropy": 0.5}, step)
    lg.finish()
    return tmp_path, trained


@pytest.mark.parametrize("dict_score", [True, False])
def test_dapo_overlong_penalty_in_the_reward(tmp_path, dict_score):
    """The rollouts' reward is what was trained on (``token_level_scores``), so group statistics
    (``frac_reward_zero_std``) see the overlong penalty, also when a dict-returning
    ``compute_score`` dumped its pre-penalty ``score``."""
    cwd, trained = _dapo_run(tmp_path, dict_score)
    src = load_run(cwd)
    ro = src.rollouts.collect().sort("step", "sample_id")
    for step, want in trained.items():
        assert ro.filter(ro["step"] == step).get_column("reward").to_list() == pytest.approx(want), step
    assert any("overlong_reward" in n for n in src.notes) == dict_score
