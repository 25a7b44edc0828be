"""Compare: two runs side by side (diagnose.scan.compare)."""

import polars as pl
import streamlit as st

from dashboards import data, ui
from diagnose.scan.compare import compare_results
from diagnose.figures import compare_figure
from diagnose.scan.formatting import fmt_num, verdict_line

st.title("Compare two runs")
entry = ui.selected_run_or_stop()
others = [r for r in ui.runs() if r.rel != entry.rel]
if not others:
    st.info("This is the only run under the runs root: nothing to compare it with.")
    st.stop()
labels = {r.rel: r.label for r in others}
b_rel = st.selectbox(f"compare {entry.rel} with", list(labels), key="compare_b", format_func=lambda r: labels[r])
other = next(r for r in others if r.rel == b_rel)
try:
    data.resolve_run(ui.root(), other.rel)
except data.OutsideRoot as e:
    st.error(f"refused: {e}")
    st.stop()

a = ui.scan_or_stop(entry)
b = ui.scan_or_stop(other, f"{other.rel} could not be scanned")
la, lb_ = entry.rel, other.rel
cmp = compare_results(a, b, (la, lb_))

c1, c2 = st.columns(2)
for col, label, res in ((c1, la, a), (c2, lb_, b)):
    with col:
        st.markdown(f"**{label}** ({res.source_format})")
        ui.verdict_box(res, verdict_line(res))

with ui.section("The key-number table"):
    st.subheader("Key numbers")
    st.dataframe(pl.DataFrame([{"": k, "A: " + la: x, "B: " + lb_: y} for k, x, y in cmp.key_rows()]),
                 hide_index=True)
with ui.section("The overlay figure"):
    st.subheader("Overlay")
    ui.plot(compare_figure(cmp), "", key="compare_fig")
with ui.section("The side-by-side table"):
    st.subheader("Signals side by side")
    st.caption("median of the first / last 5 steps, [min, max]")

    def span(s):
        return "—" if s is None else (f"{fmt_num(s['start'], 3)} → {fmt_num(s['end'], 3)}  "
                                      f"[{fmt_num(s['min'], 3)}, {fmt_num(s['max'], 3)}]")

    st.dataframe(pl.DataFrame([{"signal": r["signal"], "A: " + la: span(r["a"]), "B: " + lb_: span(r["b"])}
                               for r in cmp.signal_rows]), hide_index=True)
