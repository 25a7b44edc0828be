"""Token viewer: one rollout's tokens coloured by probability or entropy, control tokens marked,
the control-token probabilities at each position on hover. Only that rollout's token rows are
read (a step-filtered lazy scan) and sent to the page."""

import streamlit as st

from dashboards import data, ui
from diagnose.figures import token_strip_figure
from diagnose.scan.html import highlight
from diagnose.scan.formatting import implicated_texts

st.title("Token viewer")
entry = ui.selected_run_or_stop()
src = ui.value_or_stop(data.load_source(entry.path), "This run cannot be read")
if src.tokens is None:
    why = " ".join(n for n in src.notes if "token" in n.lower())
    st.info(f"This run ({src.format}) has no token traces, so there is nothing to show here. {why}".strip())
    st.stop()

path, stamp = str(entry.path), data.run_stamp(entry.path)
steps = data.cached_table_steps(path, stamp, "tokens")
if not steps:
    st.info("The token table of this run is empty.")
    st.stop()
target = st.session_state.pop(ui.TOKEN_TARGET_KEY, None)
if target and target[0] == entry.rel and target[1] in steps:
    st.session_state["tok_step"] = target[1]
elif st.session_state.get("tok_step") not in steps:
    res = data.load_scan(entry.path)
    onset = res.value.episodes[0].trough_step if res.ok and res.value.episodes else None
    st.session_state["tok_step"] = next((s for s in steps if onset is not None and s >= onset), steps[-1])

c1, c2, c3 = st.columns([1, 3, 2])
step = c1.selectbox("step", steps, key="tok_step")
counts = data.cached_token_counts(path, stamp, step)
ids = counts.get_column("sample_id").to_list() if counts.height else []
if not ids:
    st.info(f"No token rows at step {step}.")
    st.stop()
rolls = data.cached_rollouts_at(path, stamp, step, None, False)
meta = {r["sample_id"]: r for r in rolls.iter_rows(named=True)} if rolls.height else {}
n_tok = dict(zip(ids, counts.get_column("n_tokens").to_list()))


def describe(sid):
    r = meta.get(sid, {})
    states = r.get("turn_states") or []
    reward = r.get("reward")
    rw = f"reward {reward:.2f} · " if isinstance(reward, float) else ""
    return f"sample {sid} · {rw}{n_tok.get(sid, 0)} gen. tokens · {', '.join(states) or '—'}"


if target and target[0] == entry.rel and target[2] in ids:
    st.session_state["tok_sample"] = target[2]
elif st.session_state.get("tok_sample") not in ids:
    collapsed = [s for s in ids if "collapsed" in (meta.get(s, {}).get("turn_states") or [])]
    st.session_state["tok_sample"] = (collapsed or ids)[0]
sample = c2.selectbox("rollout", ids, key="tok_sample", format_func=describe)
color_by = c3.radio("colour by", ["probability", "entropy"], key="tok_color", horizontal=True)

rows = data.cached_token_rows(path, stamp, step, sample)
if rows.height == 0:
    st.info("No token rows for this rollout.")
    st.stop()
texts = data.cached_decode(path, stamp, tuple(sorted(set(rows.get_column("token_id").to_list()))))
col = "logprob" if color_by == "probability" else "entropy"
if col not in rows.columns or rows.get_column(col).null_count() == rows.height:
    st.info(f"This run has no {'log-probs' if col == 'logprob' else 'entropies'} in its token table: "
            "tokens are shown uncoloured.")
if not src.control_tokens:
    st.info("No control tokens are known for this run (no `lp_ctrl_<name>` columns): hovering shows the token only.")
if data.find_tokenizer_file(entry.path) is None:
    st.caption("No tokenizer.json saved with this run: ordinary tokens are shown by id (⟨id⟩), control tokens by text.")
if rows.height >= data.MAX_TOKENS_SHOWN:
    st.caption(f"Showing the first {data.MAX_TOKENS_SHOWN} tokens of this rollout.")

with ui.section("The token text"):
    st.html(ui.token_html(rows, texts, src.control_tokens, color_by))
with ui.section("The token figure"):
    res = data.load_scan(entry.path)
    top = [t.token for ep in res.value.episodes for t in ep.implicated][:2] if res.ok else []
    ui.plot(token_strip_figure(rows, texts, src.control_tokens, color_by, highlight=top), "", key="token_fig")
r = meta.get(sample)
if r is not None:
    full = data.cached_rollouts_at(path, stamp, step, (int(sample),), True)
    if full.height and "completion" in full.columns:
        with st.expander("rollout text", expanded=False):
            res = data.load_scan(entry.path)
            st.html(f'<pre class="dg-rollout">{highlight(full.get_column("completion")[0], implicated_texts(res.value) if res.ok else [])}</pre>')
