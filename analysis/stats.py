"""The statistics behind the figures: intervals over seeds and prompts, paired comparisons with
Holm's adjustment, KL-matched frontiers, Gao et al.'s fits and the Bradley–Terry ranking.

What an interval covers. A run's number moves with two sources of noise: *training* (its seed:
the SFT policy, labels and reward models when the seed replicates the whole experiment, and the
method's own randomness) and *evaluation* (which test prompts were drawn and what the policy
sampled on them). The per-run intervals written by the evaluator resample prompts only, so they
cover evaluation noise alone. Across seeds the intervals here are a **two-level bootstrap**
(Davison & Hinkley 1997, §3.8): a replicate draws S seeds with replacement, then, within each
drawn seed, its P prompts with replacement, and takes the mean. From the B replicates the
interval is mean ± t_{S−1} · sd(replicates): the bootstrap's standard error with Student's t at S−1
degrees of freedom (not a studentised bootstrap-t, which would need a standard error per replicate):
with 3–5 seeds, percentile intervals of a seed bootstrap are far too short. The second level adds
the prompts' noise once more to seed means that already carry it, which makes up for the first
level's (S−1)/S shrinkage of the seeds' variance where the prompts' noise matters: the coverage of
a nominal 95% runs from about 93% (slightly short) where the seeds' spread is all there is to
nearly 100% where the prompts' noise is (tests/test_stats.py simulates it). Without per-prompt values (W&B runs, old
runs) only the seeds are resampled and the sd is scaled by √(S/(S−1)): the t-interval over seeds.
With one seed it is the percentile bootstrap over prompts (evaluation noise only).

numpy only (no scipy): the Student-t quantile comes from the closed-form t distribution
function for integer degrees of freedom (Abramowitz & Stegun 26.7.3-4), which is all that an
interval over a handful of seeds needs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def student_t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with `df` (integer >= 1) degrees of freedom (A&S 26.7.3-4)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2 == 1:
        if df == 1:
            return 2 * theta / math.pi
        term = total = math.cos(theta)  # cos θ + (2/3) cos³θ + (2·4)/(3·5) cos⁵θ + ... up to cos^(df-2) θ
        for k in range(1, (df - 3) // 2 + 1):
            term *= 2 * k / (2 * k + 1) * cos2
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * total)
    term = total = 1.0  # 1 + (1/2) cos²θ + (1·3)/(2·4) cos⁴θ + ... up to cos^(df-2) θ
    for k in range(1, (df - 2) // 2 + 1):
        term *= (2 * k - 1) / (2 * k) * cos2
        total += term
    return math.sin(theta) * total


def student_t_quantile(level: float, df: int) -> float:
    """The t with P(|T| <= t) = level (e.g. level 0.95, df 1 -> 12.706), by bisection."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    low, high = 0.0, 1.0
    while student_t_central(high, df) < level:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if student_t_central(mid, df) < level:
            low = mid
        else:
            high = mid
    return (low + high) / 2


