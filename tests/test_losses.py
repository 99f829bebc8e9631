"""The objectives against hand-computed values."""

import math

import torch

from alignbench.methods.dpo import dpo_loss
from alignbench.reward import fit_calibration, ranking_loss


def test_dpo_loss_is_log2_at_zero_margin():
    x = torch.tensor([-3.0, -7.5])
    loss, chosen, rejected, _ = dpo_loss(x, x + 1.0, x, x + 1.0, beta=0.1)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    assert torch.equal(chosen - rejected, torch.zeros(2))


def test_dpo_loss_matches_hand_values():
    # pair 1: chosen logratio 1.0 - (-1.0) = ... worked by hand:
    # beta=0.5; chosen: pi=-2, ref=-3 -> r_c=0.5; rejected: pi=-4, ref=-3 -> r_r=-0.5; logit 1.0
    # pair 2: chosen: pi=-5, ref=-4 -> r_c=-0.5; rejected: pi=-1, ref=-2 -> r_r=0.5; logit -1.0
    loss, chosen, rejected, _ = dpo_loss(torch.tensor([-2.0, -5.0]), torch.tensor([-4.0, -1.0]), torch.tensor([-3.0, -4.0]), torch.tensor([-3.0, -2.0]), beta=0.5)
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0))) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert torch.allclose(chosen, torch.tensor([0.5, -0.5])) and torch.allclose(rejected, torch.tensor([-0.5, 0.5]))


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([-3.0], requires_grad=True)
    rejected = torch.tensor([-3.0], requires_grad=True)
    loss = dpo_loss(chosen, rejected, torch.tensor([-3.0]), torch.tensor([-3.0]), beta=0.1).loss
    loss.backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descent raises log pi(y_w), lowers log pi(y_l)
    assert math.isclose(chosen.grad.item(), -0.05, rel_tol=1e-6)  # -beta * sigma(0)


def test_ranking_loss_of_a_k4_ranking_is_the_mean_over_its_six_pairs():
    r = torch.tensor([2.0, 1.0, 0.5, -1.0])  # rewards of a ranking y1 > y2 > y3 > y4
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    chosen = torch.stack([r[i] for i, _ in pairs])
    rejected = torch.stack([r[j] for _, j in pairs])
    loss, _ = ranking_loss(chosen, rejected, torch.zeros(6, dtype=torch.long), 1)
    hand = sum(math.log(1 + math.exp(-(r[i] - r[j]).item())) for i, j in pairs) / 6
    assert math.isclose(loss.item(), hand, rel_tol=1e-6)


def test_ranking_loss_averages_each_prompt_first():
    # prompt 0 has one pair (loss log 2), prompt 1 has three identical pairs with margin 1
    chosen = torch.tensor([0.0, 1.0, 1.0, 1.0])
    rejected = torch.zeros(4)
    loss, _ = ranking_loss(chosen, rejected, torch.tensor([0, 1, 1, 1]), 2)
    expected = (math.log(2) + math.log(1 + math.exp(-1.0))) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_soft_label_ranking_loss_is_the_cross_entropy_with_the_judges_probability():
    # z = 1.0 - 0.0 = 1; y = 0.8: -(0.8 log s(1) + 0.2 log s(-1)); y = 1 is the hard-label loss.
    chosen, rejected, group = torch.tensor([1.0]), torch.tensor([0.0]), torch.zeros(1, dtype=torch.long)
    soft, _ = ranking_loss(chosen, rejected, group, 1, label=torch.tensor([0.8]))
    hand = 0.8 * math.log(1 + math.exp(-1.0)) + 0.2 * math.log(1 + math.exp(1.0))
    assert math.isclose(soft.item(), hand, rel_tol=1e-6)
    hard, _ = ranking_loss(chosen, rejected, group, 1, label=torch.tensor([1.0]))
    assert math.isclose(hard.item(), ranking_loss(chosen, rejected, group, 1)[0].item(), rel_tol=1e-7)
    # y = 1/2 is minimised where the two rewards are equal
    even = torch.tensor([0.3], requires_grad=True)
    ranking_loss(even, torch.tensor([0.3]), group, 1, label=torch.tensor([0.5]))[0].backward()
    assert abs(even.grad.item()) < 1e-7


def test_llama2_margin_shifts_the_logit_by_m():
    chosen, rejected = torch.tensor([1.5]), torch.tensor([0.5])
    group = torch.zeros(1, dtype=torch.long)
    for m in (0.0, 1 / 3, 2 / 3, 1.0):
        loss, _ = ranking_loss(chosen, rejected, group, 1, margin=torch.tensor([m]))
        assert math.isclose(loss.item(), math.log(1 + math.exp(-(1.0 - m))), rel_tol=1e-6)
    # a larger margin means a larger loss for the same scores: the RM must separate more
    low, _ = ranking_loss(chosen, rejected, group, 1, margin=torch.tensor([0.0]))
    high, _ = ranking_loss(chosen, rejected, group, 1, margin=torch.tensor([1.0]))
    assert high > low


def test_platt_calibration_recovers_a_known_logistic_map():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(20000, generator=g, dtype=torch.float64) * 2
    labels = (torch.rand(20000, generator=g, dtype=torch.float64) < torch.sigmoid(1.5 * scores - 0.7)).double()
    a, b = fit_calibration(scores, labels)
    assert abs(a - 1.5) < 0.1 and abs(b + 0.7) < 0.1


def test_platt_calibration_stays_finite_and_right_on_poorly_scaled_or_separable_scores():
    """Plain Newton from (1, 0) diverged on the world's safety scores (a ≈ 1e7); the fit must not."""
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(20000, generator=g, dtype=torch.float64) * 6 - 3  # raw RM scores: wide, off-centre
    labels = (torch.rand(20000, generator=g, dtype=torch.float64) < torch.sigmoid(0.3 * scores + 1.2)).double()
    a, b = fit_calibration(scores, labels)
    assert abs(a - 0.3) < 0.03 and abs(b - 1.2) < 0.1
    separable = torch.tensor([-3.0, -2.0, -1.5, 0.5, 1.0, 4.0], dtype=torch.float64)
    a, b = fit_calibration(separable, (separable > 0).double())
    assert 0 < a < 1e3 and abs(b) < 1e3
    assert torch.equal(torch.sigmoid(a * separable + b) > 0.5, separable > 0)
