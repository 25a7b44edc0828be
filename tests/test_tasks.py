"""The multi-step tool-use environment: generation, protocol, checker, policies, task files."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diagnose.chat import render_chat
from diagnose.tasks import (
    FAMILIES,
    SPLIT_FAMILIES,
    SPLITS,
    LineError,
    Rollout,
    Task,
    contains_value,
    gold_assistant_texts,
    gold_messages,
    gold_state,
    hint_for,
    load_task_file,
    make_env,
    make_tasks,
    oracle_policy,
    random_policy,
    run_episode,
    tokenizer_corpus,
    with_hint,
)
from diagnose.toolcall import CallSyntax, ToolCall, parse_calls, render_calls, render_tools_instructions
from diagnose.turns import TurnState

N_ORACLE = 200  # tasks per split the oracle must solve


@pytest.fixture(scope="module")
def tasks_by_split() -> dict[str, list[Task]]:
    return {s: make_tasks(s, N_ORACLE, seed=0) for s in SPLITS}


def _policy_from(texts: list[str], start: int):
    def policy(messages):
        k = sum(1 for m in messages[start:] if m["role"] == "assistant")
        return texts[min(k, len(texts) - 1)]

    return policy


# --------------------------------------------------------------------------- generation


def test_make_tasks_is_deterministic_and_prefix_stable():
    for split in SPLITS:
        a, b = make_tasks(split, 12, seed=3), make_tasks(split, 12, seed=3)
        assert a == b
        assert make_tasks(split, 5, seed=3) == a[:5]
        c = make_tasks(split, 12, seed=4)
        assert [t.user for t in a] != [t.user for t in c]
        assert len({t.id for t in a}) == 12


def test_bad_split_or_n():
    with pytest.raises(ValueError, match="unknown split"):
        make_tasks("nope", 1)
    with pytest.raises(ValueError):
        make_tasks("train", -1)
    assert make_tasks("train", 0) == []


def test_split_families_and_syntax(tasks_by_split):
    for split, tasks in tasks_by_split.items():
        assert {t.family for t in tasks} == set(SPLIT_FAMILIES[split])
        assert all(t.split == split for t in tasks)
        want = CallSyntax.PYTHONIC if split == "format_ood" else CallSyntax.HERMES
        assert all(t.syntax == want for t in tasks)
    train_tools = {n for f in SPLIT_FAMILIES["train"] for n in FAMILIES[f].impls}
    ood_tools = {n for f in SPLIT_FAMILIES["content_ood"] for n in FAMILIES[f].impls}
    assert not train_tools & ood_tools


def test_train_and_test_never_share_instances():
    train = {t.user for s in (0, 1, 2) for t in make_tasks("train", 300, seed=s)}
    test = {t.user for s in (0, 1, 2) for t in make_tasks("test", 300, seed=s)}
    assert train and test and not train & test


def test_format_ood_is_test_in_pythonic(tasks_by_split):
    for t, f in zip(tasks_by_split["test"], tasks_by_split["format_ood"]):
        assert (t.family, t.user, t.init_state, t.gold_turns, t.gold_answer) == (
            f.family, f.user, f.init_state, f.gold_turns, f.gold_answer)
        assert f.messages[0]["content"].endswith(render_tools_instructions(f.tools, CallSyntax.PYTHONIC))
        assert t.messages[0]["content"].endswith(render_tools_instructions(t.tools, CallSyntax.HERMES))


def test_tasks_need_2_to_4_dependent_calls(tasks_by_split):
    for tasks in tasks_by_split.values():
        for task in tasks:
            assert task.gold_turns[-1] == [] and all(task.gold_turns[:-1])
            assert 2 <= task.n_gold_calls <= 4
            msgs = gold_messages(task)
            outputs_so_far = ""
            turn = 0
            for m in msgs[2:]:
                if m["role"] == "tool":
                    outputs_so_far += m["content"]
                elif m["role"] == "assistant" and turn < len(task.gold_turns) - 1:
                    if turn > 0:  # a later turn passes on a value only a tool output held
                        values = [v for c in task.gold_turns[turn] for v in c.arguments.values() if isinstance(v, str)]
                        dep = [v for v in values if v in outputs_so_far and v not in task.user]
                        assert dep, (task.id, turn)
                    turn += 1
            # the answer quotes a tool output, and the gold path changes the world
            assert task.answer_value and task.answer_value in outputs_so_far
            assert contains_value(task.gold_answer, task.answer_value)
            assert gold_state(task) != make_env(task).state_key()


def test_schemas_are_compact_qwen_function_dicts(tasks_by_split):
    for fam in FAMILIES.values():
        for tool in fam.tools:
            assert tool["type"] == "function"
            fn = tool["function"]
            assert set(fn) == {"name", "description", "parameters"} and len(fn["description"]) <= 40
            assert fn["parameters"]["type"] == "object"
    t = tasks_by_split["train"][0]
    assert t.messages[0]["role"] == "system" and t.messages[1]["role"] == "user"
    assert "<tools>" in t.messages[0]["content"] and len(t.user) < 120


# --------------------------------------------------------------------------- gold and policies


def test_oracle_solves_every_task_of_every_split(tasks_by_split):
    for split, tasks in tasks_by_split.items():
        assert len(tasks) >= 200
        for task in tasks:
            ep = run_episode(task, oracle_policy(task))
            s = ep.score
            assert (s.reward, s.calls_right, s.calls_precision, s.state_right, s.answer_right) == (1.0, 1.0, 1.0, True, True), task.id
            assert s.finished and s.tool_errors == 0 and s.n_turns == len(task.gold_turns)
            assert s.n_calls == s.well_formed_calls == task.n_gold_calls
            assert ep.turn_states[:-1] == [TurnState.HEALTHY_CALL] * (len(task.gold_turns) - 1)
            assert ep.turn_states[-1] == TurnState.HEALTHY_RESPONSE
            assert ep.messages == gold_messages(task)


def test_oracle_with_hints_and_json_syntax():
    for task in make_tasks("train", 30, seed=1):
        for level in (1, 2, 3):
            hinted = with_hint(task, level)
            assert hinted.messages[0]["content"].endswith(hint_for(task, level))
            assert run_episode(hinted, oracle_policy(hinted)).score.reward == 1.0
    for task in make_tasks("test", 30, seed=1, syntax=CallSyntax.JSON):
        assert task.syntax == CallSyntax.JSON
        assert run_episode(task, oracle_policy(task)).score.reward == 1.0


def test_random_policy_scores_near_zero():
    rewards, calls = [], 0
    for split in SPLITS:
        policy = random_policy(seed=7)
        for task in make_tasks(split, 100, seed=5):
            ep = run_episode(task, policy)
            rewards.append(ep.score.reward)
            calls += ep.score.n_calls
            for m in ep.messages:
                if m["role"] == "tool":
                    json.loads(m["content"])
    assert sum(rewards) / len(rewards) < 0.05
    assert calls > 0  # it did try calls


def test_gold_messages_match_qwen_template_rendering():
    for task in make_tasks("train", 9, seed=2):
        msgs = gold_messages(task)
        structured = []
        for m in msgs:
            if m["role"] == "assistant" and m["content"].startswith("<tool_call>"):
                calls = parse_calls(m["content"]).calls
                structured.append({"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": c.to_dict()} for c in calls]})
            else:
                structured.append(m)
        assert render_chat(msgs) == render_chat(structured)
        assert msgs[-1] == {"role": "assistant", "content": task.gold_answer}
        for text, turn in zip(gold_assistant_texts(task), task.gold_turns):
            if turn:
                assert text == render_calls(turn, task.syntax)
                assert list(parse_calls(text, task.syntax).calls) == turn


def test_hint_text():
    task = make_tasks("train", 1)[0]
    first = task.gold_turns[0][0]
    h = hint_for(task)
    assert h == task.hint and first.name in h and str(next(iter(first.arguments.values()))) in h
    assert "then answer" in hint_for(task, 2) and len(hint_for(task, 3)) < 200
    assert task.messages[0]["content"] == make_tasks("train", 1)[0].messages[0]["content"]  # not mutated


# --------------------------------------------------------------------------- checker


def _bank_task(variant: str) -> Task:
    return next(t for t in make_tasks("train", 60, seed=0) if t.variant == variant)


def test_partial_progress_scores():
    task = _bank_task("transfer_balance")
    gold = gold_assistant_texts(task)
    start = len(task.messages)
    # right calls, wrong answer
    s = run_episode(task, _policy_from(gold[:-1] + ["I do not know."], start)).score
    assert (s.reward, s.calls_right, s.state_right, s.answer_right) == (0.0, 1.0, True, False)
    # stops after the lookups: 2 of 4 calls, nothing moved
    s = run_episode(task, _policy_from(gold[:1] + [task.gold_answer], start)).score
    assert (s.reward, s.calls_right, s.state_right, s.answer_right) == (0.0, 0.5, False, True)
    # transfer twice: every gold call made, but the state is wrong
    s = run_episode(task, _policy_from([gold[0], gold[1], gold[1], gold[2], task.gold_answer], start)).score
    assert (s.reward, s.calls_right, s.state_right) == (0.0, 1.0, False)
    assert s.calls_precision == pytest.approx(4 / 5)
    # lookups in separate turns and another order: still full marks (multiset over the episode)
    a, b = task.gold_turns[0]
    texts = [render_calls([b]), render_calls([a]), gold[1], gold[2], task.gold_answer]
    assert run_episode(task, _policy_from(texts, start)).score.reward == 1.0
    # answer inside a polluted turn does not count
    s = run_episode(task, _policy_from(gold[:-1] + [task.gold_answer + " <tool_call>"], start)).score
    assert s.state_right and not s.answer_right


def test_max_turns_and_malformed_blocks():
    task = _bank_task("transfer_id")
    first = render_calls(task.gold_turns[0])
    ep = run_episode(task, lambda m: first, max_turns=3)
    assert ep.score.n_turns == 3 and not ep.score.finished and ep.score.reward == 0.0
    assert ep.final_answer is None
    r = Rollout(task)
    out = r.step(first + "\n<tool_call>\n{not json}\n</tool_call>")
    assert [json.loads(m["content"]) for m in out][-1] == {"error": "malformed tool call"}
    assert len(out) == 3 and r.score().n_calls == 3 and r.score().well_formed_calls == 2
    r.step("<tool_call>\n{broken")  # no well-formed call: the episode ends
    assert r.done and r.turn_states[-1] != TurnState.HEALTHY_CALL
    with pytest.raises(RuntimeError):
        r.step("more")


def test_on_malformed_continue_feeds_errors_back():
    """``on_malformed="continue"``: a turn of only malformed call attempts gets error outputs and
    the episode goes on (the model may retry); a call-free turn still ends it; "end" is unchanged."""
    task = _bank_task("transfer_id")
    gold = gold_assistant_texts(task)
    r = Rollout(task, on_malformed="continue")
    out = r.step("<tool_call>\n")  # the bare call of the Qwen2.5 collapse
    assert not r.done and [json.loads(m["content"]) for m in out] == [{"error": "malformed tool call"}]
    out = r.step("<tool_call>\n{broken\n</tool_call>\n<tool_call>\n")
    assert not r.done and len(out) == 2 and r.env.state_key() == make_env(task).state_key()
    for text in gold:
        r.step(text)
    s = r.score()
    assert r.done and s.reward == 1.0 and s.n_turns == 2 + len(gold) and s.well_formed_calls == 3
    assert s.n_calls == 6 and s.tool_errors == 3
    r = Rollout(task, on_malformed="continue")
    r.step("")  # an empty turn attempts no call: it is the (wrong) final answer
    assert r.done and r.score().finished and r.score().reward == 0.0
    end = Rollout(task)
    end.step("<tool_call>\n")
    assert end.done and end.score().finished
    with pytest.raises(ValueError):
        Rollout(task, on_malformed="retry")


def test_trailing_terminator_and_episode_dict():
    task = _bank_task("transfer_id")
    texts = [t + "<|im_end|>\n" for t in gold_assistant_texts(task)]
    ep = run_episode(task, _policy_from(texts, len(task.messages)))
    assert ep.score.reward == 1.0 and ep.messages == gold_messages(task)
    d = json.loads(json.dumps(ep.to_dict()))
    assert d["score"]["reward"] == 1.0 and d["turn_states"][-1] == "healthy_response"
    with pytest.raises(TypeError):
        run_episode(task, lambda m: None)


def test_tools_return_errors_never_raise():
    task = _bank_task("transfer_balance")
    env = make_env(task)
    ids = list(task.init_state["accounts"])
    bad = [
        ToolCall("nope", {}),
        ToolCall("find_account", {}),
        ToolCall("find_account", {"name": 3}),
        ToolCall("find_account", {"name": "Nobody"}),
        ToolCall("find_account", {"name": "x", "extra": 1}),
        ToolCall("transfer", {"from_id": ids[0], "to_id": ids[1], "amount": True}),
        ToolCall("transfer", {"from_id": ids[0], "to_id": ids[1], "amount": 1.5}),
        ToolCall("transfer", {"from_id": ids[0], "to_id": ids[1], "amount": 10**9}),
        ToolCall("transfer", {"from_id": ids[0], "to_id": ids[0], "amount": 5}),
        ToolCall("transfer", {"from_id": ids[0], "to_id": ids[1], "amount": -5}),
        ToolCall("get_balance", {"account_id": None}),
    ]
    before = env.state_key()
    for c in bad:
        out = env.call(c)
        assert set(out) == {"error"} and isinstance(out["error"], str), c
    assert env.state_key() == before  # failed calls change nothing
    assert "error" not in env.call(ToolCall("transfer", {"from_id": ids[0], "to_id": ids[1], "amount": 10.0}))


def test_contains_value():
    assert contains_value("Alice now has 70 dollars.", "70")
    assert not contains_value("Alice now has 170 dollars.", "70")
    assert not contains_value("It is 70.5 now", "70")
    assert contains_value("the id is TR-1234!", "tr-1234")
    assert contains_value("due on May  17.", "May 17")
    assert not contains_value("due on May 170", "May 17")
    assert contains_value("anything", "")


_PIECES = list('<>/_{}[]()"=:, \nabt0123') + [
    "<tool_call>", "</tool_call>", "<|im_end|>", "<tool_response>", '{"name": "find_account", "arguments": ',
    '"name"', "find_item(", "transfer", "acct-", "sku-1234", "70", "Done.",
]
_TURN_TEXT = st.lists(st.sampled_from(_PIECES), max_size=40).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_TURN_TEXT | st.text(max_size=60), min_size=1, max_size=6))
def test_any_text_is_a_valid_turn(texts):
    for split in ("train", "format_ood"):
        task = make_tasks(split, 1, seed=9)[0]
        ep = run_episode(task, _policy_from(texts, len(task.messages)), max_turns=4)
        assert 0.0 <= ep.score.calls_right <= 1.0 and ep.score.reward in (0.0, 1.0)


# --------------------------------------------------------------------------- task files

GOOD_LINES = [
    {
        "id": "weather-1",
        "messages": [{"role": "user", "content": "What is the weather in Oslo in F?"}],
        "tools": [
            {"type": "function", "function": {"name": "get_city", "parameters": {"type": "object", "properties": {"name": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city_id": {"type": "string"}, "unit": {"type": "string"}}}}},
        ],
        "ground_truth": [[{"name": "get_city", "arguments": {"name": "Oslo"}}], [{"name": "get_weather", "arguments": {"city_id": "c9", "unit": "F"}}], []],
        "tool_outputs": [[{"city_id": "c9"}], [{"temp": 41}]],
        "final_answer": "41",
    },
    {
        "id": 7,
        "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Ping a and b."}],
        "tools": [{"name": "ping", "parameters": {"type": "object", "properties": {"host": {"type": "string"}}}}],
        "ground_truth": [[{"function": {"name": "ping", "arguments": "{\"host\": \"a\"}"}}, {"name": "ping", "arguments": {"host": "b"}}]],
        "syntax": "pythonic",
    },
]

BAD_LINES = [
    b"{not json",
    b"\x00\xff\xfe binary \x81 garbage",
    b'["a", "list"]',
    b'{"id": "m", "tools": [], "ground_truth": [[]]}',
    b'{"id": "x", "messages": "hi", "tools": [{"name": "f"}], "ground_truth": [[{"name": "f", "arguments": {}}]]}',
    b'{"id": "y", "messages": [{"role": "robot", "content": "hi"}], "tools": [{"name": "f"}], "ground_truth": [[{"name": "f", "arguments": {}}]]}',
    b'{"id": "z", "messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "f"}], "ground_truth": [[{"name": "g", "arguments": {}}]]}',
    b'{"id": "w", "messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "f"}], "ground_truth": [[{"name": "f", "arguments": [1]}]]}',
    b'{"id": "v", "messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "f"}], "ground_truth": [[{"name": "f", "arguments": {}}]], "tool_outputs": [[1, 2]]}',
    b'{"id": "u", "messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "f"}], "ground_truth": [[], [{"name": "f", "arguments": {}}]]}',
    b'{"id": true, "messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "f"}], "ground_truth": [[{"name": "f", "arguments": {}}]]}',
    b'{"id": "s", "messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "f"}], "ground_truth": [[{"name": "f", "arguments": {}}]], "syntax": "xml"}',
    b'{"id": "weather-1", "messages": [{"role": "user", "content": "dup"}], "tools": [{"name": "f"}], "ground_truth": [[{"name": "f", "arguments": {}}]]}',
]


@pytest.fixture()
def task_file(tmp_path):
    p = tmp_path / "tasks.jsonl"
    lines = [json.dumps(GOOD_LINES[0]).encode(), b"", *BAD_LINES, json.dumps(GOOD_LINES[1]).encode()]
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


def test_load_task_file_good_and_bad_lines(task_file):
    tasks, errors = load_task_file(task_file)
    assert [t.id for t in tasks] == ["weather-1", "7"]
    assert all(isinstance(e, LineError) and e.path == str(task_file) for e in errors)
    assert [e.line for e in errors] == list(range(3, 3 + len(BAD_LINES)))
    msgs = [e.message for e in errors]
    assert "invalid JSON" in msgs[0] and "UTF-8" in msgs[1] and "duplicate id" in msgs[-1]
    assert "not in 'tools'" in msgs[6] and "one per call" in msgs[8] and "syntax" in msgs[11]
    w, p = tasks
    assert w.hint == 'Hint: first call get_city with name "Oslo".'
    assert w.messages[0]["role"] == "system" and "<tools>" in w.messages[0]["content"]
    assert p.syntax == CallSyntax.PYTHONIC and p.messages[0]["content"].startswith("Be terse.")
    assert p.messages[0]["content"].endswith(render_tools_instructions(p.tools, CallSyntax.PYTHONIC))
    assert p.gold_turns == [[ToolCall("ping", {"host": "a"}), ToolCall("ping", {"host": "b"})], []]


def test_replay_environment(task_file):
    (w, p), _ = load_task_file(task_file)
    for task in (w, p):
        ep = run_episode(task, oracle_policy(task))
        assert ep.score.reward == 1.0, task.id
    assert json.loads(gold_messages(w)[3]["content"]) == {"city_id": "c9"}
    assert json.loads(gold_messages(p)[3]["content"]) == {"ok": True}
    # a wrong call gets an error; retrying the right one recovers
    texts = [render_calls([ToolCall("get_city", {"name": "Bergen"})]), *gold_assistant_texts(w)]
    ep = run_episode(w, _policy_from(texts, len(w.messages)))
    assert "error" in json.loads(ep.messages[3]["content"]) and ep.score.reward == 1.0
    assert ep.score.calls_right == 1.0 and ep.score.tool_errors == 1
    # calls in the other order within the turn still match; the wrong final answer does not
    swapped = "[ping(host=\"b\"), ping(host=\"a\")]"
    assert run_episode(p, _policy_from([swapped, "ok"], len(p.messages))).score.reward == 1.0
    s = run_episode(w, _policy_from(gold_assistant_texts(w)[:-1] + ["It is 40."], len(w.messages))).score
    assert (s.reward, s.state_right, s.answer_right) == (0.0, True, False)
    # skipping a turn fails
    s = run_episode(w, _policy_from(gold_assistant_texts(w)[1:], len(w.messages))).score
    assert s.reward == 0.0 and not s.state_right


def test_load_task_file_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_task_file(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert load_task_file(tmp_path / "empty.jsonl") == ([], [])


# --------------------------------------------------------------------------- tokenizer corpus


def test_tokenizer_corpus():
    docs = list(tokenizer_corpus(300, seed=0))
    assert len(docs) == 300 and docs == list(tokenizer_corpus(300, seed=0))
    assert docs != list(tokenizer_corpus(300, seed=1))
    text = "\n".join(docs)
    for needle in ("<tool_call>", "<tool_response>", "[find_", '[{"name": ', "Hint: ", '{"error": ', "find_book", "find_flight", "<|im_end|>"):
        assert needle in text, needle
    assert all(d.startswith("<|im_start|>system\n") and d.endswith("<|im_end|>\n") for d in docs)
