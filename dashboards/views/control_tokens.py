"""Control tokens: probe / rollout probabilities at key contexts over steps; logit attribution."""

import polars as pl
import streamlit as st

from dashboards import data, ui
from diagnose.figures import attribution_figure, control_token_figure, control_token_names, token_figure
from diagnose.scan.formatting import fmt_prob, fmt_rise, token_label
from diagnose.scan.names import has_token_probabilities

st.title("Control tokens")
entry, result = ui.run_and_scan_or_stop()

src = data.load_source(entry.path)
texts = {t["name"]: t.get("text") for t in (src.value.control_tokens if src.ok else [])}
for e in result.episodes:
    for t in e.implicated:
        texts.setdefault(t.token, t.text)

if not has_token_probabilities(result.signals.columns):
    st.info(f"This run ({result.source_format}) has no token probabilities: no control-token signals. "
            + " ".join(n for n in result.notes if "token" in n.lower())[:600])
else:
    with ui.section("The control-token figure"):
        st.subheader("All control tokens at the key contexts")
        ui.plot(token_figure(result), "No control-token probability signals in this run.", key="all_tokens_fig")

names = control_token_names(result)
if names:
    token = st.selectbox("control token", names, key="ctrl_token",
                         format_func=lambda n: f"{token_label(n, texts.get(n))}  ({n})")
    with ui.section("The per-token figure"):
        st.subheader(f"p({token_label(token, texts.get(token))}) at its key contexts")
        ui.plot(control_token_figure(result, token, texts.get(token)),
                "No probability signal for this token.", key="token_ctx_fig")
    with ui.section("The attribution figure"):
        st.subheader("Logit-gradient attribution: self vs other")
        ui.plot(attribution_figure(result, token, texts.get(token)),
                f"No logit-gradient attribution logged for this token (`attribution/{token}/self|other|total` "
                "metrics, written by train-minimal).", key="attribution_fig")
else:
    st.info("No control-token signals in this run (no probe, no token log-probs, no attribution metrics).")

with ui.section("The implicated-token table"):
    rows = []
    for i, e in enumerate(result.episodes, start=1):
        for t in e.implicated:
            for c in t.contexts:
                rows.append({"episode": i, "token": token_label(t.token, t.text), "context": c.context,
                             "source": c.source, "before": fmt_prob(c.before), "after": fmt_prob(c.after),
                             "rise": fmt_rise(c.before, c.after),
                             "moved at": c.step, "lead": c.lead, "collapse signature": c.signature})
    if rows:
        st.subheader("Implicated tokens (per episode)")
        st.dataframe(pl.DataFrame(rows), hide_index=True)
