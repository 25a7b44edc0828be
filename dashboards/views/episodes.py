"""Episode explorer: per collapse episode, the onset ordering with lead times, the implicated
tokens, and rollouts before and after the onset side by side (each one click from the token
viewer)."""

import polars as pl
import streamlit as st

from dashboards import data, ui
from diagnose.figures import onset_order_figure
from diagnose.scan.formatting import fmt_num, fmt_pct, fmt_prob, implicated_texts, token_label

st.title("Episode explorer")
entry, result = ui.run_and_scan_or_stop()
if not result.episodes:
    st.info(f"No collapse episode in this run (verdict: {result.verdict}).")
    st.stop()

eps = result.episodes
idx = st.selectbox("episode", list(range(len(eps))), key="episode",
                   format_func=lambda i: f"episode {i + 1}: onset step {eps[i].onset_step}, trough {eps[i].trough_step}"
                                         + (f", recovered at {eps[i].recovery_step}" if eps[i].recovered else ""))
e = eps[idx]
c = st.columns(6)
c[0].metric("onset", e.onset_step)
c[1].metric("detected", e.detected_step)
c[2].metric("trough", e.trough_step)
c[3].metric("recovery", "—" if e.recovery_step is None else e.recovery_step)
c[4].metric(f"{e.signal} drop", fmt_pct(e.relative_drop), f"{fmt_num(e.pre_level)} → {fmt_num(e.trough_value)}",
            delta_color="off", delta_arrow="off")
c[5].metric("collapsed turns at trough", fmt_pct(e.collapsed_share_at_trough))

with ui.section("The onset-ordering figure"):
    st.subheader("What moved, in order")
    ui.plot(onset_order_figure(e, idx + 1), "No signal moved around this onset.", key="order_fig")
    if e.moves:
        st.dataframe(pl.DataFrame([{
            "signal": m.signal, "change step": m.step, "lead (steps before the onset)": m.lead,
            "direction": m.direction, "before → after": f"{fmt_num(m.before, 3)} → {fmt_num(m.after, 3)}",
            "shift (σ)": round(m.score, 1), "detector": m.method, "concerning": m.concern} for m in e.moves]),
            hide_index=True, height=260)

with ui.section("The implicated-token list"):
    if e.implicated:
        st.subheader("Implicated control tokens")
        for t in e.implicated[:5]:
            parts = [f"p({token_label(t.token, t.text)} | {x.context}) {fmt_prob(x.before)} → {fmt_prob(x.after)} "
                     f"({x.source}" + (f", moved at step {x.step}, lead {x.lead}" if x.step is not None else "") + ")"
                     for x in t.contexts[:4]]
            st.markdown(f"- **{token_label(t.token, t.text)}**: " + "; ".join(parts))

st.subheader("Rollouts before and after the onset")
stamp = data.run_stamp(entry.path)
src = data.load_source(entry.path)
roll_steps = data.cached_table_steps(str(entry.path), stamp, "rollouts")
tok_steps = set(data.cached_table_steps(str(entry.path), stamp, "tokens"))
extra = implicated_texts(result)
if not roll_steps:
    st.info("This run has no rollout table: the examples below are the scan's excerpts only.")
n = st.slider("rollouts per side", 1, 8, 3, key="ep_n")


def side(title, examples, steps, default, key):
    st.markdown(f"**{title}**")
    if not steps:
        for x in examples[:n]:
            st.html(ui.rollout_html({**x.to_dict(), "completion": x.excerpt}, extra))
        if not examples:
            st.info("no rollouts")
        return
    step = st.selectbox("step", steps, index=steps.index(default) if default in steps else 0, key=key)
    df = data.cached_rollouts_at(str(entry.path), stamp, step)
    if df.height == 0:
        st.info(f"no rollouts at step {step}")
        return
    first = [x.sample_id for x in examples if x.step == step]
    order = first + [s for s in df.get_column("sample_id").to_list() if s not in first]
    by_id = {r["sample_id"]: r for r in df.iter_rows(named=True)}
    for sid in order[:n]:
        st.html(ui.rollout_html(by_id[sid], extra))
        if step in tok_steps:
            ui.open_in_token_viewer(entry, step, sid, key=f"{key}_open_{step}_{sid}")


before_steps = [s for s in roll_steps if s < e.onset_step] or roll_steps
after_steps = [s for s in roll_steps if s >= e.onset_step] or roll_steps
b_default = e.examples_before[0].step if e.examples_before else (before_steps[-1] if before_steps else None)
a_default = e.examples_after[0].step if e.examples_after else e.trough_step
left, right = st.columns(2)
with left, ui.section("The rollouts before the onset"):
    side("before the onset", e.examples_before, before_steps, b_default, f"ep_before_{idx}")
with right, ui.section("The rollouts after the onset"):
    side("after the onset", e.examples_after, after_steps, a_default, f"ep_after_{idx}")
