import torch

from diagnose.control_tokens import ControlToken, ControlTokenRegistry
from diagnose.model.ctrl_probe import label_contexts
from diagnose.model.logits import token_stats
from diagnose.model.sequences import Sequence
from train_minimal.batch import make_batch
from train_minimal.instrument import Attribution


def test_attribution_equals_the_policy_gradient_on_control_logits():
    """Σ_t A (1[k=y] - p_k) / |resp|, averaged over samples, is minus the gradient of the
    per-sample-normalised policy-gradient loss with respect to control token k's logits."""
    torch.manual_seed(0)
    V, ctrl = 12, [3, 7]
    reg = ControlTokenRegistry(tuple(ControlToken(f"t{i}", f"<{i}>", i, r)
                                     for i, r in zip(ctrl, ("turn_end", "call_open"))))
    seqs = []
    for n in (9, 6, 11):
        s = Sequence()
        ids = torch.randint(0, V, (n,)).tolist()
        ids[5] = 3  # make sure a control token is sampled somewhere
        s.add(ids[:3], train=False, turn=-1)
        s.add(ids[3:], train=True, turn=0, logprobs=[0.0] * (n - 3))
        seqs.append(s)
    batch = make_batch(seqs, pad_id=0)
    adv = torch.tensor([1.0, -0.5, -2.0])
    logits = torch.randn(3, batch.ids.shape[1] - 1, V, requires_grad=True)
    st = token_stats(logits, batch.ids[:, 1:], torch.tensor(ctrl))
    n_resp = batch.loss_mask.sum(1)
    loss = -(adv[:, None] * batch.loss_mask * st.logprob / n_resp[:, None]).sum() / 3
    loss.backward()
    attr = Attribution(reg)
    attr.add(batch, st, adv)
    m = attr.metrics()
    for k, tok in enumerate(ctrl):
        expected = -float(logits.grad[..., tok].sum())
        assert abs(m[f"attribution/t{tok}/total"] - expected) < 1e-5
        assert abs(m[f"attribution/t{tok}/self"] + m[f"attribution/t{tok}/other"] - expected) < 1e-5
    # a token pushed down where it was sampled with negative advantage has a negative self part
    assert m["attribution/t3/self"] != 0


def test_label_contexts_longest_suffix_and_next_token_rule():
    ids = [1, 2, 3, 9, 4, 5, 6, 7]
    pats = {"short": [3], "long": [2, 3]}
    labels = label_contexts(ids, pats, before_close=7)
    assert labels[2] == "long"  # the longer pattern ending at 2 wins
    assert labels[6] == "after_call_body"  # next token is the call close
    assert labels[0] == labels[4] == ""


def test_probe_scores_equal_a_full_forward_pass(tiny_model_dir):
    """run_probe scores only the positions from the earliest probed one on (the prompt's logits
    are not computed); each row must still equal the full forward pass's log-probabilities."""
    from diagnose.model.ctrl_probe import build_probe_set, run_probe
    from diagnose.tasks import make_tasks
    from diagnose.model.resolve import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    reg = ControlTokenRegistry.from_tokenizer(tok)
    probe = build_probe_set(tok, make_tasks("test", 3))
    frame = run_probe(model, probe, reg, step=7)
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=probe.ids, attention_mask=probe.attention).logits.float(), -1)
    rows = torch.from_numpy(frame["probe_id"].to_numpy().astype("int64"))
    pos = torch.from_numpy(frame["position"].to_numpy().astype("int64"))
    gold = probe.ids[rows, pos + 1]
    want = full[rows, pos, gold].numpy()
    assert len(frame) == sum(n - 1 - s for s, n in zip(probe.start, probe.length))
    assert abs(frame["lp_gold"].to_numpy() - want).max() < 1e-4
    name = reg.names[0]
    want_ctrl = full[rows, pos, reg.ids[0]].numpy()
    assert abs(frame[f"lp_ctrl_{name}"].to_numpy() - want_ctrl).max() < 1e-4


def test_push_at_a_context_is_the_raw_policy_gradient_there():
    """`logit_push(per_token=False)` at a context mask (the call-open positions, found by
    `after_sequence` for a multi-token marker) is minus the gradient of -Σ A log p(y) restricted
    to those positions, with respect to the control token's logit."""
    from diagnose.model.attribution import after_sequence, logit_push

    torch.manual_seed(1)
    V, end = 10, 2
    ids = torch.tensor([[5, 6, 7, 2, 5, 6, 7, 8, 1], [4, 5, 6, 7, 8, 5, 6, 7, 2]])
    ctx = after_sequence(ids, [5, 6, 7])
    assert ctx.nonzero().tolist() == [[0, 3], [0, 7], [1, 4], [1, 8]]  # the token chosen right after 5 6 7
    adv = torch.tensor([0.5, -1.5])
    logits = torch.randn(2, ids.shape[1], V, requires_grad=True)
    st = token_stats(logits, ids, torch.tensor([end]))
    loss = -(adv[:, None] * ctx * st.logprob).sum()
    loss.backward()
    s, o = logit_push(ids, st.ctrl_logprob, ctx, adv, torch.tensor([end]), per_token=False)
    assert abs(float(s[0] + o[0]) + float(logits.grad[..., end].sum())) < 1e-5
    # token 2 was sampled at [0, 3] (A = +0.5) and [1, 8] (A = -1.5): the self part; elsewhere the other part
    p = st.ctrl_logprob[..., 0].detach().exp()
    assert abs(float(s[0]) - (0.5 * (1 - p[0, 3]) - 1.5 * (1 - p[1, 8]))) < 1e-6
    assert abs(float(o[0]) - (-0.5 * p[0, 7] + 1.5 * p[1, 4])) < 1e-6
