"""Statistics of the evaluation protocol."""

import math

import numpy as np

from alignbench.evaluation import best_of_n_kl, bootstrap_ci, distinct_n
from alignbench.judges import preference_from_scores


def test_bootstrap_interval_covers_the_true_win_rate_at_its_nominal_rate():
    rng = np.random.default_rng(0)
    true_p, n, trials, covered = 0.6, 400, 300, 0
    for t in range(trials):
        # win = 1, loss = 0, tie = 1/2, as the protocol counts them
        outcomes = rng.choice([1.0, 0.0, 0.5], size=n, p=[0.5, 0.3, 0.2])
        mean, low, high = bootstrap_ci(outcomes, n_boot=500, seed=t)
        covered += low <= true_p <= high
        assert low <= mean <= high
    coverage = covered / trials
    assert 0.91 <= coverage <= 0.99, coverage  # nominal 0.95, +-3 standard errors


def test_bootstrap_interval_width_matches_the_normal_approximation():
    x = np.random.default_rng(1).integers(0, 2, size=2048).astype(float)
    mean, low, high = bootstrap_ci(x, n_boot=2000, seed=0)
    half_width = 1.96 * math.sqrt(mean * (1 - mean) / len(x))
    assert abs((high - low) / 2 - half_width) < 0.003  # 0/1 outcomes; ties (1/2) narrow it further


def test_ties_count_one_half():
    assert list(preference_from_scores([1.0, 0.2, 0.5], [0.5, 0.7, 0.5])) == [1.0, 0.0, 0.5]


def test_distinct_2_counts_unique_bigrams():
    assert distinct_n(["a b c", "a b d"], 2) == 3 / 4
    assert distinct_n(["a"], 2) == 0.0


def test_best_of_n_analytic_kl():
    assert best_of_n_kl(1) == 0.0
    assert math.isclose(best_of_n_kl(16), math.log(16) - 15 / 16)


def test_judges_share_one_interface():
    import torch

    from alignbench.judges import GoldJudge, RewardModelJudge
    from alignbench.world import AssistantWorld

    world = AssistantWorld()
    gold = GoldJudge(world)
    prompt = "count from 4 to 9"
    assert gold.prefer(prompt, "4 5 6 7 8 9", "sorry i can not help with that") == 1.0
    assert gold.prefer(prompt, "4 5 6 7 8 9", "4 5 6 7 8 9") == 0.5
    assert gold.score(prompt, "4 5 6 7 8 9") == 1.0

    class FixedProxy:  # a stand-in reward model: longer responses score higher
        def score(self, prompts, responses, harmful=None):
            return torch.tensor([min(0.99, 0.1 * len(r.split())) for r in responses], dtype=torch.float64)

    judge = RewardModelJudge(FixedProxy())
    p_ab = judge.prefer(prompt, "4 5 6", "4")
    assert 0.5 < p_ab < 1 and math.isclose(p_ab + judge.prefer(prompt, "4", "4 5 6"), 1.0, rel_tol=1e-9)
