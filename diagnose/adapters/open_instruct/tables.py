"""open-instruct trace records as the source's tables: rollouts (turn states from the decoded
generated segments), tokens (log-probs, tool outputs told apart, control-token columns) and the
per-step metrics, decoding with the tokenizer when there is one (`TableBuilder`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from diagnose.adapters._common.issues import IssueLog
from diagnose.adapters._common.rollouts import ListColumn, empty_rollouts, groups_by_key, json_scalar_column, rollouts_frame
from diagnose.adapters._common.turns import TurnClassifier
from diagnose.adapters.open_instruct.metrics import filtered_groups_note, trace_metrics
from diagnose.adapters.open_instruct.records import Record
from diagnose.adapters.open_instruct.tokenizer import LoadedTokenizer
from diagnose.adapters.open_instruct.tool_spans import ChatIds, segment_by_logprobs, segment_chatml, segment_legacy
from diagnose.control_tokens import ControlTokenRegistry
from diagnose.rundir.schema import CTRL_PREFIX, TOKENS_SCHEMA

__all__ = ["TableBuilder"]


class TableBuilder:
    """Records -> rollouts, tokens and metrics, decoding with the tokenizer when there is one."""

    def __init__(self, tok: LoadedTokenizer | None, issues: IssueLog, notes: list[str]) -> None:
        self.tok, self.issues, self.notes = tok, issues, notes
        self.classifier = TurnClassifier()
        self.chat = None
        if tok is not None:
            try:
                self.chat = ChatIds.from_tokenizer(tok)
            except Exception:  # noqa: BLE001 - a tokenizer object that cannot encode: no ChatML structure
                self.chat = None
        self.registry = None
        if tok is not None:
            try:
                self.registry = ControlTokenRegistry.from_tokenizer(tok.backend)
            except Exception as e:  # noqa: BLE001 - a tokenizer object of an unexpected kind
                notes.append(f"no control tokens read from the tokenizer ({type(e).__name__}): no lp_ctrl_* columns")
        self._prompts: dict[tuple[int, ...], str] = {}
        self.legacy = 0  # responses whose tool outputs are the legacy parser's <output> blocks
        self.answered = 0  # non-Hermes turns read as calls because a tool output follows them
        self.vocab = tok.vocab_size if tok is not None else None
        if tok is not None and self.chat is None:
            notes.append(f"the tokenizer ({tok.source}) has no ChatML <|im_start|>/<|im_end|> tokens: tool outputs "
                         "are found as legacy <output> blocks, else from their 0.0 log-probs")

    def _decode_prompt(self, ids: np.ndarray) -> str:
        key = tuple(ids.tolist())
        s = self._prompts.get(key)
        if s is None:
            s = self._prompts[key] = self.tok.decode(key)
        return s

    def _segment(self, r: Record, suspect: dict[Path | None, int]):
        """Tool outputs of one response: ChatML blocks (vllm_hermes and the other vLLM parsers),
        else, when a tool was called, the legacy parser's ``<output>`` blocks; without a
        tokenizer, 0.0 runs."""
        if self.tok is None:
            return segment_by_logprobs(r.lps, r.known, r.called)
        seg = segment_chatml(r.ids, r.lps, r.known, self.chat) if self.chat is not None else None
        if seg is not None and seg.suspect:
            suspect[r.path] = suspect.get(r.path, 0) + seg.suspect
        if (seg is None or not seg.is_tool.any()) and r.called is not False:
            for wrap in ("output", "tool_output"):  # the legacy and the dr_tulu parser
                legacy = segment_legacy(r.ids, r.lps, r.known, self.tok.decode, wrap)
                if legacy.is_tool.any():
                    self.legacy += 1
                    return legacy
        return seg if seg is not None else segment_by_logprobs(r.lps, r.known, r.called)

    def build(self, records: list[Record]) -> dict[str, Any]:
        sids, gids = _ids(records)
        states, errors = ListColumn(), ListColumn()
        n_turns: list[int | None] = []
        prompts: list[str | None] = []
        completions: list[str | None] = []
        n_gen: list[int | None] = []
        n_tool: list[int | None] = []
        parts: list[tuple[Record, int, np.ndarray, np.ndarray]] = []  # record, sample id, is_tool, turn
        suspect: dict[Path | None, int] = {}
        beyond = 0
        for r, sid in zip(records, sids):
            if r.ids is None:
                for col in (n_turns, prompts, completions, n_gen, n_tool):
                    col.append(None)
                states.append(None)
                errors.append(None)
                continue
            if self.tok is not None and self.vocab and len(r.ids) and int(r.ids.max()) >= self.vocab:
                beyond += 1
            seg = self._segment(r, suspect)
            parts.append((r, sid, seg.is_tool, seg.turn))
            n_tool.append(int(seg.is_tool.sum()))
            n_gen.append(len(r.ids) - n_tool[-1])
            if self.tok is None:
                for col in (n_turns, prompts, completions):
                    col.append(None)
                states.append(None)
                errors.append(None)
                continue
            try:
                texts = [self.tok.decode(r.ids[a:b].tolist()) for a, b in seg.turns]
                completion = self.tok.decode(r.ids.tolist())
                prompt = self._decode_prompt(r.prompt) if r.prompt is not None else None
            except Exception as e:  # noqa: BLE001 - a tokenizer that cannot decode these ids (wrong one)
                self.issues.add(r.path or "", r.line, f"the tokenizer cannot decode these ids ({type(e).__name__}: "
                                                      f"{str(e)[:120]}); no turn states for this sample")
                for col in (n_turns, prompts, completions):
                    col.append(None)
                states.append(None)
                errors.append(None)
                continue
            st, er = self.classifier.turns(texts)
            self.answered += _answered_calls(st, texts, seg.turns, len(r.ids))
            states.append(st)
            errors.append(er)
            n_turns.append(len(st))
            completions.append(completion)
            prompts.append(prompt)
        for path, k in suspect.items():
            self.issues.add(path or "", None, f"{k} tool-output block(s) hold log-probs other than 0.0: each ended "
                                              "there (the tokens after it are read as generated)")
        if self.legacy:
            self.notes.append(f"{self.legacy} response(s) hold tool outputs of open-instruct's legacy parser "
                              "(<output>...</output> after a <tool_name>...</tool_name> call) or dr_tulu parser "
                              "(<tool_output>...</tool_output>): their turn states read Hermes <tool_call> syntax, "
                              "so those calls read as plain text")
        if self.answered:
            self.notes.append(f"{self.answered} turn(s) without a Hermes <tool_call> are followed by a tool output "
                              "(open-instruct's parser found a call there: legacy <tool_name>, dr_tulu, OLMo 3 "
                              "<function_calls>, Llama 3 JSON): read as healthy_call; their syntax is not checked, "
                              "and a broken call of those syntaxes that got no output reads as text")
        if beyond:
            self.notes.append(f"{beyond} response(s) hold token ids beyond the tokenizer's vocabulary "
                              f"({self.vocab}): is it the run's tokenizer?")
        if not records:
            return {"rollouts": empty_rollouts(), "tokens": pl.DataFrame(schema=TOKENS_SCHEMA).lazy(),
                    "metrics": pl.DataFrame(schema={"step": pl.Int64}), "control_tokens": []}
        cols: dict[str, Any] = {
            "step": [r.step for r in records], "sample_id": sids, "group_id": gids,
            "prompt": prompts, "completion": completions, "reward": [r.reward for r in records],
            "n_turns": n_turns, "turn_states": states.series("turn_states"), "error_types": errors.series("error_types"),
        }
        extras = _extras(records, n_gen, n_tool)
        rollouts = rollouts_frame(cols, extras)
        if self.tok is None:
            self.notes.append(f"{len(records)} rollouts without turn states (no tokenizer); tool outputs told apart "
                              "by their 0.0 log-probs only (approximate)")
        filtered_groups_note(rollouts, self.notes)
        tokens = self._tokens(parts)
        ctrl = [] if self.registry is None else [{**t, "lp_coverage": "sampled"} for t in self.registry.to_json()]
        return {"rollouts": rollouts, "tokens": tokens, "metrics": trace_metrics(rollouts), "control_tokens": ctrl}

    def _tokens(self, parts: list[tuple[Record, int, np.ndarray, np.ndarray]]) -> pl.LazyFrame:
        if not parts:
            return pl.DataFrame(schema=TOKENS_SCHEMA).lazy()
        lengths = np.array([len(r.ids) for r, *_ in parts], dtype=np.int64)
        total = int(lengths.sum())
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        ids = np.concatenate([r.ids for r, *_ in parts]) if total else np.zeros(0, np.int64)
        is_tool = np.concatenate([t for _, _, t, _ in parts]) if total else np.zeros(0, bool)
        lps = np.concatenate([r.lps for r, *_ in parts]) if total else np.zeros(0)
        known = np.concatenate([r.known for r, *_ in parts]) if total else np.zeros(0, bool)
        lp = pl.Series("logprob", lps.astype(np.float32), dtype=pl.Float32, nan_to_null=False)
        null = ~known | is_tool  # a tool token's 0.0 is a placeholder, not a log-prob
        df = pl.DataFrame({
            "step": np.repeat(np.array([r.step for r, *_ in parts], dtype=np.int64), lengths),
            "sample_id": np.repeat(np.array([s for _, s, *_ in parts], dtype=np.int64), lengths),
            "turn": np.concatenate([t for *_, t in parts]).astype(np.int32) if total else np.zeros(0, np.int32),
            "position": (np.arange(total, dtype=np.int64) - starts).astype(np.int32),
            "token_id": ids.astype(np.int32),
            "logprob": lp,
            "_null": null,
            "is_generated": ~is_tool,
        })
        lf = df.lazy().with_columns(
            pl.when(pl.col("_null")).then(None).otherwise(pl.col("logprob")).alias("logprob"),
            pl.lit(None, dtype=pl.Float32).alias("sampler_logprob"),
            pl.lit(None, dtype=pl.Float32).alias("entropy"),
        ).drop("_null")
        lf = lf.select([pl.col(c).cast(t) for c, t in TOKENS_SCHEMA.items()])
        ctrl = self.registry.to_json() if self.registry is not None else []
        if ctrl:  # the sampled token's log-prob where it is (the start of) that control string
            starts = [_seq_starts(ids, ~is_tool, lengths, t.get("token_ids") or [t["token_id"]]) for t in ctrl]
            lf = lf.with_columns([
                pl.when(pl.lit(pl.Series(st))).then(pl.col("logprob")).otherwise(None).cast(pl.Float32)
                .alias(CTRL_PREFIX + t["name"])
                for t, st in zip(ctrl, starts)
            ])
        return lf


def _answered_calls(states: list[str], texts: list[str], turns: list[tuple[int, int]], n: int) -> int:
    """Turns that the Hermes reading calls a plain response but after which open-instruct appended
    a tool output (``vllm_utils.py`` ``process_request`` does only when its parser found a call):
    set to ``healthy_call`` in place; returns how many."""
    k = 0
    for i, (_, end) in enumerate(turns):
        if end < n and states[i] == "healthy_response" and "<tool_call>" not in texts[i]:
            states[i] = "healthy_call"
            k += 1
    return k


def _seq_starts(ids: np.ndarray, gen: np.ndarray, lengths: np.ndarray, seq: list[int]) -> np.ndarray:
    """Where the generated ``seq`` starts, per token of the concatenated responses (a match
    never runs across two responses)."""
    n, k = len(ids), len(seq)
    hit = gen & (ids == seq[0])
    for j in range(1, k):
        nxt = np.zeros(n, dtype=bool)
        nxt[: n - j] = gen[j:] & (ids[j:] == seq[j])
        hit &= nxt
    if k > 1 and hit.any():
        ends = np.repeat(np.cumsum(lengths), lengths)  # one past each token's response
        hit &= np.arange(n) + k <= ends
    return hit


def _ids(records: list[Record]) -> tuple[list[int], list[int]]:
    """``sample_id``: the record's ``sample_idx`` when the step's are unique, else the order;
    ``group_id``: the step's prompts by first appearance of ``prompt_idx``."""
    by_step: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        by_step.setdefault(r.step, []).append(i)
    sids, gids = [0] * len(records), [0] * len(records)
    for idx in by_step.values():
        own = [records[i].sample_idx for i in idx]
        unique = None not in own and len(set(own)) == len(own)
        gs = groups_by_key([records[i].prompt_idx for i in idx])
        for k, i in enumerate(idx):
            sids[i] = own[k] if unique else k  # type: ignore[assignment]
            gids[i] = gs[k]
    return sids, gids


