"""Assistant turns of a verl rollout dump's ``output`` (`split_turns`) and their classification
(`VerlTurnClassifier`, each turn's `answer_part`), following how verl 0.8.0.dev assembles and
decodes the ids: ``verl/experimental/agent_loop/tool_agent_loop.py`` (``ToolAgentLoop``) and
``RayPPOTrainer._log_rollout_data`` (``skip_special_tokens=True``). See docs/adapters.md (verl).
"""

from __future__ import annotations

import json
import re
from typing import Any

from diagnose.adapters._turns import TurnClassifier, split_assistant_turns, tool_names_of
from diagnose.chat import IM_END, IM_START
from diagnose.control_families import THINK_CLOSE, THINK_OPEN  # noqa: F401 (re-exported)
from diagnose.turns import answer_part  # noqa: F401 (re-exported for verl.py)

__all__ = ["THINK_CLOSE", "THINK_OPEN", "VerlTurnClassifier", "answer_part", "prompt_tool_names", "split_turns"]

# the tool messages of one round, as decoded: "user\n<tool_response>\n...\n</tool_response>" (one
# block per executed call) then the generation prompt "\nassistant\n"; or an interaction's user
# message (ToolAgentLoop._handle_interacting_state): "user\n<feedback>\nassistant\n", right after
# the turn (its <|im_end|> stripped, so no whitespace before "user") or at the very start
_ROUND = re.compile(r"(\n?(?:user|tool)\n<tool_response>\n.*?\n</tool_response>"
                    r"(?:\n<tool_response>\n.*?\n</tool_response>)*\nassistant\n)"
                    r"|(?:\A|(?<![ \t]))user\n(?!<tool_response>\n).*?\nassistant\n", re.DOTALL)
# an interaction round cut by response_length (run() keeps response_ids[:response_length]; the
# user message is appended without a length check), at the end of the response
_CUT_ROUND = re.compile(r"(?<!\s)user\n(?:(?!\nassistant\n).)*\Z", re.DOTALL)


def split_turns(text: str | None) -> list[str]:
    """Assistant turns of a verl response (see the module docstring); text that still has
    ChatML markers (dumped with special tokens kept) is split as ChatML. An interaction round
    that ends the response (the episode terminated after the feedback, or the cut) is no turn;
    a tool round is always followed by a generated turn (an empty one if the model stopped)."""
    if not text:
        return [""]
    if IM_START in text or IM_END in text:
        return split_assistant_turns(text)
    turns: list[str] = []
    pos = 0
    trailing_user = False
    for m in _ROUND.finditer(text):
        turns.append(text[pos:m.start()])
        pos = m.end()
        trailing_user = m.group(1) is None and pos == len(text)
    if trailing_user:
        return turns
    tail = text[pos:]
    cut = _CUT_ROUND.search(tail)
    turns.append(tail[:cut.start()] if cut else tail)
    return turns


_TOOLS_BLOCK = re.compile(r"<tools>\n(.*?)\n</tools>", re.DOTALL)


def prompt_tool_names(prompt: str | None) -> tuple[str, ...] | None:
    """Names of the tools a dumped ``input`` offers: Qwen's templates render each schema as one
    JSON line inside ``<tools>...</tools>`` of the system turn (text, so it survives
    ``skip_special_tokens``). None when there is no such block or a line does not parse (the
    unknown-tool check is then skipped)."""
    if not prompt or "<tools>" not in prompt:
        return None
    m = _TOOLS_BLOCK.search(prompt)
    if m is None:
        return None
    try:
        schemas = [json.loads(line) for line in m.group(1).split("\n") if line.strip()]
    except ValueError:
        return None
    return tool_names_of(schemas)


class VerlTurnClassifier(TurnClassifier):
    """`TurnClassifier` splitting completions with `split_turns` and classifying each turn's
    `answer_part`; with the prompt's tool names, a call to another tool is ``unknown_tool``
    (``ToolAgentLoop._call_tool`` answers it with an error)."""

    split = staticmethod(split_turns)
    fast_split = "verl"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._verl: dict[tuple[str, tuple[str, ...] | None], tuple[list[str], list[str]]] = {}

    def completion(self, text: str | None, tool_names: tuple[str, ...] | None = None) -> tuple[list[str], list[str]]:
        key = (text or "", tool_names)
        hit = self._verl.get(key)
        if hit is None:
            hit = self._verl[key] = self.turns(split_turns(key[0]), tool_names)  # classify_turn sets reasoning aside (answer_part)
        return hit
