"""Probe: format vs capability per checkpoint (`diagnose probe` results in <run>/capability/)."""

import json

import streamlit as st

from dashboards import data, ui
from diagnose.figures import capability_figure, capability_measures_figure
from diagnose.scan.formatting import fmt_num

st.title("Probe: format vs capability")
entry = ui.selected_run_or_stop()
cap = ui.value_or_stop(data.load_capability(entry.path), "The capability results of this run cannot be read",
                       f". Re-run `diagnose probe {entry.path}` to rewrite them.")
if cap is None:
    st.info(f"This run has not been probed yet. Run `diagnose probe {entry.path}` to measure, "
            "per checkpoint, whether the tool-use skill is still there when the format breaks; the results "
            "appear here.")
    st.stop()

summary = cap.summary
if summary.height == 0:
    st.info("The probe wrote no checkpoint summary.")
else:
    last = summary.sort(["step", "checkpoint"], nulls_last=True).tail(1).row(0, named=True)
    c = st.columns(4)
    c[0].metric("checkpoint", str(last["checkpoint"]))
    c[1].metric("format score", fmt_num(last["format_score"]))
    c[2].metric("capability score", fmt_num(last["capability_score"]))
    c[3].metric("gap", fmt_num(last["format_gap"]))
    st.markdown(f"**verdict at the last checkpoint:** {last['verdict'] or '—'}")
with ui.section("The format-vs-capability figure"):
    ui.plot(capability_figure(summary), "No checkpoint summary to plot.", key="cap_fig")
with ui.section("The per-measure figure"):
    ui.plot(capability_measures_figure(cap.results), "No per-measure results.", key="cap_measures_fig")
st.subheader("Per checkpoint")
st.dataframe(summary, hide_index=True)
with st.expander("all measures", expanded=False):
    st.dataframe(cap.results, hide_index=True)
if cap.meta:
    with st.expander("what was probed (meta.json)", expanded=False):
        st.code(json.dumps(cap.meta, indent=2, default=str)[:20000], language="json")
