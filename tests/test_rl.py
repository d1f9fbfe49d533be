"""PPO's pure pieces against values derived by hand."""

import math

import pytest
import torch

from ser.rl import (AdaptiveKLController, entropy_from_logits, gae, kl_estimates, masked_mean, policy_loss,
                    shape_score, token_rewards, value_loss, whiten)


def test_gae_hand_derived_with_padding():
    # one row of 3 response tokens then 1 pad; gamma = 1, lambda = 0.5
    r = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    v = torch.tensor([[0.5, 0.25, 0.5, 7.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.5)
    # deltas: t2 = 1 + 0 - 0.5 = 0.5; t1 = 0 + 0.5 - 0.25 = 0.25; t0 = 0 + 0.25 - 0.5 = -0.25
    # A2 = 0.5; A1 = 0.25 + 0.5 * 0.5 = 0.5; A0 = -0.25 + 0.5 * 0.5 = 0.0
    assert torch.allclose(adv, torch.tensor([[0.0, 0.5, 0.5, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.5, 0.75, 1.0, 0.0]]))  # A + V on the response, 0 on padding


def test_gae_discount_and_two_rows():
    r = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    v = torch.zeros(2, 2)
    m = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv, _ = gae(r, v, m, gamma=0.5, lam=1.0)
    # row 0: A1 = 1, A0 = 1 + 0.5 * 1 = 1.5; row 1 ends at t0: A0 = 2
    assert torch.allclose(adv, torch.tensor([[1.5, 1.0], [2.0, 0.0]]))


def test_token_rewards_put_the_score_on_the_last_response_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    out = token_rewards(torch.tensor([2.0, -1.0]), kl, m, kl_coef=0.5)
    assert torch.allclose(out, torch.tensor([[-0.05, -0.1, -0.15 + 2.0], [-0.2 - 1.0, 0.0, 0.0]]))


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    k = kl_estimates(logp, ref)
    lr = math.log(2.0)  # log p - log q
    assert k["k1"].item() == pytest.approx(lr)
    assert k["k2"].item() == pytest.approx(0.5 * lr**2)
    assert k["k3"].item() == pytest.approx(0.5 - 1 + lr)  # q/p - 1 - log(q/p) = 0.5 - 1 + log 2
    assert torch.all(kl_estimates(torch.randn(100), torch.randn(100))["k3"] >= 0)


def test_clipped_policy_loss():
    adv = torch.tensor([1.0, 1.0, -1.0])
    old = torch.zeros(3)
    logp = torch.log(torch.tensor([1.5, 0.9, 0.5]))  # ratios 1.5, 0.9, 0.5
    loss, frac = policy_loss(logp, old, adv, torch.ones(3), clip=0.2)
    # A>0, r=1.5: max(-1.5, -1.2) = -1.2 (clipped); r=0.9: max(-0.9, -0.9) = -0.9; A<0, r=0.5: max(0.5, 0.8) = 0.8
    assert loss.item() == pytest.approx((-1.2 - 0.9 + 0.8) / 3)
    assert frac.item() == pytest.approx(2 / 3)


def test_clipped_value_loss():
    v, old, ret = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.1])
    loss, frac = value_loss(v, old, ret, torch.ones(2), clip=0.2)
    # token 0: unclipped (1-1)^2 = 0, clipped v = 0.2: (0.2-1)^2 = 0.64 -> 0.64; token 1: both 0.01
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.01) / 2)
    assert frac.item() == pytest.approx(0.5)


def test_adaptive_kl_controller():
    c = AdaptiveKLController(0.2, target=6.0, horizon=100)
    # KL 12 -> error clipped to +0.2 -> beta * (1 + 0.2 * 10 / 100) = 0.2 * 1.02
    assert c.update(12.0, 10) == pytest.approx(0.204)
    # KL 5.4 -> error -0.1 -> * (1 - 0.1 * 50 / 100)
    assert c.update(5.4, 50) == pytest.approx(0.204 * 0.95)
    assert AdaptiveKLController(0.1, target=None).update(100.0, 10) == 0.1


def test_whiten_and_masked_mean():
    x, m = torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 0.0])
    assert masked_mean(x, m).item() == 2.0
    assert torch.allclose(whiten(x, m), torch.tensor([-1.0, 1.0, 0.0]), atol=1e-4)
    assert torch.allclose(whiten(x, m, shift_mean=False), torch.tensor([1.0, 3.0, 0.0]), atol=1e-4)


def test_padding_never_reaches_a_loss_or_its_gradient():
    """A non-finite value past the EOS (padding) changes no loss, return or gradient: the mask selects it away
    (with x * mask, inf * 0 = NaN would end the run). Row: 2 response tokens, then 1 padded."""
    m = torch.tensor([[1.0, 1.0, 0.0]])
    logp = torch.tensor([[math.log(1.5), 0.0, 1000.0]], requires_grad=True)  # exp(1000 - 0) overflows
    old, adv = torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 5.0]])
    loss, frac = policy_loss(logp, old, adv, m, clip=0.2)
    loss.backward()
    assert loss.item() == pytest.approx((-1.2 - 1.0) / 2) and frac.item() == 0.5  # as without the padded token
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0.0
    assert masked_mean(torch.tensor([[1.0, 3.0, math.inf]]), m).item() == 2.0
    rewards = token_rewards(torch.tensor([2.0]), torch.tensor([[0.5, 0.5, math.inf]]), m, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 1.95, 0.0]]))
    assert whiten(torch.tensor([[1.0, 3.0, math.nan]]), m)[0, 2] == 0.0
    adv, ret = gae(rewards, torch.tensor([[0.0, 0.0, math.nan]]), m)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all() and ret[0, 2] == 0.0


def test_entropy_and_score_shaping():
    assert entropy_from_logits(torch.zeros(1, 1, 4)).item() == pytest.approx(math.log(4))
    s = torch.tensor([0.0, 2.0])
    assert torch.allclose(shape_score(s, "sigmoid"), torch.tensor([0.0, 1 / (1 + math.exp(-2)) - 0.5]))
    assert torch.allclose(shape_score(s, "normalize", mean=1.0, std=2.0), torch.tensor([-0.5, 0.5]))
    out = shape_score(s, "normalize", mean=1.0, std=2.0, ended=torch.tensor([True, False]), no_eos_penalty=1.0)
    assert torch.allclose(out, torch.tensor([-0.5, -0.5]))
