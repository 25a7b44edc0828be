"""Overview: verdict, reward / accuracy, the four turn states, episode bands, key signals."""

import polars as pl
import streamlit as st

from dashboards import data, ui
from diagnose.figures import key_signals_figure, overview_figure
from diagnose.scan.formatting import fmt_num, fmt_pct, token_label, verdict_line
from diagnose.scan.names import table_presence
from diagnose.scan.series import level, smoothed_peak
from diagnose.scan.result import issues_summary

st.title("Overview")
entry, result = ui.run_and_scan_or_stop()

st.caption(f"`{entry.path}` · format **{result.source_format}** · tables: "
           f"{', '.join(k for k, ok in table_presence(result.signals.columns).items() if ok) or 'none'} · {result.cache.describe()}")
hint = None
if result.verdict == "collapse":
    cap = data.load_capability(entry.path)
    if cap.ok and cap.value is None:
        hint = f"run `diagnose probe {entry.path}` (Probe page)"
ui.verdict_box(result, verdict_line(result, capability_hint=hint))
issues = getattr(result, "issues", [])
if result.signals.height == 0:
    st.warning("Nothing readable in this run" + (f": {issues[0]}" if issues else ".")
               + (f" (and {len(issues) - 1} more issue(s), listed below)" if len(issues) > 1 else ""))

name = result.primary_signal or "reward"
e0 = result.episodes[0] if result.episodes else None
cols = st.columns(5)
cols[0].metric("steps", f"{result.signals.height}")
cols[1].metric(f"peak {name}", fmt_num(smoothed_peak(result.signals, name)))
cols[2].metric(f"final {name}", fmt_num(level(result.signals, name, "end")))
cols[3].metric("collapse onset", "none" if e0 is None else f"step {e0.onset_step}")
cols[4].metric("collapsed turns at end", fmt_pct(level(result.signals, "turn_state/collapsed", "end")))

with ui.section("The reward and turn-state figure"):
    st.subheader("Reward, accuracy and turn states")
    ui.plot(overview_figure(result), "", key="overview_fig")

with ui.section("The key-signal figure"):
    st.subheader("Key signals")
    ui.plot(key_signals_figure(result), "", key="signals_fig")

with ui.section("The episode table"):
    st.subheader("Collapse episodes")
    if not result.episodes:
        st.info("No collapse episode in this run.")
    else:
        rows = []
        for i, e in enumerate(result.episodes, start=1):
            top = e.implicated[0] if e.implicated else None
            rows.append({
                "episode": i, "signal": e.signal, "onset": e.onset_step, "detected": e.detected_step,
                "trough": e.trough_step, "recovery": e.recovery_step, "end": e.end_step,
                "before → trough": f"{fmt_num(e.pre_level)} → {fmt_num(e.trough_value)}",
                "drop": fmt_pct(e.relative_drop), "collapsed turns at trough": fmt_pct(e.collapsed_share_at_trough),
                "first mover": e.leading[0].signal if e.leading else "—",
                "implicated token": f"{token_label(top.token, top.text)} @ {top.context}" if top else "—",
            })
        st.dataframe(pl.DataFrame(rows), hide_index=True)
        st.caption("Details, onset ordering and rollouts: Episode explorer.")

with ui.section("The pathology list"):
    if result.pathologies:
        st.subheader("Pathologies")
        st.dataframe(pl.DataFrame([p.to_dict() for p in result.pathologies]), hide_index=True)

if result.notes:
    with st.expander(f"notes ({len(result.notes)})", expanded=False):
        for n in result.notes:
            st.text(n)
if issues:
    with st.expander(f"issues: {issues_summary(len(issues))}", expanded=False):
        for i in issues[:200]:
            st.text(str(i))
