import torch

from diagnose.model.logits import token_stats
from train_minimal.losses import grpo_loss, group_advantages, sft_loss


def test_group_advantages_zero_mean_per_group():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(r, 4)
    assert torch.allclose(adv.view(2, 4).mean(1), torch.zeros(2), atol=1e-6)
    assert torch.all(adv[4:] == 0)  # no signal in a uniform group
    assert adv[0] > 0 > adv[1]


def test_token_stats_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    ctrl = torch.tensor([3, 7])
    st = token_stats(logits, targets, ctrl)
    ls = torch.log_softmax(logits, -1)
    assert torch.allclose(st.logprob, ls.gather(-1, targets[..., None])[..., 0], atol=1e-5)
    assert torch.allclose(st.ctrl_logprob, ls[..., [3, 7]], atol=1e-5)
    assert torch.allclose(st.entropy, -(ls.exp() * ls).sum(-1), atol=1e-5)


def test_grpo_loss_on_policy_gradient_is_advantage_weighted_logprob():
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -0.3]], requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    st = grpo_loss(lp, lp.detach(), adv, mask, epsilon=0.2, epsilon_high=0.2)
    st.loss.backward()
    # on-policy ratio = 1: d loss / d lp = -adv / n_tokens
    assert torch.allclose(lp.grad, torch.tensor([[-0.25, -0.25], [0.25, 0.25]]))
    assert st.clip_ratio == 0.0


def test_grpo_loss_clips_large_ratio():
    old = torch.zeros(1, 3)
    lp = torch.tensor([[1.0, 0.0, 0.0]], requires_grad=True)  # ratio e on first token
    st = grpo_loss(lp, old, torch.tensor([1.0]), torch.ones(1, 3), epsilon=0.2, epsilon_high=0.2)
    st.loss.backward()
    assert lp.grad[0, 0] == 0  # clipped: no gradient beyond 1 + eps for positive advantage
    assert abs(st.clip_ratio - 1 / 3) < 1e-6


def test_kl_k3_nonnegative_and_zero_at_reference():
    lp = torch.randn(2, 4)
    st0 = grpo_loss(lp, lp, torch.zeros(2), torch.ones(2, 4), epsilon=0.2, epsilon_high=0.2, ref_logprob=lp, beta=0.1)
    assert st0.kl == 0.0
    st1 = grpo_loss(lp, lp, torch.zeros(2), torch.ones(2, 4), epsilon=0.2, epsilon_high=0.2, ref_logprob=lp + 0.5, beta=0.1)
    assert st1.kl > 0


def test_off_policy_rows_use_shaped_weight():
    lp = torch.log(torch.tensor([[0.1, 0.9]])).requires_grad_()
    st = grpo_loss(lp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), epsilon=0.2,
                   epsilon_high=0.2, off_policy=torch.tensor([True]), gamma=0.1)
    st.loss.backward()
    # d/dlp of -p/(p+g) * A / 2 = -A/2 * g p / (p+g)^2: largest at p = gamma, small for confident tokens
    g = lp.grad[0]
    assert g[0] < 0 and g[1] < 0 and abs(g[0]) > abs(g[1])


def test_sft_loss_masks_prompt():
    lp = torch.tensor([[-5.0, -1.0]])
    assert sft_loss(lp, torch.tensor([[0.0, 1.0]])).item() == 1.0
