"""KL-matched frontiers: gold reward against KL(π‖π_SFT), one curve per method across a sweep of
its KL knob (DPO paper Fig. 2; Gao et al. 2022), compared at the same KL.

A curve's points are the swept settings (mean over seeds); each curve starts at the SFT policy
(KL 0), which every method reaches as its knob goes to zero (β → ∞, n = 1, no rounds). The gold
reward at a matched KL (0.25, 0.5, 1.0 nats) is read off the curve by linear interpolation
between neighbouring points, never extrapolated. Intervals come from the two-level bootstrap
(analysis/stats.py): one replicate draws seeds and prompts once, recomputes every point's gold
reward (its prompts resampled) and KL (the drawn seeds' reported KLs), and interpolates again;
methods on the same seeds and prompts share the draws, so their differences at a matched KL are
paired. Gao et al.'s forms are fitted to the gain over SFT, R = gold − gold_SFT, against d = √KL,
by least squares, and refitted on each replicate for the coefficients' intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from alignbench.analysis.runs import Group, Run, group_runs, seed_values, setting_order
from alignbench.analysis.stats import (
    GAO_FORMS,
    Interval,
    fit_gao,
    holm,
    interpolate_at,
    replicate_interval,
    replicate_p_value,
    two_level_indices,
)

GOLD, KL = "eval/gold_reward", "eval/kl"
KL_TARGETS = (0.25, 0.5, 1.0)
ANCHOR = "sft"
# Which of Gao et al.'s forms a method's curve follows: best-of-n selection or optimisation (RL
# and the methods that, like it, move the policy by training); analysis-only, so no method needs it.
GAO_FORM_OF_METHOD = {"best_of_n": "best_of_n", "best_of_n_gold": "best_of_n"}


@dataclass
class Frontier:
    """One method's curve: points k (swept settings) on seeds s, with gold [K, S, P] per prompt (or
    [K, S, 1] per seed without samples) and KL [K, S]; `anchor_gold` [S, P] is SFT's on the same
    seeds (None without SFT runs)."""

    group: Group
    swept: list[str]
    settings: list[tuple]
    seeds: list[int]
    gold: np.ndarray
    kl: np.ndarray
    per_prompt: bool
    anchor_gold: np.ndarray | None
    prompts: tuple = ()
    """Each seed's test-prompt digest (where `per_prompt`): two curves pair prompt by prompt only on the same."""

    @property
    def label(self) -> str:
        return self.group.label

    @property
    def form(self) -> str:
        return GAO_FORM_OF_METHOD.get(self.group.method, "rl")

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """KL [K'] and gold [K'] means over seeds, with SFT's (0, gold) first where known."""
        kl, gold = self.kl.mean(axis=1), self.gold.mean(axis=(1, 2))
        if self.anchor_gold is not None:
            kl, gold = np.concatenate([[0.0], kl]), np.concatenate([[self.anchor_gold.mean()], gold])
        return kl, gold

    def replicates(self, n_boot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """KL [B, K'] and gold [B, K'] of each replicate (SFT first where known), and SFT's gold [B]."""
        s, p = self.gold.shape[1], self.gold.shape[2]
        seeds, prompts = two_level_indices(s, p, n_boot)
        gold = self.gold[:, seeds[:, :, None], prompts].mean(axis=(-1, -2)).T  # [B, K]
        kl = self.kl[:, seeds].mean(axis=-1).T  # [B, K]
        anchor = None
        if self.anchor_gold is not None:
            anchor = self.anchor_gold[seeds[:, :, None], prompts].mean(axis=(-1, -2))  # [B]
            gold = np.concatenate([anchor[:, None], gold], axis=1)
            kl = np.concatenate([np.zeros((n_boot, 1)), kl], axis=1)
        return kl, gold, anchor


def _context(run: Run) -> dict:
    """A run's settings outside its own method's section (what its SFT anchor must share)."""
    return {k: v for k, v in run.settings.items() if not k.startswith(run.method + ".")}


def _swept(runs: list[Run], method: str) -> list[str]:
    keys = sorted({k for r in runs for k in r.settings if k.startswith(method + ".")})
    return [k for k in keys if len({str(r.settings.get(k)) for r in runs}) > 1]


def find_frontiers(runs: list[Run]) -> list[Frontier]:
    """A curve per method and setting outside its own section, with two or more settings of its
    own section that report gold reward and KL on the same seeds."""
    sft_runs = [r for r in runs if r.method == ANCHOR]
    frontiers = []
    for curve in group_runs(runs, ignore=lambda key, method: key.startswith(method + ".")):
        if curve.method == ANCHOR:
            continue
        usable = [r for r in curve.runs if r.metrics.get(GOLD) is not None and r.metrics.get(KL) is not None]
        swept = _swept(usable, curve.method)
        if not swept:
            continue
        by_setting: dict[tuple, list[Run]] = {}
        for r in usable:
            by_setting.setdefault(tuple(r.settings.get(k) for k in swept), []).append(r)
        if len(by_setting) < 2:
            continue
        settings = sorted(by_setting, key=lambda values: setting_order(tuple(str(v) if isinstance(v, tuple) else v for v in values)))
        seeds = sorted(set.intersection(*({r.seed for r in by_setting[v]} for v in settings)))
        context = _context(usable[0])
        anchor = [r for r in sft_runs if r.settings == context]
        anchor_seeds = {r.seed for r in anchor}
        if anchor and anchor_seeds >= set(seeds):
            point_runs = [[r for r in by_setting[v] if r.seed in seeds] for v in settings] + [[r for r in anchor if r.seed in seeds]]
        else:
            anchor, point_runs = [], [[r for r in by_setting[v] if r.seed in seeds] for v in settings]
        if not seeds:
            continue
        golds = [seed_values(rs, GOLD) for rs in point_runs]
        per_prompt = all(g.per_prompt for g in golds) and len({g.values.shape[1] for g in golds}) == 1 and len({tuple(g.prompts) for g in golds}) == 1
        gold = np.stack([g.values if per_prompt else g.values.mean(axis=1, keepdims=True) for g in golds])
        kl = np.array([[r.metrics[KL] for r in rs] for rs in point_runs[: len(settings)]], dtype=float)
        frontiers.append(Frontier(curve, swept, settings, seeds, gold[: len(settings)], kl, per_prompt, gold[-1] if anchor else None,
                                  tuple(golds[0].prompts) if per_prompt else ()))
    return frontiers


@dataclass
class MatchedRow:
    """A method's gold reward at one matched KL, with its interval and whether it is in the best group."""

    label: str
    kl: float
    interval: Interval
    p_holm_vs_best: float
    best_group: bool
    vs_best: Interval | None = None  # this curve minus the best at this KL, paired (None for the best itself or unpaired curves)


def matched_kl(frontiers: list[Frontier], targets: tuple[float, ...] = KL_TARGETS, n_boot: int = 1000, level: float = 0.95) -> list[MatchedRow]:
    """Every frontier's gold reward at each target KL, with intervals and the best group per
    target: the highest, and every curve whose paired difference from it is not significant at
    5% (Holm over the comparisons with the best at that KL). Curves not on the best's seeds and
    prompts cannot be paired with it and are left out of its group."""
    reps = {f.label: f.replicates(n_boot) for f in frontiers}
    rows = []
    for target in targets:
        values = {}
        for f in frontiers:
            kl, gold = f.points()
            estimate = float(interpolate_at(kl, gold, target))
            replicate = interpolate_at(reps[f.label][0], reps[f.label][1], target)
            if np.isfinite(estimate) and np.mean(np.isfinite(replicate)) < 0.5:
                estimate = math.nan  # the target sits at the curve's edge: most replicates do not reach it
            values[f.label] = (f, estimate, replicate)
        finite = {label: v for label, v in values.items() if np.isfinite(v[1])}
        best = max(finite, key=lambda label: finite[label][1]) if finite else None
        others = [label for label in finite if label != best]
        p, versus = [], {}
        for label in others:
            fa, fb = finite[best][0], finite[label][0]
            paired = fa.seeds == fb.seeds and fa.gold.shape[1:] == fb.gold.shape[1:] and fa.per_prompt == fb.per_prompt and fa.prompts == fb.prompts
            diff = finite[best][2] - finite[label][2]
            p.append(replicate_p_value(finite[best][1] - finite[label][1], diff, len(fa.seeds), fa.per_prompt) if paired else math.nan)
            if paired:
                versus[label] = replicate_interval(finite[label][1] - finite[best][1], -diff, len(fa.seeds), level, fa.per_prompt)
        adjusted = dict(zip(others, holm(p)))
        for f in frontiers:
            _, estimate, replicate = values[f.label]
            interval = replicate_interval(estimate, replicate, len(f.seeds), level, f.per_prompt)
            p_best = adjusted.get(f.label, math.nan)
            in_group = f.label == best or (np.isfinite(p_best) and p_best >= 0.05)
            rows.append(MatchedRow(f.label, target, interval, float(p_best), bool(in_group), versus.get(f.label)))
    return rows


@dataclass
class GaoFit:
    label: str
    form: str
    alpha: Interval
    beta: Interval
    points: int


def gao_fits(frontiers: list[Frontier], n_boot: int = 1000, level: float = 0.95) -> list[GaoFit]:
    """Gao et al.'s form of each frontier fitted to its gain over SFT against d = √KL (curves with
    an SFT anchor and at least two points), with bootstrap intervals of α and β."""
    fits = []
    for f in frontiers:
        if f.anchor_gold is None:
            continue
        kl, gold = f.points()
        alpha, beta = fit_gao(np.sqrt(np.maximum(kl, 0)), gold - gold[0], f.form)
        kl_reps, gold_reps, anchor = f.replicates(n_boot)
        alpha_reps, beta_reps = fit_gao(np.sqrt(np.maximum(kl_reps, 0)), gold_reps - anchor[:, None], f.form)
        fits.append(GaoFit(f.label, f.form, replicate_interval(float(alpha), alpha_reps, len(f.seeds), level, f.per_prompt),
                           replicate_interval(float(beta), beta_reps, len(f.seeds), level, f.per_prompt), len(kl) - 1))
    return fits


def form_text(form: str) -> str:
    return GAO_FORMS[form][0]
