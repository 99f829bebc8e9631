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


def test_a_policy_missing_seeds_leaves_the_ranking_to_the_seeds_every_policy_ran_and_each_cell_to_its_pairs():
    """Three policies at seeds 0-2, the third at seed 0 only (a HeadToHead as compare_policies builds
    it). A replicate drawing none of the third's seeds would have put it at the ridge's 0: the ranking
    is fitted and resampled at seed 0 only, and each win-rate cell over the seeds its pair met at."""
    from alignbench.analysis.head_to_head import HeadToHead

    theta = np.array([0.0, 0.5, 1.0])
    seed_outcomes = np.stack([synthetic_outcomes(theta, 300, seed=s) for s in (5, 6, 7)])
    seed_outcomes[1:, :, 2, :] = seed_outcomes[1:, :, :, 2] = 0  # the third policy ran at seed 0 only
    seed_counts = seed_outcomes + np.swapaxes(seed_outcomes, -1, -2)
    h2h = HeadToHead(["a", "b", "c"], seed_outcomes.sum(0), seed_counts.sum(0), seed_outcomes, seed_counts, (0, 1, 2))
    assert h2h.ranking_seeds() == [0] and h2h.connected()
    np.testing.assert_array_equal(h2h.seeds_met(), [[0, 3, 1], [3, 0, 1], [1, 1, 0]])
    ranking = h2h.ranking("a", n_boot=200)
    at_seed_0 = bradley_terry_ranking(["a", "b", "c"], seed_outcomes[:1], anchor="a", n_boot=200)
    assert ranking.seeds == 1
    np.testing.assert_array_equal(ranking.strength, at_seed_0.strength)
    np.testing.assert_array_equal(ranking.low, at_seed_0.low)
    low, high = h2h.win_rate_intervals(n_boot=200)
    ab = HeadToHead(["a", "b"], seed_outcomes.sum(0)[:, :2, :2], seed_counts.sum(0)[:, :2, :2], seed_outcomes[:, :, :2, :2], seed_counts[:, :, :2, :2], (0, 1, 2))
    ac = HeadToHead(["a", "c"], seed_outcomes[0][:, [0, 2]][:, :, [0, 2]], seed_counts[0][:, [0, 2]][:, :, [0, 2]],
                    seed_outcomes[:1, :, [0, 2]][:, :, :, [0, 2]], seed_counts[:1, :, [0, 2]][:, :, :, [0, 2]], (0,))
    for pair, alone in (((0, 1), ab), ((0, 2), ac)):
        alone_low, alone_high = alone.win_rate_intervals(n_boot=200)
        assert (low[pair], high[pair]) == (alone_low[0, 1], alone_high[0, 1])
    # where no seed has every policy there is no ranking
    seed_counts[0, :, 2, :] = seed_counts[0, :, :, 2] = seed_counts[1, :, 1, :] = seed_counts[1, :, :, 1] = 0
    seed_counts[1, :, 2, 0] = seed_counts[1, :, 0, 2] = 1  # c met a at seed 1 instead, where b did not run
    apart = HeadToHead(["a", "b", "c"], seed_outcomes.sum(0), seed_counts.sum(0), seed_outcomes, seed_counts, (0, 1, 2))
    assert apart.ranking_seeds() == [] and not apart.connected()
