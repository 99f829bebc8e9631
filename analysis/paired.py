"""Paired comparisons: every pair of policies on the same seeds and the same test prompts.

For two policies a and b and a metric (gold reward, win rate against SFT), the difference a − b
is taken prompt by prompt within each seed that both ran, so the shared noise (the seed's SFT
policy, labels and reward models, the prompts drawn) cancels. Its interval and p-value come from
the two-level bootstrap of the differences (analysis/stats.py): seeds, then prompts within each
seed, the same draws for a and b. Holm's step-down adjustment runs over all pairs of one metric.
The *best group* of a metric is the policy with the highest mean and every policy whose
difference from it is not significant at 5%, Holm-adjusted over the K − 1 comparisons with the
best (the family of that question; the all-pairs adjustment of `p_holm` is far stricter: with 13
policies and three seeds it sets almost nothing apart).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from alignbench.analysis.runs import Group, SeedValues, seed_values
from alignbench.analysis.stats import (
    describe_intervals,
    holm,
    replicate_interval,
    replicate_p_value,
    two_level_replicates,
)

PAIRED_METRICS = {"eval/gold_reward": "gold reward", "eval/win_rate": "win rate vs SFT"}
ALPHA = 0.05


@dataclass
class Comparison:
    """a − b on one metric, over the seeds (and prompts) both ran."""

    a: str
    b: str
    metric: str
    diff: float
    ci_low: float
    ci_high: float
    p: float
    p_holm: float
    seeds: int
    prompts: int
    interval: str  # "two-level", "seeds" or "prompts" (see stats.describe_intervals)

    @property
    def significant(self) -> bool:
        return bool(self.p_holm < ALPHA)


@dataclass
class PairedResult:
    comparisons: list[Comparison]
    means: dict[str, dict[str, float]]  # metric -> label -> the policy's mean
    best: dict[str, str]  # metric -> label with the highest mean
    best_group: dict[str, list[str]]  # metric -> labels not told apart from the best
    intervals: list  # the comparisons' Interval objects, for captions

    def describe(self) -> str:
        return describe_intervals(self.intervals, what="intervals of the differences")


def _paired(x: SeedValues, y: SeedValues) -> tuple[list[int], bool] | None:
    """The seeds at which x and y can be paired (same seed, same prompts in the same order), and
    whether per-prompt differences exist there."""
    seeds = [s for s in x.seeds if s in y.seeds]
    per_prompt = x.per_prompt and y.per_prompt and x.values.shape[1] == y.values.shape[1]
    if per_prompt:
        digests = {s: (x.prompts[x.seeds.index(s)], y.prompts[y.seeds.index(s)]) for s in seeds}
        seeds = [s for s in seeds if digests[s][0] is not None and digests[s][0] == digests[s][1]]
    if not seeds or (len(seeds) == 1 and not per_prompt):
        return None
    return seeds, per_prompt


def paired_comparisons(groups: list[Group], metrics: dict[str, str] = PAIRED_METRICS, n_boot: int = 1000, level: float = 0.95) -> PairedResult:
    """Every pair of `groups` (policies) on every metric; see the module docstring."""
    comparisons, means, best, best_group, intervals = [], {}, {}, {}, []
    for key in metrics:
        values = {g.label: v for g in groups if (v := seed_values(g.runs, key)) is not None}
        if len(values) < 2:
            continue
        labels = list(values)
        cache: dict[tuple, np.ndarray] = {}

        def replicates(label: str, seeds: list[int], per_prompt: bool) -> np.ndarray:
            # The same (S, P) gives the same draws, so a − b of two policies' replicates is the
            # replicate of their paired difference (the mean is linear).
            ident = (label, tuple(seeds), per_prompt)
            if ident not in cache:
                v = values[label].subset(seeds).values
                cache[ident] = two_level_replicates(v if per_prompt else v.mean(axis=1, keepdims=True), n_boot)
            return cache[ident]

        found = []
        for i, a in enumerate(labels):
            for b in labels[i + 1 :]:
                pairing = _paired(values[a], values[b])
                if pairing is None:
                    continue
                seeds, per_prompt = pairing
                va, vb = values[a].subset(seeds).values, values[b].subset(seeds).values
                diff = float(va.mean() - vb.mean())
                reps = replicates(a, seeds, per_prompt) - replicates(b, seeds, per_prompt)
                interval = replicate_interval(diff, reps, len(seeds), level, per_prompt)
                intervals.append(interval)
                found.append(Comparison(a, b, key, diff, interval.low, interval.high, replicate_p_value(diff, reps, len(seeds), per_prompt), math.nan,
                                        len(seeds), va.shape[1] if per_prompt else 0, interval.over))
        for comparison, adjusted in zip(found, holm([c.p for c in found])):
            comparison.p_holm = float(adjusted)
        comparisons += found
        means[key] = {label: float(v.values.mean()) for label, v in values.items()}
        top = max(means[key], key=means[key].get)
        best[key] = top
        # The best group asks K − 1 questions (each policy against the best), not K(K − 1)/2: Holm
        # over those comparisons only, so that three seeds can still set a policy apart from the best.
        against_top = [c for c in found if top in (c.a, c.b)]
        group = [top] + [c.b if c.a == top else c.a for c, adjusted in zip(against_top, holm([c.p for c in against_top])) if adjusted >= ALPHA]
        best_group[key] = [label for label in labels if label in group]
    return PairedResult(comparisons, means, best, best_group, intervals)


def paired_frame(result: PairedResult):
    """The comparisons as a table: a, b, metric, diff, ci_low, ci_high, p, p_holm, significant, seeds, prompts, interval."""
    import pandas as pd

    return pd.DataFrame([{"a": c.a, "b": c.b, "metric": c.metric, "diff": c.diff, "ci_low": c.ci_low, "ci_high": c.ci_high, "p": c.p,
                          "p_holm": c.p_holm, "significant": "yes" if c.significant else "no", "seeds": c.seeds, "prompts": c.prompts,
                          "interval": c.interval} for c in result.comparisons])
