"""`rollout.on_malformed` in the trainer's rollout loop, on a scripted engine (no sampling): a
bare ``<tool_call>`` turn ends the trajectory by default; with "continue" the environment's
error output is appended as a masked observation and the episode goes on to the gold turns."""

from __future__ import annotations

import json

import pytest

from diagnose.chat import IM_END
from diagnose.model.generation import Sampling
from diagnose.model.resolve import load_model_and_tokenizer
from diagnose.model.sequences import encode
from diagnose.tasks import make_tasks
from diagnose.tasks.episode import gold_assistant_texts
from train_minimal.rollout import rollout_episodes


@pytest.mark.parametrize("on_malformed", ["end", "continue"])
def test_bare_call_turn_ends_or_gets_an_error_observation(tiny_model_dir, on_malformed):
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    task = make_tasks("train", 1, seed=3)[0]
    turns = ["<tool_call>\n", *gold_assistant_texts(task)]
    im_end = tok.convert_tokens_to_ids(IM_END)
    seen = []

    def engine(contexts, sampling):  # turn k of the script, closed by <|im_end|> (a stop)
        text = turns[len(seen)]
        seen.append(tok.decode(contexts[0]))
        ids = encode(tok, text) + [im_end]
        return [(ids, [-0.1] * len(ids), True)]

    (traj,) = rollout_episodes(model, tok, [(task, 0, "policy")], max_turns=len(turns), sampling=Sampling(),
                               generate=engine, on_malformed=on_malformed)
    ep = traj.episode
    if on_malformed == "end":
        assert len(seen) == 1 and ep.score.n_turns == 1 and ep.score.reward == 0.0
        return
    assert len(seen) == len(turns) and ep.score.reward == 1.0 and ep.score.n_turns == len(turns)
    assert json.loads(ep.messages[len(task.messages) + 1]["content"]) == {"error": "malformed tool call"}
    assert '{"error": "malformed tool call"}' in seen[1]  # the model saw the error before its retry
    seq = traj.seq
    trained = tok.decode([i for i, m in zip(seq.ids, seq.loss_mask) if m])
    assert trained.startswith("<tool_call>\n" + IM_END) and "malformed tool call" not in trained
