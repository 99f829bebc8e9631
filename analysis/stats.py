"""The statistics behind the figures: intervals over seeds and the Bradley–Terry ranking.

numpy only (no scipy): the Student-t quantile comes from the closed-form t distribution
function for integer degrees of freedom (Abramowitz & Stegun 26.7.3-4), which is all that an
interval over a handful of seeds needs.
"""

from __future__ import annotations

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
    over: str  # "seeds" (t-interval over n seeds), "prompts" (the run's bootstrap) or "none"
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


def describe_intervals(intervals: Sequence[Interval]) -> str:
    """What the error bars of a figure are, for its caption."""
    kinds = {i.over for i in intervals if i.over != "none"}
    seeds = sorted({i.n for i in intervals if i.over == "seeds"})
    over_seeds = f"95% t-interval over {'/'.join(map(str, seeds))} seeds"
    if kinds == {"seeds"}:
        return f"error bars: {over_seeds}"
    if kinds == {"prompts"}:
        return "error bars: 95% bootstrap interval over test prompts (one seed)"
    if kinds == {"seeds", "prompts"}:
        return f"error bars: {over_seeds} where there are several, else 95% bootstrap over test prompts"
    return "no error bars (one seed, no interval recorded)"


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


def bradley_terry_ranking(names: Sequence[str], outcomes: np.ndarray, anchor: str | None = None, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Ranking:
    """Fit Bradley–Terry to per-prompt outcomes and bootstrap over prompts.

    outcomes: [U, M, M] — per prompt u, the wins of i over j summed over the comparisons made on
    it (one per seed), ties 1/2 to each side. A bootstrap replicate resamples
    prompts with replacement (multinomial weights) and refits. Strengths are reported relative to
    `anchor` (default: the mean strength is 0).
    """
    outcomes = np.asarray(outcomes, float)
    units, m = outcomes.shape[0], outcomes.shape[1]
    names = list(names)
    index = names.index(anchor) if anchor is not None else None

    def centred(theta: np.ndarray) -> np.ndarray:
        return theta - (theta[index] if index is not None else theta.mean())

    strength = centred(fit_bradley_terry(outcomes.sum(axis=0)))
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(units, np.full(units, 1 / units), size=n_boot).astype(float)  # [B, U]
    resampled = weights @ outcomes.reshape(units, m * m)
    replicates = fit_bradley_terry(resampled.reshape(n_boot, m, m))
    replicates = replicates - (replicates[:, [index]] if index is not None else replicates.mean(axis=1, keepdims=True))
    alpha = (1 - level) / 2
    return Ranking(names, strength, np.quantile(replicates, alpha, axis=0), np.quantile(replicates, 1 - alpha, axis=0), anchor or "mean", units, n_boot)
