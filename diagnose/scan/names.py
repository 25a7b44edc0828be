"""Signal names: what each family of signals means, and the one parse and format of the names
that carry a control token.

A signal is a column of the step table (`diagnose.scan.signals.step_signals`), named as in
run-format v1: ``reward``, ``turn_state/collapsed``, ``ctrl/<token>/p``, ``ctx/<context>/<token>``,
``probe/<context>/<token>``, ``attribution/<token>/<part>``, trainer metrics as logged.

- `SIGNAL_SPECS`: every family, with where it comes from, its direction of concern, and two
  flags: ``bookkeeping`` (schedules, clocks, counters: never searched for a move before a
  collapse) and ``generic`` (no meaning known to the detectors: the scan lists such signals
  in its notes). `signal_spec` finds a name's family (first match wins).
- `TokenSignal`: a control token's probability signal, parsed from its name (`TokenSignal.parse`)
  and written back (`.name`, `.label` for figures and tables).

Docs: the signal table of docs/scan.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from diagnose.control_tokens import KEY_CONTEXT_ROLES
from diagnose.scan.formatting import token_label

__all__ = [
    "ATTRIBUTION_PARTS",
    "SIGNAL_SPECS",
    "SignalSpec",
    "TokenSignal",
    "attribution_signal",
    "context_count_signal",
    "ctrl_signal",
    "generic_signals",
    "has_token_probabilities",
    "is_bookkeeping",
    "is_context_count",
    "rollout_twin",
    "signal_direction",
    "signal_kind",
    "signal_spec",
    "signal_token",
    "table_presence",
    "token_signal_expr",
    "token_signal_names",
]

#: The families of control-token probabilities: the fixed probe at a key context, the rollouts'
#: tokens at a key context, and the rollouts' tokens at every generated position.
PROBE, CTX, CTRL = "probe", "ctx", "ctrl"
TOKEN_PROBABILITY_FAMILIES: tuple[str, ...] = (CTRL, CTX, PROBE)
#: ``attribution/<token>/<part>``: the logit push from the samples that drew the token, the
#: others, and both.
ATTRIBUTION_PARTS: tuple[str, ...] = ("self", "other", "total")
#: Context of a ``ctrl/<token>/p`` signal: every generated position.
ALL_POSITIONS = "all"


@dataclass(frozen=True)
class SignalSpec:
    """One signal family: ``pattern`` (a regex over the whole name), where it comes from, the
    direction that is a concern (``up`` | ``down`` | ``both``), what it means; ``bookkeeping``:
    not a training signal (schedule, clock, counter), never searched for a move before a
    collapse; ``generic``: no meaning known to the detectors (the scan's notes list them)."""

    pattern: str
    source: str
    direction: str
    description: str
    bookkeeping: bool = False
    generic: bool = False


#: Every signal family ``step_signals`` produces or passes through, in lookup order (the first
#: pattern that matches the whole name wins).
SIGNAL_SPECS: tuple[SignalSpec, ...] = (
    SignalSpec(r"reward", "rollouts|metrics", "down", "mean reward of the on-policy rollouts"),
    SignalSpec(r"accuracy", "rollouts|metrics", "down", "mean task accuracy"),
    SignalSpec(r"reward_std", "rollouts|metrics", "both", "std of the reward over the step's rollouts"),
    SignalSpec(r"group_reward_std", "rollouts|metrics", "down",
               "mean within-group reward std (GRPO signal strength); falls when groups turn uniform"),
    SignalSpec(r"frac_reward_zero_std", "rollouts|metrics", "up", "share of groups whose rewards are all equal (no gradient)"),
    SignalSpec(r"n_rollouts", "rollouts", "both", "on-policy rollouts at the step", bookkeeping=True),
    SignalSpec(r"nonfinite_reward", "rollouts", "up", "rollouts whose reward is NaN/inf"),
    SignalSpec(r"turn_state/healthy_call", "rollouts|metrics", "down", "share of assistant turns that are healthy calls"),
    SignalSpec(r"turn_state/healthy_response", "rollouts|metrics", "both", "share of turns that are healthy final answers"),
    SignalSpec(r"turn_state/polluted", "rollouts|metrics", "up", "share of turns with a format error but usable content"),
    SignalSpec(r"turn_state/collapsed", "rollouts|metrics", "up", "share of turns with nothing usable (e.g. a bare <tool_call>)"),
    SignalSpec(r"format_error/.+", "rollouts|metrics", "up", "occurrences of that FormatError per assistant turn"),
    SignalSpec(r"rollouts/any_collapsed", "rollouts", "up", "share of rollouts with at least one collapsed turn"),
    SignalSpec(r"completion_chars", "rollouts", "both", "mean completion length in characters"),
    SignalSpec(r"completions/mean_length", "tokens|metrics", "both", "mean generated tokens per rollout"),
    SignalSpec(r"turns_per_episode", "rollouts|metrics", "both", "mean assistant turns per rollout"),
    SignalSpec(r"healthy_calls_per_episode", "rollouts", "down", "mean healthy_call turns per rollout (tool-call frequency)"),
    SignalSpec(r"tool_calls_per_episode", "metrics", "down", "mean well-formed calls per rollout (trainer metric)"),
    SignalSpec(r"num_turns/(mean|min|max)", "metrics", "both",
               "verl: turns per rollout (assistant turns + tool rounds + 1); falls when episodes end early"),
    SignalSpec(r"tool_call_counts/(mean|min|max)", "metrics", "down", "verl: tool calls per rollout"),
    SignalSpec(r"tools/call_frequency", "metrics", "down", "tool calls per rollout (TRL tools/call_frequency; "
               "open-instruct request_info num_calls)"),
    SignalSpec(r"tools/failure_frequency", "metrics", "up", "share of tool calls that failed"),
    SignalSpec(r"tools/timeout_frequency", "metrics", "up", "share of rollouts with a tool call that timed out"),
    SignalSpec(r"entropy", "tokens|metrics", "both", "mean entropy (nats) of the policy at generated positions"),
    SignalSpec(r"low_prob_share", "tokens", "up", "share of generated tokens sampled with p < low_prob (default 0.01)"),
    SignalSpec(r"nonfinite_logprob", "tokens", "up", "generated tokens whose logprob is NaN/inf (count)"),
    SignalSpec(r"nonfinite_logprob_share", "tokens", "up", "the same, as a share of generated tokens"),
    SignalSpec(r"mismatch/abs_logprob_diff", "tokens|metrics", "up", "mean |logprob - sampler_logprob| (train/inference mismatch)"),
    SignalSpec(r"sampling/sampling_logp_difference/max", "metrics", "up",
               "TRL: max |logprob - vLLM logprob| over the batch (its mean is mismatch/abs_logprob_diff)"),
    SignalSpec(r"sampling/importance_sampling_ratio/(min|mean|max)", "metrics", "both",
               "TRL: vLLM importance-sampling ratio (trainer / sampler probability) statistics"),
    SignalSpec(r"mismatch/abs_prob_diff", "metrics", "up",
               "mean |p - sampler_p| over generated tokens (verl training/rollout_probs_diff_mean; a probability)"),
    SignalSpec(r"training/rollout_probs_diff_(mean|max|std)", "metrics", "up", "verl: |p_actor - p_rollout| statistics"),
    SignalSpec(r"training/rollout_actor_probs_pearson_corr", "metrics", "down",
               "verl: correlation of actor and rollout token probabilities"),
    SignalSpec(r"rollout_corr/(kl|k3_kl|log_ppl_abs_diff|chi2_token|chi2_seq)", "metrics", "up",
               "verl rollout correction: train/inference mismatch (KL, |log-ppl diff|, chi2 of rollout vs training policy)"),
    SignalSpec(r"rollout_corr/.+", "metrics", "both", "verl rollout correction: perplexities, IS weights, rejection shares"),
    SignalSpec(r"actor/ppo_kl", "metrics", "up", "verl: KL between the rollout and the updated policy in the PPO step"),
    SignalSpec(r"n_tokens", "tokens", "both", "generated tokens at the step"),
    SignalSpec(r"ctrl/[^/]+/p", "tokens", "up", "mean probability of the control token over generated positions"),
    SignalSpec(r"ctrl/[^/]+/sampled", "tokens", "both", "share of generated tokens that are this control token"),
    SignalSpec(r"ctx/[^/]+/n", "tokens", "both", "generated positions found at that key context", bookkeeping=True),
    SignalSpec(r"ctx/[^/]+/[^/]+", "tokens", "up",
               "mean probability of the token at the key context in the rollouts (the context's expected token: down)"),
    SignalSpec(r"probe/mean_gold_logprob", "probe", "down", "mean log-prob of the gold tokens of the fixed probe"),
    SignalSpec(r"probe/[^/]+/gold", "probe|metrics", "down", "probe: probability of the gold next token at the key context"),
    SignalSpec(r"probe/[^/]+/[^/]+", "probe|metrics", "up",
               "probe: probability of the control token at the key context (the expected token: down)"),
    SignalSpec(r"attribution/[^/]+/(self|other|total)", "metrics", "up", "advantage-weighted logit push on the control token"),
    SignalSpec(r"kl", "metrics", "up", "KL to the reference policy"),
    SignalSpec(r"clip_ratio", "metrics", "up", "share of clipped ratios"),
    SignalSpec(r"clip_ratio/.+", "metrics", "up", "TRL: share of clipped ratios (region, low, high)"),
    SignalSpec(r"completions/clipped_ratio", "metrics", "up", "share of completions cut at the length limit"),
    SignalSpec(r"completions/(min|max|mean)_(terminated_)?length", "metrics", "both", "completion length statistics"),
    SignalSpec(r"rewards/[^/]+/mean", "metrics", "down", "mean of one reward function (TRL rewards/<name>/mean)"),
    SignalSpec(r"rewards/[^/]+/std", "metrics", "both", "std of one reward function (TRL rewards/<name>/std)"),
    SignalSpec(r"grad_norm", "metrics", "up", "gradient norm before clipping"),
    SignalSpec(r"learning_rate|lr|epoch|global_step|step_time|(timing_s|timing_per_token_ms|perf|time)/.+", "metrics",
               "both", "trainer bookkeeping (schedule, clocks)", bookkeeping=True),
    SignalSpec(r"num_tokens|loss|total_flos|train_loss|train_runtime|train_samples_per_second|train_steps_per_second|"
               r"rollouts/count|throughput/.+", "metrics", "both",
               "trainer loss, totals and throughput (tokens seen, FLOPs, run time)"),
    SignalSpec(r"phase|skipped_update|completions/truncated|sft_examples|sft_loss|.*_time|"
               r"(timing_s|timing_per_token_ms|perf|time)/|training/(global_step|epoch|rollout_probs_diff_valid)",
               "metrics", "both", "other schedules, clocks and counters, of no meaning known to the detectors",
               bookkeeping=True, generic=True),
    SignalSpec(r".*", "metrics", "both", "any other numeric metric, passed through", generic=True),
)
_SPEC_RE = [(re.compile(s.pattern + r"\Z"), s) for s in SIGNAL_SPECS]


def signal_spec(name: str) -> SignalSpec:
    """The family of signal ``name`` (the first `SIGNAL_SPECS` pattern that matches it whole)."""
    for rx, spec in _SPEC_RE:
        if rx.match(name):
            return spec
    return SIGNAL_SPECS[-1]


def is_bookkeeping(name: str) -> bool:
    """Schedules, clocks and counters: signals never searched for a move before a collapse."""
    return signal_spec(name).bookkeeping


def generic_signals(names: Iterable[str]) -> list[str]:
    """Signal names no `SignalSpec` gives a meaning: they reach no dedicated detector. The scan
    lists them in its notes, so a signal a format carries is never silently ignored."""
    return sorted(n for n in names if n != "step" and signal_spec(n).generic)


def signal_direction(name: str, control_tokens: Sequence[Mapping[str, Any]] = ()) -> str:
    """Direction of concern of signal ``name``: ``up``, ``down`` or ``both``. With the control
    tokens, a key-context probability is ``down`` for the context's expected token
    (:data:`diagnose.control_tokens.KEY_CONTEXT_ROLES`)."""
    sig = TokenSignal.parse(name)
    if sig is not None and sig.at_key_context and control_tokens:
        role = next((t.get("role") for t in control_tokens if t.get("name") == sig.token), None)
        roles = KEY_CONTEXT_ROLES.get(sig.context)
        if roles is not None and role is not None and role == roles.get("expected"):
            return "down"
    return signal_spec(name).direction


def signal_kind(name: str) -> str:
    """``probability`` for per-token probabilities (detected on a log scale), ``count`` for
    counts, else ``value``."""
    if _is_token_probability_family(name) and not name.endswith(("/n", "/sampled", "mean_gold_logprob")):
        return "probability"
    if name in ("nonfinite_logprob", "n_tokens", "n_rollouts", "nonfinite_reward") or name.endswith("/n"):
        return "count"
    return "value"


def _is_token_probability_family(name: str) -> bool:
    return name.startswith(tuple(f + "/" for f in TOKEN_PROBABILITY_FAMILIES))


def has_token_probabilities(columns: Iterable[str]) -> bool:
    """Whether a signal table holds any control-token probability (``ctrl/``, ``ctx/``, ``probe/``)."""
    return any(_is_token_probability_family(c) for c in columns)


def table_presence(columns: Iterable[str]) -> dict[str, bool]:
    """Which of the run's tables the signals came from, told by the names they left."""
    cols = set(columns)
    return {
        "rollouts": "n_rollouts" in cols,
        "tokens": "n_tokens" in cols,
        "probe": any(c.startswith(PROBE + "/") for c in cols),
        "metrics": bool(cols - {"step"}),
    }


# ---------------------------------------------------------------------------------------------
# control-token signals
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSignal:
    """A control token's probability signal. ``family``: ``probe`` (``probe/<context>/<token>``,
    the fixed probe), ``ctx`` (``ctx/<context>/<token>``, the rollouts' tokens at a key
    context) or ``ctrl`` (``ctrl/<token>/p``, the rollouts' tokens at every generated position,
    context ``all``)."""

    family: str
    context: str
    token: str

    @classmethod
    def parse(cls, name: str) -> TokenSignal | None:
        """The signal named ``name``, or None when it is no control-token probability
        (``ctx/<context>/n`` and ``probe/<context>/gold`` are not)."""
        parts = name.split("/")
        if len(parts) != 3:
            return None
        family, a, b = parts
        if family in (PROBE, CTX) and b not in ("gold", "n"):
            return cls(family, a, b)
        if family == CTRL and b == "p":
            return cls(CTRL, ALL_POSITIONS, a)
        return None

    @property
    def name(self) -> str:
        return ctrl_signal(self.token, "p") if self.family == CTRL else f"{self.family}/{self.context}/{self.token}"

    @property
    def at_key_context(self) -> bool:
        return self.family != CTRL

    @property
    def source(self) -> str:
        """The table it is measured on: ``probe`` or ``tokens`` (the rollouts' token traces)."""
        return "probe" if self.family == PROBE else "tokens"

    def label(self, text: str | None = None) -> str:
        """How figures name it: ``probe: p(<|im_end|> | after_call_open)``; ``text``: the token's
        text where the run knows it (`diagnose.scan.formatting.token_label`)."""
        where = "probe" if self.family == PROBE else "rollouts"
        tok = token_label(self.token, text)
        if self.family == CTRL:
            return f"{where}: p({tok}), all generated positions"
        return f"{where}: p({tok} | {self.context})"


def token_signal_names(token: str, context: str) -> list[str]:
    """The signals that measure p(``token`` | ``context``), the fixed probe first (``all``: the
    one over every generated position)."""
    if context == ALL_POSITIONS:
        return [ctrl_signal(token, "p")]
    return [TokenSignal(PROBE, context, token).name, TokenSignal(CTX, context, token).name]


def rollout_twin(name: str) -> str | None:
    """The rollout-token signal of a fixed-probe one (``probe/c/t`` -> ``ctx/c/t``), else None."""
    sig = TokenSignal.parse(name)
    return TokenSignal(CTX, sig.context, sig.token).name if sig is not None and sig.family == PROBE else None


def token_signal_expr(family: str, context: pl.Expr, token: pl.Expr) -> pl.Expr:
    """`TokenSignal.name` inside a polars query (columns of contexts and tokens)."""
    return pl.concat_str([pl.lit(family), context, token], separator="/")


def ctrl_signal(token: str, stat: str) -> str:
    """``ctrl/<token>/<stat>``: ``p`` (mean probability) or ``sampled`` (sampling rate)."""
    return f"{CTRL}/{token}/{stat}"


def context_count_signal(context: str) -> str:
    """``ctx/<context>/n``: the generated positions found at a key context."""
    return f"{CTX}/{context}/n"


def is_context_count(name: str) -> bool:
    """Whether ``name`` is a `context_count_signal`."""
    parts = name.split("/")
    return len(parts) == 3 and parts[0] == CTX and parts[2] == "n"


def attribution_signal(token: str, part: str) -> str:
    """``attribution/<token>/<part>``, part one of `ATTRIBUTION_PARTS`."""
    return f"attribution/{token}/{part}"


def signal_token(name: str) -> str | None:
    """The control token a probability or attribution signal is about (None: neither)."""
    sig = TokenSignal.parse(name)
    if sig is not None:
        return sig.token
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == "attribution" and parts[2] in ATTRIBUTION_PARTS:
        return parts[1]
    return None
