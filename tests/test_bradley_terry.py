"""The Bradley–Terry fit behind figure 2 recovers known strengths from synthetic comparisons."""

from __future__ import annotations

import numpy as np

from alignbench.analysis.stats import bradley_terry_ranking, fit_bradley_terry


def synthetic_outcomes(theta: np.ndarray, prompts: int, seed: int) -> np.ndarray:
    """[U, M, M] wins: on every prompt each ordered pair (i < j) is compared once, i beating j
    with probability σ(θ_i − θ_j)."""
    rng = np.random.default_rng(seed)
    m = len(theta)
    outcomes = np.zeros((prompts, m, m))
    for i in range(m):
        for j in range(i + 1, m):
            win = rng.random(prompts) < 1 / (1 + np.exp(-(theta[i] - theta[j])))
            outcomes[:, i, j] += win
            outcomes[:, j, i] += ~win
    return outcomes


def test_fit_recovers_known_strengths_up_to_the_gauge():
    theta = np.array([0.0, 0.5, 1.0, -0.7])
    fitted = fit_bradley_terry(synthetic_outcomes(theta, prompts=4000, seed=0).sum(0))
    np.testing.assert_allclose(fitted - fitted[0], theta, atol=0.08)


def test_ranking_intervals_cover_the_true_strengths_relative_to_the_anchor():
    theta = np.array([0.0, 0.5, 1.0, -0.7])
    names = ["sft", "dpo", "ppo", "bad"]
    ranking = bradley_terry_ranking(names, synthetic_outcomes(theta, prompts=2000, seed=1), anchor="sft", n_boot=300, seed=0)
    assert ranking.anchor == "sft" and ranking.strength[0] == 0
    assert np.all(ranking.low <= theta + 1e-9) and np.all(theta <= ranking.high + 1e-9)
    assert np.all(ranking.high - ranking.low < 0.5)  # informative, not vacuous
    # a tie on every prompt is equal strength
    ties = np.full((500, 2, 2), 0.5) * (1 - np.eye(2))
    np.testing.assert_allclose(bradley_terry_ranking(["a", "b"], ties, anchor="a", n_boot=50).strength, [0, 0], atol=1e-6)


def test_ranking_over_seeds_widens_with_the_seeds_disagreement():
    """Two seeds that disagree about which policy is better ([S, U, M, M] outcomes): the two-level
    interval (seeds, then prompts) is wider than one that pools their prompts as if one seed."""
    theta = np.array([0.0, 0.6])
    by_seed = np.stack([synthetic_outcomes(theta, 500, seed=2), synthetic_outcomes(-theta, 500, seed=3), synthetic_outcomes(theta, 500, seed=4)])
    two_level = bradley_terry_ranking(["a", "b"], by_seed, anchor="a", n_boot=300)
    pooled = bradley_terry_ranking(["a", "b"], by_seed.reshape(1500, 2, 2), anchor="a", n_boot=300)
    assert two_level.seeds == 3 and pooled.seeds == 1
    np.testing.assert_allclose(two_level.strength, pooled.strength)
    assert two_level.high[1] - two_level.low[1] > 3 * (pooled.high[1] - pooled.low[1])
