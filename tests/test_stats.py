"""The statistics of analysis/stats.py against hand values and simulations: the two-level
bootstrap (its coverage when seed variance dominates, its closed-form variance), Holm's
adjustment, the frontier interpolation and Gao et al.'s fits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignbench.analysis.stats import (
    fit_gao,
    gao_curve,
    holm,
    interpolate_at,
    replicate_interval,
    replicate_p_value,
    student_t_quantile,
    two_level_indices,
    two_level_interval,
    two_level_replicates,
    two_level_variance,
    two_level_weights,
)


def _coverage(experiments: np.ndarray, truth: float, n_boot: int) -> tuple[float, float]:
    """Coverage of the two-level interval and of the prompt-only bootstrap (every seed's prompts
    pooled and resampled as if one seed) over simulated experiments [E, S, P]."""
    e, s, p = experiments.shape
    two_level = prompt_only = 0
    for start in range(0, e, 100):  # chunks keep the [E, B, S, P] gather small
        chunk = experiments[start : start + 100]
        replicates = two_level_replicates(chunk, n_boot, seed=start)
        pooled = two_level_replicates(chunk.reshape(len(chunk), 1, s * p), n_boot, seed=start)
        for values, reps, pooled_reps in zip(chunk, replicates, pooled):
            interval = replicate_interval(float(values.mean()), reps, s)
            two_level += interval.low <= truth <= interval.high
            low, high = np.quantile(pooled_reps, [0.025, 0.975])
            prompt_only += low <= truth <= high
    return two_level / e, prompt_only / e


def test_two_level_interval_covers_the_true_mean_when_seed_variance_dominates():
    """S = 4 seeds, each shifting every prompt by N(0, 0.05²) (training noise), P = 50 prompts with
    N(0, 0.2²) noise (evaluation): the seeds' spread (0.05) dwarfs that of a seed's prompt mean
    (0.2/√50 = 0.028). Over 1000 simulated experiments the two-level interval covers the true
    mean at >= 93% of its nominal 95%; the prompt-only bootstrap, blind to the seeds, far less."""
    rng = np.random.default_rng(0)
    e, s, p, truth = 1000, 4, 50, 0.6
    experiments = truth + rng.normal(0, 0.05, (e, s, 1)) + rng.normal(0, 0.2, (e, s, p))
    two_level, prompt_only = _coverage(experiments, truth, n_boot=300)
    print(f"coverage of nominal 95%: two-level {two_level:.3f}, prompt-only {prompt_only:.3f}")
    assert two_level >= 0.93
    assert prompt_only < 0.75
    assert two_level - prompt_only > 0.2


@pytest.mark.parametrize("block", [7, 2**20])  # several blocks of draws (a block need not end on a replicate), and one
def test_two_level_replicates_equal_the_means_of_the_drawn_values(monkeypatch, block):
    """The replicates computed from each draw's prompt frequencies (counted a block of draws at a
    time) are the means of the values `two_level_indices` draws, gathered one by one."""
    from alignbench.analysis import stats

    monkeypatch.setattr(stats, "_BINCOUNT_BLOCK", block)
    stats._two_level_frequencies.cache_clear()
    values = np.random.default_rng(3).normal(size=(2, 3, 5))  # two policies, 3 seeds, 5 prompts
    seeds, prompts = two_level_indices(3, 5, n_boot=40, seed=2)
    drawn = values[:, seeds[:, :, None], prompts]  # [2, B, S, P]
    np.testing.assert_allclose(two_level_replicates(values, n_boot=40, seed=2), drawn.mean(axis=(-1, -2)), rtol=1e-12)
    stats._two_level_frequencies.cache_clear()


def test_two_level_bootstrap_matches_its_closed_form():
    """The replicates' variance tends to (1/S)[mean_s (m_s − m̄)² + mean_s v_s / P]; here seed
    means 0, 1, 2 (spread 2/3) and within-seed values ±1 (v_s = 1) with P = 4: (2/3 + 1/4) / 3."""
    values = np.array([[-1, 1, -1, 1], [0, 2, 0, 2], [1, 3, 1, 3]], dtype=float)
    assert two_level_variance(values) == pytest.approx((2 / 3 + 1 / 4) / 3)
    replicates = two_level_replicates(values, n_boot=40000, seed=1)
    assert replicates.mean() == pytest.approx(1.0, abs=0.01)
    assert replicates.var() == pytest.approx(two_level_variance(values), rel=0.03)


def test_two_level_interval_against_its_closed_form_without_prompt_noise():
    """Constant within each seed: the replicates' variance is that of a seed bootstrap,
    mean_s (m_s − m̄)² / S, so the interval is mean ± t_{S−1} · s · √((S−1)/S) / √S, the
    t-interval over the seed means shrunk by √((S−1)/S) (up to Monte Carlo error)."""
    means = np.array([0.55, 0.60, 0.62, 0.58, 0.65])
    values = np.repeat(means[:, None], 30, axis=1)
    interval = two_level_interval(values, n_boot=20000)
    half = student_t_quantile(0.95, 4) * means.std(ddof=1) * math.sqrt(4 / 5) / math.sqrt(5)
    assert half == pytest.approx(student_t_quantile(0.95, 4) * math.sqrt(two_level_variance(values)))
    assert interval.over == "two-level" and interval.n == 5
    assert interval.mean == pytest.approx(means.mean())
    assert interval.half_width == pytest.approx(half, rel=0.03)


def test_one_seed_is_the_percentile_bootstrap_over_prompts():
    values = np.array([[0.0] * 50 + [1.0] * 50])
    interval = two_level_interval(values, n_boot=4000)
    assert interval.over == "prompts" and interval.n == 1
    assert interval.low == pytest.approx(0.5 - 1.96 * 0.05, abs=0.012) and interval.high == pytest.approx(0.5 + 1.96 * 0.05, abs=0.012)


def student_t_central_of(t: float, df: int) -> float:
    from alignbench.analysis.stats import student_t_central

    return student_t_central(t, df)


def test_p_values_match_the_intervals():
    rng = np.random.default_rng(3)
    replicates = rng.normal(0.1, 0.02, 5000)
    interval = replicate_interval(0.1, replicates, n_seeds=3)
    p = replicate_p_value(0.1, replicates, n_seeds=3)
    se = replicates.std(ddof=1)
    assert p == pytest.approx(1 - student_t_central_of(0.1 / se, 2))
    assert (p < 0.05) == (interval.low > 0)
    # at the edge of the interval the p-value is exactly 1 − level
    edge = student_t_quantile(0.95, 2) * se
    assert replicate_p_value(edge, replicates - 0.1 + edge, n_seeds=3) == pytest.approx(0.05, rel=1e-6)
    # one seed: the normal distribution's two tails beyond |estimate| / sd(replicates)
    normal = rng.normal(0.0, 0.01, 20000)
    assert replicate_p_value(0.0196, normal + 0.0196, n_seeds=1) == pytest.approx(math.erfc(0.0196 / normal.std(ddof=1) / math.sqrt(2)))
    assert math.erfc(1.959964 / math.sqrt(2)) == pytest.approx(0.05, rel=1e-5)


def test_holm_against_hand_values():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 -> max so far 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])
    adjusted = holm([0.02, math.nan, 0.01])
    assert math.isnan(adjusted[1]) and adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.02)


def test_two_level_weights_count_the_drawn_cells():
    weights = two_level_weights(3, 20, n_boot=50, seed=0)
    assert weights.shape == (50, 3, 20)
    np.testing.assert_allclose(weights.sum(axis=(1, 2)), 60)  # S draws of U prompts each
    per_seed = weights.sum(axis=2) / 20  # how often each seed was drawn
    np.testing.assert_allclose(per_seed, np.round(per_seed))


def test_frontier_interpolation():
    kl = np.array([1.0, 0.2, 0.5])  # any order: sorted by KL before joining
    gold = np.array([0.8, 0.6, 0.7])
    assert interpolate_at(kl, gold, 0.35) == pytest.approx(0.65)
    assert interpolate_at(kl, gold, 0.75) == pytest.approx(0.75)
    assert interpolate_at(kl, gold, 1.0) == pytest.approx(0.8) and interpolate_at(kl, gold, 0.2) == pytest.approx(0.6)
    assert math.isnan(interpolate_at(kl, gold, 0.1)) and math.isnan(interpolate_at(kl, gold, 1.5))
    batch = interpolate_at(np.array([[0.0, 1.0], [0.0, 2.0]]), np.array([[0.0, 1.0], [0.0, 1.0]]), 0.5)  # replicate by replicate
    np.testing.assert_allclose(batch, [0.5, 0.25])
    # a point whose KL is no finite number (NaN, or an infinite KL) leaves the curve's shape unknown
    for bad in (math.nan, math.inf):
        assert math.isnan(interpolate_at(np.array([0.0, 0.2, 0.6, bad]), np.array([0.5, 0.6, 0.7, 0.9]), 1.0))
        assert math.isnan(interpolate_at(np.array([0.0, 0.2, 0.6, bad]), np.array([0.5, 0.6, 0.7, 0.9]), 0.4))


@pytest.mark.parametrize("form,alpha,beta", [("best_of_n", 0.4, 0.15), ("rl", 0.3, 0.1)])
def test_gao_fit_recovers_known_coefficients(form, alpha, beta):
    d = np.sqrt(np.linspace(0.05, 3.0, 12))
    gain = gao_curve(d, alpha, beta, form)
    fitted = fit_gao(d, gain, form)
    assert fitted[0] == pytest.approx(alpha, abs=1e-10) and fitted[1] == pytest.approx(beta, abs=1e-10)
    rng = np.random.default_rng(0)  # noisy points, 200 independent fits at once
    noisy = gain + rng.normal(0, 0.005, (200, len(d)))
    a, b = fit_gao(np.broadcast_to(d, noisy.shape), noisy, form)
    assert a.mean() == pytest.approx(alpha, abs=0.005) and b.mean() == pytest.approx(beta, abs=0.005)
    assert np.all(np.abs(a - alpha) < 0.05) and np.all(np.abs(b - beta) < 0.05)
    assert np.all(np.isnan(fit_gao(np.array([0.0, 0.0]), np.array([0.0, 0.0]), form)))  # no point with d > 0


def test_two_level_replicates_are_the_means_of_the_drawn_values_with_or_without_a_nan():
    """The replicates come from a product of each draw's prompt frequencies with the values; they
    are the means of the values those draws pick (`two_level_indices`), and a NaN stays in the
    replicates that draw it only."""
    rng = np.random.default_rng(3)
    for shape in [(3, 64), (1, 64), (2, 3, 40), (4, 1, 1)]:
        values = rng.normal(size=shape)
        seeds, prompts = two_level_indices(shape[-2], shape[-1], 200, seed=7)
        drawn = values[..., seeds[:, :, None], prompts].mean(axis=(-1, -2))
        np.testing.assert_allclose(two_level_replicates(values, 200, seed=7), drawn, rtol=0, atol=1e-12)
    values = rng.normal(size=(3, 64))
    values[1, 5] = np.nan
    seeds, prompts = two_level_indices(3, 64, 200, seed=7)
    picks = (seeds[:, :, None] == 1) & (prompts == 5)
    replicates = two_level_replicates(values, 200, seed=7)
    assert np.array_equal(np.isnan(replicates), picks.any(axis=(1, 2)))