def _extras(records: list[Record], n_gen: list[int | None], n_tool: list[int | None]) -> dict[str, Any]:
    ex: dict[str, Any] = {
        "prompt_idx": json_scalar_column("prompt_idx", [r.prompt_idx for r in records]),
        "sample_idx": pl.Series("sample_idx", [r.sample_idx for r in records], dtype=pl.Int64),
        "advantage": pl.Series("advantage", [r.advantage for r in records], dtype=pl.Float64),
        "n_tokens": pl.Series("n_tokens", n_gen, dtype=pl.Int64),
        "n_tool_tokens": pl.Series("n_tool_tokens", n_tool, dtype=pl.Int64),
        "finish_reason": pl.Series("finish_reason", [r.finish_reason for r in records], dtype=pl.String),
        "dataset": pl.Series("dataset", [r.dataset for r in records], dtype=pl.String),
        "ground_truth": json_scalar_column("ground_truth", [r.ground_truth for r in records]),
    }
    for k in ("num_calls", "n_failed_calls"):
        ex[k] = pl.Series(k, [getattr(r, k) for r in records], dtype=pl.Int64)
    ex["tool_calleds"] = pl.Series("tool_calleds", [r.called for r in records], dtype=pl.Boolean)
    ex["timeouts"] = pl.Series("timeouts", [r.timeout for r in records], dtype=pl.Boolean)
    ex["tool_errors"] = pl.Series("tool_errors", [r.tool_errors for r in records], dtype=pl.String)
    ex["tool_runtimes"] = pl.Series("tool_runtimes", [r.tool_runtime for r in records], dtype=pl.Float64)
    ex["tool_outputs"] = pl.Series("tool_outputs", [r.tool_outputs for r in records], dtype=pl.String)
    return ex
