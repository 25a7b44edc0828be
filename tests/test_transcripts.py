"""`diagnose.transcripts.split_turns`, the one transcript splitter: each `Dialect` on hand-made
transcripts, then round trips with what the synthetic writers and the test fixtures write (the
turns a writer generated come back), and with what each adapter records (`RunSource.dialect`
splits every logged completion into as many turns as it has turn states)."""

from __future__ import annotations

import polars as pl
import pytest

from diagnose.adapters import TurnClassifier, load_run
from diagnose.adapters.conversations import TURN_JOIN
from diagnose.adapters.trl.completions import message_turns
from diagnose.chat import IM_END, skip_special
from diagnose.synth.foreign import (
    COLLAPSED_TURNS,
    _trajectories,
    write_conversation_run,
    write_trl_run,
    write_verl_run,
)
from diagnose.synth.trl import episode
from diagnose.synth.verl import ToolLoopConfig, tool_agent_episode, verl_dump_text
from diagnose.transcripts import Dialect, split_turns

from fixtures.trl_layout import collapse_run

CALL = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'


# ---- each dialect -----------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", list(Dialect))
def test_empty_and_plain_text_is_one_turn(dialect):
    assert split_turns("", dialect) == [""] and split_turns(None, dialect) == [""]
    assert split_turns("<tool_call>", dialect) == ["<tool_call>"]
    assert split_turns("Sure, 42.", dialect.value) == ["Sure, 42."]  # the name works as well


def test_chatml():
    chatml = (f"{CALL}<|im_end|>\n<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n"
              "<|im_start|>assistant\nDone.<|im_end|>\n")
    assert split_turns(chatml) == [CALL, "Done.<|im_end|>\n"]
    assert split_turns("<|im_start|>assistant\n" + chatml)[0] == CALL
    # an empty first turn stays a turn
    assert split_turns("<|im_end|>\n<|im_start|>user\nx<|im_end|>\n") == [""]
    # a stray header inside one turn is not a boundary
    stray = "Sure<|im_start|>user\nhi"
    assert split_turns(stray) == [stray]
    # unknown role after a boundary: kept as a turn, with its marker
    odd = "a<|im_end|><|im_start|>zzz\nb"
    assert split_turns(odd) == ["a", "<|im_start|>zzz\nb"]
    # decoded with special tokens skipped: read as STRIPPED
    stripped = f"{CALL}\nuser\n<tool_response>\nok\n</tool_response>\nassistant\nDone.\n"
    assert split_turns(stripped, Dialect.CHATML) == split_turns(stripped, Dialect.STRIPPED) == [CALL, "Done.\n"]


def test_stripped_reads_role_lines_only_around_tool_responses():
    assert split_turns(f"{CALL}\ntool\n<tool_response>\nok\n</tool_response>\nassistant\nDone.",
                       Dialect.STRIPPED) == [CALL, "Done."]
    # role lines without a tool response are the model's own text
    assert split_turns("hi\nuser\nthere\nassistant\nyes", Dialect.STRIPPED) == ["hi\nuser\nthere\nassistant\nyes"]
    # ChatML markers are no boundary in this dialect
    chatml = f"{CALL}<|im_end|>\n<|im_start|>assistant\nDone."
    assert split_turns(chatml, Dialect.STRIPPED) == [chatml]


def test_trl_tool_suffix():
    two = "\nuser\n<tool_response>\na\n</tool_response>\n<tool_response>\nb\n</tool_response>\nassistant\n"
    assert split_turns(f"{CALL}{two}{CALL}\nuser\n<tool_response>\nc\n</tool_response>\nassistant\nDone.",
                       Dialect.TRL) == [CALL, CALL, "Done."]
    assert split_turns(f"{CALL}{two}", Dialect.TRL) == [CALL, ""]
    # verl's round (no newline before "user") and an interaction round are not TRL's suffix
    verl = f"{CALL}user\n<tool_response>\nok\n</tool_response>\nassistant\nDone."
    assert split_turns(verl, Dialect.TRL) == [verl]
    assert split_turns("hi\nuser\nthere\nassistant\nyes", Dialect.TRL) == ["hi\nuser\nthere\nassistant\nyes"]