@dataclass(frozen=True)
class Interval:
    """A mean and a 95% interval, with what the interval is over (for captions and legends)."""

    mean: float
    low: float
    high: float
    over: str  # "two-level" (seeds, then prompts), "seeds" (t over seed means), "prompts" (one seed) or "none"
    n: int  # seeds behind the mean

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def seed_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean over seeds with the Student-t interval (n-1 degrees of freedom); none for one seed."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(x) == 0:
        return Interval(math.nan, math.nan, math.nan, "none", 0)
    mean = float(x.mean())
    if len(x) == 1:
        return Interval(mean, math.nan, math.nan, "none", 1)
    half = student_t_quantile(level, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Interval(mean, mean - half, mean + half, "seeds", len(x))


def metric_interval(metrics: Sequence[dict], key: str) -> Interval:
    """`key` over runs that differ only in seed: the t-interval over seeds where there are
    several, else the run's own 95% bootstrap interval over prompts (`key_ci_low/_ci_high`)."""
    values = [m.get(key) for m in metrics]
    interval = seed_interval(values)
    if interval.n == 1:
        only = next(m for m in metrics if m.get(key) is not None and np.isfinite(m[key]))
        low, high = only.get(f"{key}_ci_low"), only.get(f"{key}_ci_high")
        if low is not None and high is not None:
            return Interval(interval.mean, float(low), float(high), "prompts", 1)
    return interval


INTERVAL_TEXT = {
    "two-level": "95% two-level bootstrap over {seeds} seeds and the test prompts within each (mean ± t·sd of the replicates): training and evaluation noise",
    "seeds": "95% t-interval over the means of {seeds} seeds: training and evaluation noise",
    "prompts": "95% bootstrap over test prompts of one seed: evaluation noise only",
}


def describe_intervals(intervals: Sequence[Interval], what: str = "error bars") -> str:
    """What the intervals of a figure or table are (method, seeds, what noise they cover), for its caption."""
    parts = []
    for kind in ("two-level", "seeds", "prompts"):
        seeds = sorted({i.n for i in intervals if i.over == kind})
        if seeds:
            parts.append(INTERVAL_TEXT[kind].format(seeds="/".join(map(str, seeds))))
    if not parts:
        return f"no {what} (one seed, no interval recorded)"
    return f"{what}: " + "; ".join(parts)


# --- the two-level bootstrap -------------------------------------------------------------------
def two_level_indices(n_seeds: int, n_prompts: int, n_boot: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The draws of a two-level bootstrap: seeds [B, S] with replacement, then for each drawn seed
    its prompts [B, S, P] with replacement. The same (S, P, B, seed) always gives the same draws,
    so statistics of several policies on the same seeds and prompts are paired replicate by replicate."""
    if n_seeds < 1 or n_prompts < 1 or n_boot < 2:
        raise ValueError(f"a two-level bootstrap needs >= 1 seed, >= 1 prompt and >= 2 replicates, got {n_seeds}, {n_prompts}, {n_boot}")
    rng = np.random.default_rng([seed, n_seeds, n_prompts])
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    prompts = rng.integers(0, n_prompts, size=(n_boot, n_seeds, n_prompts), dtype=np.int32)
    return seeds, prompts


def two_level_replicates(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Replicate means [..., B] of values [..., S, P] (per seed, per prompt) under the draws of
    `two_level_indices`: the mean over the S drawn seeds of the mean over each one's P drawn prompts."""
    values = np.asarray(values, dtype=float)
    n_seeds, n_prompts = values.shape[-2:]
    if not np.isfinite(values).all():  # a weight of 0 would still carry a NaN: take the drawn values themselves
        seeds, prompts = two_level_indices(n_seeds, n_prompts, n_boot, seed)
        return values[..., seeds[:, :, None], prompts].mean(axis=(-1, -2))
    # The same means as a product: each draw's prompt frequencies [B·S, P] times every seed's values
    # gives each draw's prompt mean for every seed, of which the drawn seed's is kept. One matrix
    # product instead of gathering B·S·P values (the figures and the results table take hundreds).
    seeds, frequencies = _two_level_frequencies(n_seeds, n_prompts, n_boot, seed)
    rows = values.reshape(-1, n_seeds, n_prompts)  # [N, S, P]
    means = (frequencies @ rows.reshape(-1, n_prompts).T).reshape(n_boot, n_seeds, len(rows), n_seeds)  # [B, draw, N, S]
    drawn = np.take_along_axis(means, np.broadcast_to(seeds[:, :, None, None], (n_boot, n_seeds, len(rows), 1)), axis=3)[..., 0]
    return drawn.mean(axis=1).T.reshape(values.shape[:-2] + (n_boot,))


@functools.lru_cache(maxsize=2)  # ~50 MB each at 3 seeds x 2,048 prompts x 1,000 draws
def _two_level_frequencies(n_seeds: int, n_prompts: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`two_level_indices`' draws as the drawn seeds [B, S] and, per draw, each prompt's share of
    its P drawn prompts [B·S, P] (kept: the same draws serve every policy and metric)."""
    seeds, prompts = two_level_indices(n_seeds, n_prompts, n_boot, seed)
    draws = prompts.reshape(n_boot * n_seeds, n_prompts)
    frequencies = np.empty(draws.shape)
    # A block of draws at a time: counting all B·S·P draws in one `bincount` took four int64
    # temporaries of the result's size (~200 MB at 3 seeds x 2,048 prompts x 1,000 draws).
    block = max(1, _BINCOUNT_BLOCK // n_prompts)
    for start in range(0, len(draws), block):
        part = draws[start : start + block]
        cells = np.arange(len(part))[:, None] * n_prompts + part  # each draw's prompts in its own row
        frequencies[start : start + len(part)] = np.bincount(cells.ravel(), minlength=part.size).reshape(part.shape)
    frequencies /= n_prompts
    return seeds, frequencies


_BINCOUNT_BLOCK = 2**20  # (draw, prompt) cells counted at once by `_two_level_frequencies`: 8 MB of int64


def two_level_variance(values: np.ndarray) -> float:
    """The exact variance of the two-level bootstrap mean of values [S, P] (what the replicates'
    variance tends to as B grows): with seed means m_s and within-seed variances v_s (ddof 0),
    Var* = (1/S) · [ mean_s (m_s − m̄)² + mean_s v_s / P ] (the law of total variance for one draw)."""
    values = np.asarray(values, dtype=float)
    s, p = values.shape
    means = values.mean(axis=1)
    return float((np.mean((means - means.mean()) ** 2) + np.mean(values.var(axis=1)) / p) / s)


def replicate_interval(estimate: float, replicates: np.ndarray, n_seeds: int, level: float = 0.95, per_prompt: bool = True) -> Interval:
    """The interval from bootstrap replicates (see the module docstring): estimate ± t_{S−1} ·
    se over S >= 2 seeds, the percentile interval for one seed (see `replicate_se`)."""
    finite = np.asarray(replicates, dtype=float)
    finite = finite[np.isfinite(finite)]
    if not np.isfinite(estimate) or len(finite) < 2:
        return Interval(float(estimate), math.nan, math.nan, "none", n_seeds)
    if n_seeds >= 2:
        half = student_t_quantile(level, n_seeds - 1) * replicate_se(finite, n_seeds, per_prompt)
        return Interval(float(estimate), float(estimate - half), float(estimate + half), "two-level" if per_prompt else "seeds", n_seeds)
    if not per_prompt:
        return Interval(float(estimate), math.nan, math.nan, "none", 1)
    alpha = (1 - level) / 2
    low, high = np.quantile(finite, [alpha, 1 - alpha])
    return Interval(float(estimate), float(low), float(high), "prompts", 1)


def replicate_se(replicates: np.ndarray, n_seeds: int, per_prompt: bool = True) -> float:
    """The standard error from replicates: their sd; where only the seeds were resampled (no
    per-prompt values, S >= 2), times √(S/(S−1)), which undoes the seed bootstrap's shrinkage
    (with it, a mean's interval is the t-interval over the seeds' values)."""
    sd = float(np.std(replicates, ddof=1))
    return sd if per_prompt or n_seeds < 2 else sd * math.sqrt(n_seeds / (n_seeds - 1))


def replicate_p_value(estimate: float, replicates: np.ndarray, n_seeds: int, per_prompt: bool = True) -> float:
    """Two-sided p-value of "the true value is 0", from the statistic estimate / sd(replicates):
    Student's t with S−1 degrees of freedom over S >= 2 seeds (as `replicate_interval`), the
    normal distribution for one seed. A tail count of the replicates cannot go
    below 1/B, which after Holm over dozens of pairs would hide every difference."""
    finite = np.asarray(replicates, dtype=float)
    finite = finite[np.isfinite(finite)]
    if not np.isfinite(estimate) or len(finite) < 2:
        return math.nan
    se = replicate_se(finite, n_seeds, per_prompt)
    if se == 0:
        return 1.0 if estimate == 0 else 0.0
    if n_seeds >= 2:
        return 1.0 - student_t_central(estimate / se, n_seeds - 1)
    return math.erfc(abs(estimate) / se / math.sqrt(2))


def two_level_interval(values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Interval:
    """Mean of values [S, P] and its interval (two-level bootstrap over S >= 2 seeds, prompts for one)."""
    values = np.asarray(values, dtype=float)
    return replicate_interval(float(values.mean()), two_level_replicates(values, n_boot, seed), values.shape[0], level)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's (1979) step-down adjustment: the k-th smallest of m p-values becomes
    max_{j<=k} min(1, (m − j + 1) p_(j)). NaNs stay NaN and do not count in m."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, math.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m, running = len(finite), 0.0
    for rank, i in enumerate(finite[np.argsort(p[finite], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


# --- KL-matched frontiers and Gao et al.'s functional forms ------------------------------------
def interpolate_at(kl: np.ndarray, value: np.ndarray, target: float) -> np.ndarray:
    """The value at KL = target along a frontier [..., K] of (KL, value) points: the points are
    sorted by KL and joined by straight lines; NaN outside [min KL, max KL] (no extrapolation), and
    NaN along a frontier with a KL that is not a finite number (its shape there is unknown)."""
    kl, value = np.asarray(kl, dtype=float), np.asarray(value, dtype=float)
    order = np.argsort(kl, axis=-1)
    k, v = np.take_along_axis(kl, order, -1), np.take_along_axis(value, order, -1)
    i = np.clip((k <= target).sum(axis=-1) - 1, 0, k.shape[-1] - 2)[..., None]
    k0, k1 = np.take_along_axis(k, i, -1)[..., 0], np.take_along_axis(k, i + 1, -1)[..., 0]
    v0, v1 = np.take_along_axis(v, i, -1)[..., 0], np.take_along_axis(v, i + 1, -1)[..., 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        weight = np.where(k1 > k0, (target - k0) / (k1 - k0), 0.0)
    result = v0 + weight * (v1 - v0)
    return np.where((target < k[..., 0]) | (target > k[..., -1]) | ~np.isfinite(kl).all(axis=-1), math.nan, result)


GAO_FORMS = {
    "best_of_n": ("R(d) = d(α − βd)", lambda d: -d * d),
    "rl": ("R(d) = d(α − β log d)", lambda d: -d * np.log(np.where(d > 0, d, 1.0))),
}
"""Gao et al. 2022 (eq. 1, 2): the gold reward gained over the initial policy against d = √KL;
best-of-n's form and the RL form. Both are linear in (α, β), so the fit is least squares."""


def fit_gao(d: np.ndarray, gain: np.ndarray, form: str) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (α, β) of `form` (a key of GAO_FORMS) to points d [..., K] (√KL), gain [..., K]
    (gold reward minus the initial policy's); a batch of independent fits is allowed. NaN where
    fewer than two points with d > 0."""
    d, gain = np.asarray(d, dtype=float), np.asarray(gain, dtype=float)
    design = np.stack([d, GAO_FORMS[form][1](d)], axis=-1)  # [..., K, 2]
    gram = np.swapaxes(design, -1, -2) @ design  # [..., 2, 2]
    rhs = (np.swapaxes(design, -1, -2) @ gain[..., None])[..., 0]
    ok = np.abs(np.linalg.det(gram)) > 1e-12 * np.maximum(np.trace(gram, axis1=-2, axis2=-1) ** 2, 1e-300)
    safe = np.where(ok[..., None, None], gram, np.eye(2))
    coef = np.linalg.solve(safe, rhs[..., None])[..., 0]
    coef = np.where(ok[..., None], coef, math.nan)
    return coef[..., 0], coef[..., 1]


def gao_curve(d: np.ndarray, alpha: float, beta: float, form: str) -> np.ndarray:
    """R(d) of a fitted form."""
    d = np.asarray(d, dtype=float)
    return alpha * d + beta * GAO_FORMS[form][1](d)


# --- Bradley–Terry ------------------------------------------------------------------------
def fit_bradley_terry(wins: np.ndarray, ridge: float = 1e-4, iterations: int = 100) -> np.ndarray:
    """Strengths θ [..., M] maximising Σ_ij W_ij log σ(θ_i − θ_j) − (ridge/2)·‖θ‖², by Newton's method.

    wins: [..., M, M] (a batch of independent fits is allowed), W_ij = (possibly fractional) wins
    of i over j; a tie adds 1/2 to both W_ij and W_ji. P(i beats j) = σ(θ_i − θ_j) (Bradley &
    Terry 1952). The small ridge fixes the gauge (Σθ = 0 at the optimum) and keeps θ finite for
    a policy that never loses.
    """
    wins = np.asarray(wins, dtype=float)
    m = wins.shape[-1]
    n = wins + np.swapaxes(wins, -1, -2)
    theta = np.zeros(wins.shape[:-1])
    eye = np.eye(m)
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(theta[..., :, None] - theta[..., None, :])))
        grad = (wins - n * p).sum(axis=-1) - ridge * theta
        curvature = n * p * (1 - p)
        hessian = curvature - eye * curvature.sum(axis=-1)[..., None] - ridge * eye
        step = np.linalg.solve(hessian, -grad[..., None])[..., 0]
        theta = theta + step
        if np.max(np.abs(step)) < 1e-10:
            break
    return theta


@dataclass
class Ranking:
    """Bradley–Terry strengths relative to an anchor policy, with bootstrap intervals."""

    names: list[str]
    strength: np.ndarray  # [M] log-odds relative to the anchor
    low: np.ndarray
    high: np.ndarray
    anchor: str
    units: int  # comparison units resampled (prompts)
    bootstrap: int
    seeds: int = 1  # seeds resampled at the first level (1: prompts only)


def two_level_weights(n_seeds: int, n_units: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Weights [B, S, U] of a two-level bootstrap as counts: how often each (seed, prompt) appears
    in a replicate that draws S seeds with replacement and then U prompts within each drawn seed."""
    rng = np.random.default_rng([seed, n_seeds, n_units])
    drawn = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    counts = rng.multinomial(n_units, np.full(n_units, 1 / n_units), size=(n_boot, n_seeds)).astype(float)  # [B, draw, U]
    onehot = (drawn[..., None] == np.arange(n_seeds)).astype(float)  # [B, draw, S]
    return np.einsum("bks,bku->bsu", onehot, counts)


def bradley_terry_ranking(names: Sequence[str], outcomes: np.ndarray, anchor: str | None = None, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Ranking:
    """Fit Bradley–Terry to per-prompt outcomes and bootstrap over seeds, then prompts.

    outcomes: [S, U, M, M] — per seed s and prompt u, the wins of i over j (ties 1/2 to each
    side); [U, M, M] is one seed. A replicate reweights (seed, prompt) cells by the counts of a
    two-level bootstrap (`two_level_weights`) and refits; the intervals are those of
    `replicate_interval` (mean ± t·sd of the replicates over S >= 2 seeds, percentile over prompts for one).
    Strengths are reported relative to `anchor` (default: the mean strength is 0).
    """
    outcomes = np.asarray(outcomes, float)
    if outcomes.ndim == 3:
        outcomes = outcomes[None]
    n_seeds, units, m = outcomes.shape[0], outcomes.shape[1], outcomes.shape[2]
    names = list(names)
    index = names.index(anchor) if anchor is not None else None

    def centred(theta: np.ndarray) -> np.ndarray:
        return theta - (theta[..., [index]] if index is not None else theta.mean(axis=-1, keepdims=True))

    strength = centred(fit_bradley_terry(outcomes.sum(axis=(0, 1))))
    weights = two_level_weights(n_seeds, units, n_boot, seed).reshape(n_boot, n_seeds * units)
    resampled = weights @ outcomes.reshape(n_seeds * units, m * m)
    replicates = centred(fit_bradley_terry(resampled.reshape(n_boot, m, m)))
    intervals = [replicate_interval(float(strength[i]), replicates[:, i], n_seeds, level) for i in range(m)]
    low = np.array([i.low for i in intervals])
    high = np.array([i.high for i in intervals])
    if index is not None:  # the anchor is 0 by definition
        low[index] = high[index] = 0.0
    return Ranking(names, strength, low, high, anchor or "mean", units, n_boot, n_seeds)