def test_verl_agent_loop_rounds():
    text = f"{CALL}user\n<tool_response>\nok\n</tool_response>\nassistant\n{CALL}user\n<tool_response>\na\n" \
           f"</tool_response>\n<tool_response>\nb\n</tool_response>\nassistant\nDone."
    assert split_turns(text, Dialect.VERL) == [CALL, CALL, "Done."]
    assert split_turns(f"{CALL}user\n<tool_response>\nx\n</tool_response>\nassistant\n", Dialect.VERL) == [CALL, ""]
    # a "user" line without a tool response is the model's own text
    assert split_turns("hi\nuser\nthere", Dialect.VERL) == ["hi\nuser\nthere"]
    # an interaction's feedback round; one that ends the response is no turn
    assert split_turns("#### 40user\nWrong, try again.\nassistant\n#### 42", Dialect.VERL) == ["#### 40", "#### 42"]
    assert split_turns("#### 40user\nWrong, try again.\nassistant\n", Dialect.VERL) == ["#### 40"]
    # dumped with special tokens kept: ChatML
    chatml = f"{CALL}<|im_end|>\n<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n" \
             "<|im_start|>assistant\nDone."
    assert split_turns(chatml, Dialect.VERL) == [CALL, "Done."]
    # ... where the generic stripped reading would glue the tool response to the call
    assert split_turns(text, Dialect.STRIPPED)[0] != CALL


# ---- round trips with the writers -----------------------------------------------------------


def _scripts(n: int = 6, seed: int = 2):
    """Gold multi-turn trajectories and their collapsed and polluted variants."""
    for task, gold, obs in _trajectories(n, seed):
        for turns in (gold, [COLLAPSED_TURNS[0]], [COLLAPSED_TURNS[1]], [gold[0], "<tool_call>"],
                      [gold[0] + "\nI will wait.", *gold[1:]]):
            yield task, turns, obs


def test_trl_text_and_messages_round_trip():
    """`diagnose.synth.trl.episode` (``_tool_call_loop``): the decoded text splits into the turns
    generated (special tokens skipped); the message list, kept as ChatML, into its assistant turns."""
    n = 0
    for task, turns, obs in _scripts():
        names = [t["function"]["name"] for t in task.tools]
        ep = episode(turns, obs, tool_names=names)
        assert split_turns(ep.text, Dialect.TRL) == [skip_special(t) for t in ep.turns]
        kept = message_turns(ep.messages)
        assert split_turns(kept.chatml, Dialect.CHATML) == kept.texts
        n += len(ep.turns) > 1
    assert n >= 6  # multi-turn episodes among them


def test_verl_dump_round_trips():
    """`diagnose.synth.verl.verl_dump_text` (``ToolAgentLoop`` ids decoded as verl dumps them;
    tests/test_adapter_verl.py checks it against real Qwen2.5 ids): the dumped output splits
    into the turns the loop generated."""
    cfg = ToolLoopConfig(response_length=4096)
    n = 0
    for task, turns, obs in _scripts():
        _, out, _ = verl_dump_text(task.messages, task.tools, turns, obs, cfg)
        pieces, _ = tool_agent_episode(turns, obs, lambda t: t + IM_END, lambda m: "", cfg)
        generated = [skip_special(str(p)) for p, mask in pieces if mask]
        assert split_turns(out, Dialect.VERL) == generated, out
        n += len(generated) > 1
    assert n >= 6


def test_conversation_turns_joined_round_trip():
    texts = [CALL, "", "<tool_call>", "Done."]
    assert split_turns(TURN_JOIN.join(texts), Dialect.CHATML) == texts


# ---- what each adapter records ----------------------------------------------------------------


@pytest.mark.parametrize(("name", "write", "dialect"), [
    ("trl-text", lambda p: write_trl_run(p, 6, 3, completions="text"), Dialect.TRL),
    ("trl-messages", lambda p: write_trl_run(p, 6, 3, completions="messages"), Dialect.CHATML),
    ("trl-fixture", lambda p: collapse_run(p, completions="text"), Dialect.TRL),
    ("verl", lambda p: write_verl_run(p, 6, 3), Dialect.VERL),
    ("conversations", lambda p: write_conversation_run(p, 6, 3), Dialect.CHATML),
])
def test_the_source_records_the_dialect_its_turn_states_come_from(tmp_path, name, write, dialect):
    src = load_run(write(tmp_path / name).path)
    assert src.dialect is dialect
    ro = src.rollouts.collect()
    n = ro.select(pl.col("completion").map_elements(lambda c: len(split_turns(c, src.dialect)),
                                                    return_dtype=pl.Int64).alias("n"), "n_turns", "turn_states")
    assert (n["n"] == n["n_turns"]).all() and (ro["n_turns"] > 1).any()
    if dialect is Dialect.TRL:  # text cells: classified from this very split
        classify = TurnClassifier(dialect=src.dialect)
        assert [classify.completion(c)[0] for c in ro["completion"]] == ro["turn_states"].to_list()
