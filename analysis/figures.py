"""The paper-style figures. Each `draw_*` takes the runs of one experiment and returns a `Drawn`
figure with its caption, or raises `Skipped` saying which runs it needs.

1. win rate vs SFT per policy (bars, 95% intervals)            `draw_win_rates`
2. head-to-head win-rate matrix and Bradley–Terry ranking       `draw_head_to_head`
   paired comparisons of every pair, Holm-adjusted (significance matrix) `draw_paired`
3. gold reward vs KL frontiers, matched-KL table, Gao et al. fits `draw_reward_vs_kl`
4. win rate vs sampling temperature (DPO, Fig. 2 right)         `draw_temperatures`
5. win rate and gold reward vs model size (InstructGPT, Fig. 1) `draw_model_sizes`
6. helpfulness vs harmlessness across iterations (Llama 2)      `draw_iterations`
7. gold and proxy reward vs √KL (Gao et al. 2022)               `draw_overoptimization`
8. training curves with seed bands                              `draw_training_curves`
   gold reward vs policy samples and vs KL of online methods    `draw_sample_efficiency`
(9, the results table, is in `tables.py`.)
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np
from alignbench.analysis.runs import (
    Group,
    Run,
    group_runs,
    method_order,
    policy_interval,
    setting_order,
)
from alignbench.analysis.stats import (
    Interval,
    describe_intervals,
    metric_interval,
    seed_interval,
)
from alignbench.analysis.style import (
    COLUMN_WIDTH,
    FULL_WIDTH,
    Drawn,
    Skipped,
    marker_of,
    method_colours,
)

WIN_RATE = "eval/win_rate"
GOLD = "eval/gold_reward"
KL = "eval/kl"
ANCHOR = "sft"  # the policy every win rate and ranking is relative to


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _colours(runs: Sequence[Run]) -> dict[str, tuple]:
    return method_colours(method_order(r.method for r in runs))


def _group_colours(runs: Sequence[Run], groups: Sequence[Group]) -> dict[str, tuple]:
    """Each group in its method's colour; a method's several groups (sweep values) in lighter shades."""
    base = _colours(runs)
    colours = {}
    for method in {g.method for g in groups}:
        mine = [g for g in groups if g.method == method]
        for i, g in enumerate(mine):
            lighten = 0.55 * i / max(len(mine) - 1, 1) if len(mine) > 1 else 0.0
            colours[g.label] = tuple(c + (1 - c) * lighten for c in base[method][:3])
    return colours


def _legend(ax, outside: bool = False, **kwargs) -> None:
    """A legend inside the axes where it is short, outside on the right where it is long (or asked)."""
    entries = len(ax.get_legend_handles_labels()[1])
    if outside or entries > 4:
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0), **kwargs)
    else:
        ax.legend(frameon=False, loc="best", **kwargs)


def _judge_name(runs: Sequence[Run]) -> str:
    judges = {r.config.get("eval", {}).get("judge", "gold") for r in runs}
    return judges.pop() if len(judges) == 1 else "/".join(sorted(judges))


def _errorbar(ax, x, intervals: Sequence[Interval], **kwargs):
    """Points at the means with asymmetric error bars where an interval exists."""
    means = np.array([i.mean for i in intervals])
    low = np.array([i.mean - i.low if np.isfinite(i.low) else 0.0 for i in intervals])
    high = np.array([i.high - i.mean if np.isfinite(i.high) else 0.0 for i in intervals])
    return ax.errorbar(x, means, yerr=np.vstack([low, high]), **kwargs)


def _despine(*axes) -> None:
    import seaborn as sns

    for ax in axes:
        sns.despine(ax=ax)


def _note(ax, text: str) -> None:
    """What the error bars are, written above the axes (the caption repeats it)."""
    ax.set_title(_fitted(text, ax.figure), loc="left", fontsize=5, color="0.35")


def _figure_note(fig, text: str) -> None:
    """`_note` above all of a figure's panels, where their own titles name them."""
    fig.suptitle(_fitted(text, fig), x=0.0, ha="left", fontsize=5, color="0.35")


def _fitted(text: str, fig) -> str:
    """`text` in lines that fit the figure's width at the notes' 5 pt (about 30 characters an
    inch). Runs with one seed beside runs with several give a note of two kinds of interval,
    wider than a one-column figure; on one line, constrained layout squeezed the axes to a strip."""
    return "\n".join(textwrap.wrap(text, width=max(30, int(28 * fig.get_figwidth()))))


# --- 1. win rate vs SFT -------------------------------------------------------------------
def draw_win_rates(runs: list[Run], n_boot: int = 1000) -> Drawn:
    groups = [g for g in group_runs(runs) if all(WIN_RATE in r.metrics for r in g.runs)]
    if not groups:
        raise Skipped(f"no finished run has {WIN_RATE}")
    plt, colours = _plt(), _group_colours(runs, groups)
    intervals = [policy_interval(g.runs, WIN_RATE, n_boot) for g in groups]
    fig, ax = plt.subplots(figsize=(max(COLUMN_WIDTH, 0.32 * len(groups) + 0.8), 2.3), layout="constrained")
    x = np.arange(len(groups))
    ax.bar(x, [i.mean for i in intervals], color=[colours[g.label] for g in groups], width=0.7, label="_bars")
    _errorbar(ax, x, intervals, fmt="none", ecolor="black", elinewidth=0.8, label="_intervals")
    for xi, g in zip(x, groups):
        if len(g.runs) > 1:  # each seed as a dot over its bar
            ax.scatter(np.full(len(g.runs), xi), [r.metrics[WIN_RATE] for r in g.runs], s=6, color="black", zorder=3, label="_seeds")
    ax.axhline(0.5, color="0.4", linestyle="--", linewidth=0.8, label="tie with SFT (0.5)")
    ax.set_xticks(x, [g.label for g in groups], rotation=35, ha="right")
    ax.set_xlabel("Policy")
    ax.set_ylabel(f"Win rate vs SFT ({_judge_name(runs)} judge)")
    low = min((i.low if np.isfinite(i.low) else i.mean) for i in intervals)
    ax.set_ylim(min(0.4, low - 0.03), max(max((i.high if np.isfinite(i.high) else i.mean) for i in intervals) + 0.03, 0.6))
    bars = describe_intervals(intervals)
    seeds = sorted({len(g.runs) for g in groups})
    ax.legend(loc="upper right", frameon=False)
    _note(ax, bars + ("; dots: seeds" if max(seeds) > 1 else ""))
    _despine(ax)
    caption = (f"Win rate against the SFT policy's samples on the same test prompts, ties counted 1/2, "
               f"{_judge_name(runs)} judge; {bars}" + ("; dots are single seeds." if max(seeds) > 1 else "."))
    return Drawn("win_rate_vs_sft", "Win rate vs SFT", fig, caption)


# --- 2. head to head ------------------------------------------------------------------------
def draw_head_to_head(runs: list[Run], n_boot: int = 1000) -> Drawn:
    import pandas as pd
    import seaborn as sns
    from alignbench.analysis.head_to_head import compare_policies
    from alignbench.analysis.tables import format_table

    groups = group_runs(runs)
    h2h = compare_policies(groups)
    rates, names = h2h.win_rates(), h2h.names
    plt = _plt()
    m = len(names)
    ranked = h2h.connected()
    fig, axes = plt.subplots(1, 2 if ranked else 1, figsize=(FULL_WIDTH, 0.28 * m + 1.6), gridspec_kw={"width_ratios": [1.3, 1]} if ranked else None, squeeze=False, layout="constrained")
    ax = axes[0, 0]
    sns.heatmap(rates, ax=ax, annot=True, fmt=".2f", annot_kws={"fontsize": 5}, cmap="vlag", center=0.5, vmin=0, vmax=1, mask=np.isnan(rates),
                square=True, linewidths=0.3, xticklabels=names, yticklabels=names, cbar=False)
    ax.set_title("P(row beats column), ties 1/2", loc="left", fontsize=6)
    ax.set_xlabel("Opponent (column)")
    ax.set_ylabel("Policy (row)")
    ax.tick_params(axis="x", rotation=45)
    for label in ax.get_xticklabels():
        label.set_ha("right")
    units = int((h2h.counts.sum(axis=(1, 2)) > 0).sum())
    judge = "gold judge rebuilt from the runs' world config"
    low, high = h2h.win_rate_intervals(n_boot=n_boot)
    met = sorted({int(k) for k in h2h.seeds_met()[np.isfinite(rates)]})
    cell_intervals = [Interval(0.0, 0.0, 0.0, "two-level" if k > 1 else "prompts", k) for k in met]
    noise = describe_intervals(cell_intervals, what="intervals")
    pooled = (f"the {met[0]} seed(s) both ran" if len(met) == 1 else
              f"the seeds both ran: {met[0]} to {met[-1]} of {len(h2h.seeds)} by pair, each cell's interval over its own")
    caption = (f"Left: win rate of each row policy against each column policy on the same {units} test prompts "
               f"({judge}, ties 1/2, pooled over {pooled}); `head_to_head.md` gives each cell's {noise}.")
    cells = [[("–" if not np.isfinite(rates[i, j]) else f"{rates[i, j]:.3f} [{low[i, j]:.3f}, {high[i, j]:.3f}]") for j in range(m)] for i in range(m)]
    tables = {
        "head_to_head": pd.DataFrame(cells, index=names, columns=names).reset_index(names="policy"),
    }
    if ranked:
        anchor = next((n for n in names if n == ANCHOR), None)
        ranking = h2h.ranking(anchor, n_boot=n_boot)
        order = np.argsort(ranking.strength)
        ax2 = axes[0, 1]
        colours = _group_colours(runs, groups)
        y = np.arange(m)
        ax2.errorbar(ranking.strength[order], y, xerr=np.vstack([ranking.strength[order] - ranking.low[order], ranking.high[order] - ranking.strength[order]]),
                     fmt="none", ecolor="0.3", elinewidth=0.8, label="_intervals")
        ax2.scatter(ranking.strength[order], y, c=[colours[names[i]] for i in order], s=18, zorder=3, label="_strengths")
        ax2.axvline(0, color="0.4", linestyle="--", linewidth=0.8)
        ax2.set_yticks(y, [names[i] for i in order])
        ax2.set_xlabel(f"Bradley–Terry strength (log-odds vs {ranking.anchor})")
        bars = describe_intervals([Interval(0.0, 0.0, 0.0, "two-level" if ranking.seeds > 1 else "prompts", ranking.seeds)])
        all_ran = ranking.seeds == len(h2h.seeds)
        of_all = "" if all_ran else f" (of {len(h2h.seeds)})"
        _note(ax2, f"{bars.split(':')[0]}: " + ("two-level bootstrap" if ranking.seeds > 1 else "bootstrap over prompts")
              + f", {ranking.seeds} seed(s){'' if all_ran else f' (of {len(h2h.seeds)}: those every policy ran)'} × {ranking.units} prompts ({ranking.bootstrap} resamples)")
        _despine(ax2)
        caption += (f" Right: Bradley–Terry strengths fitted to all comparisons at the {ranking.seeds} seed(s) every policy ran{of_all}, "
                    f"relative to {ranking.anchor} (P(i beats j) = σ(θi − θj)); {bars}.")
        rows = [{"rank": rank + 1, "policy": names[i], "strength": ranking.strength[i], "ci_low": ranking.low[i], "ci_high": ranking.high[i],
                 f"p_beats_{ranking.anchor}": 1 / (1 + math.exp(-ranking.strength[i]))} for rank, i in enumerate(order[::-1])]
        tables["bradley_terry"] = pd.DataFrame(rows)
    else:
        caption += (" Bradley–Terry ranking omitted: " + ("some policies were never compared with the others (different prompts or seeds)." if h2h.ranking_seeds()
                    else "no seed at which every policy ran (each replicate of its bootstrap needs them all)."))
    texts = {f"{name}.{ext}": format_table(frame, fmt) for name, frame in tables.items() for ext, fmt in (("md", "md"), ("tex", "latex"))}
    return Drawn("head_to_head", "Head-to-head win rates and Bradley–Terry ranking", fig, caption, texts)


# --- 2b. paired comparisons ---------------------------------------------------------------------
def draw_paired(runs: list[Run], n_boot: int = 1000) -> Drawn:
    """Every pair of policies on the same seeds and prompts (analysis/paired.py): a significance
    matrix per metric, row − column, starred where Holm-adjusted p < 0.05."""
    import seaborn as sns
    from alignbench.analysis.paired import PAIRED_METRICS, paired_comparisons, paired_frame
    from alignbench.analysis.tables import format_table

    groups = group_runs(runs)
    result = paired_comparisons(groups, n_boot=n_boot)
    metrics = [k for k in PAIRED_METRICS if any(c.metric == k for c in result.comparisons)]
    if not metrics:
        raise Skipped("needs two or more policies with gold reward or win rate on the same seeds: with one seed, their samples.jsonl "
                      "(per-prompt values, which only a local directory has); with several, their metrics suffice")
    plt = _plt()
    names = [g.label for g in groups if any(g.label in (c.a, c.b) for c in result.comparisons)]
    m = len(names)
    fig, axes = plt.subplots(1, len(metrics), figsize=(FULL_WIDTH, 0.28 * m + 1.6), squeeze=False, layout="constrained")
    for ax, key in zip(axes[0], metrics):
        diff, text = np.full((m, m), np.nan), np.full((m, m), "", dtype=object)
        for c in (c for c in result.comparisons if c.metric == key):
            i, j = names.index(c.a), names.index(c.b)
            star = "*" if c.significant else ""
            diff[i, j], diff[j, i] = c.diff, -c.diff
            text[i, j], text[j, i] = f"{c.diff:+.2f}{star}", f"{-c.diff:+.2f}{star}"
        limit = np.nanmax(np.abs(diff)) if np.isfinite(diff).any() else 0.0
        limit = limit if limit > 1e-9 else 1.0  # all equal: a neutral colour, not noise stretched over the scale
        sns.heatmap(diff, ax=ax, annot=text, fmt="", annot_kws={"fontsize": 4.5}, cmap="vlag", center=0, vmin=-limit, vmax=limit, mask=np.isnan(diff),
                    square=True, linewidths=0.3, xticklabels=names, yticklabels=names, cbar=False)
        best = textwrap.fill("best group: " + ", ".join(result.best_group.get(key, [])), width=70)
        ax.set_title(f"{PAIRED_METRICS[key]}: row − column (* Holm p < 0.05)\n{best}", loc="left", fontsize=5.5)
        ax.tick_params(axis="x", rotation=45)
        for label in ax.get_xticklabels():
            label.set_ha("right")
    frame = paired_frame(result)
    shown = frame.copy()  # p-values as text: "< 0.001" rather than a rounded 0
    for column in ("p", "p_holm"):
        shown[column] = [("< 0.001" if v < 0.001 else f"{v:.3f}") if np.isfinite(v) else "–" for v in frame[column]]
    seeds = sorted({c.seeds for c in result.comparisons})
    header = (f"Paired comparisons of every pair of policies on the same seeds and test prompts ({'/'.join(map(str, seeds))} seed(s)); "
              f"{result.describe()}; p-values Holm-adjusted over the pairs of each metric. "
              + " ".join(f"Best group by {PAIRED_METRICS[k]} (not told apart from the best at 5%, Holm over the comparisons with the best): {', '.join(result.best_group[k])}." for k in metrics))
    caption = ("Significance matrices: the difference row − column in each metric, paired on seeds and prompts, starred where its "
               "Holm-adjusted p-value is below 0.05. " + header)
    tables = {"paired.md": header + "\n\n" + format_table(shown, "md"), "paired.csv": frame.to_csv(index=False),
              "paired.tex": "% " + header + "\n" + format_table(shown, "latex").replace("< 0.001", "$<$ 0.001")}
    return Drawn("paired", "Paired comparisons", fig, caption, tables)


# --- helpers for sweeps ------------------------------------------------------------------------
def _by_setting(runs: list[Run], key) -> dict[Any, list[Run]]:
    """Runs keyed by a value (a function of the run), in sorted key order."""
    grouped: dict[Any, list[Run]] = {}
    for r in runs:
        value = key(r)
        if value is not None:
            grouped.setdefault(value, []).append(r)
    return dict(sorted(grouped.items(), key=lambda kv: setting_order(kv[0] if isinstance(kv[0], tuple) else (kv[0],))))


# --- 3. reward vs KL ---------------------------------------------------------------------------
def _frontier_seed_band(frontier) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Each seed's own frontier (from SFT where known), interpolated on a KL grid over the range all
    seeds cover: the grid and the min and max over seeds."""
    from alignbench.analysis.stats import interpolate_at

    if len(frontier.seeds) < 2:
        return None
    kl = frontier.kl  # [K, S]
    gold = frontier.gold.mean(axis=2)  # [K, S]
    if frontier.anchor_gold is not None:
        kl = np.vstack([np.zeros((1, kl.shape[1])), kl])
        gold = np.vstack([frontier.anchor_gold.mean(axis=1)[None], gold])
    start, end = kl.min(axis=0).max(), kl.max(axis=0).min()
    if not end > start:
        return None
    grid = np.linspace(start, end, 50)
    curves = np.stack([[interpolate_at(kl[:, s], gold[:, s], x) for x in grid] for s in range(kl.shape[1])])
    return grid, curves.min(axis=0), curves.max(axis=0)


def draw_reward_vs_kl(runs: list[Run], n_boot: int = 1000) -> Drawn:
    import pandas as pd
    from alignbench.analysis.frontier import KL_TARGETS, find_frontiers, form_text, gao_fits, matched_kl
    from alignbench.analysis.tables import format_table, interval_cell

    frontiers = find_frontiers(runs)
    if not frontiers:
        raise Skipped("needs runs of one method at two or more settings of its own section (a sweep such as dpo.beta or ppo.init_kl_coef: experiments/frontier.yaml)")
    plt = _plt()
    fits = {fit.label: fit for fit in gao_fits(frontiers, n_boot)}
    panels = _frontier_panels(frontiers)
    fig, axes = plt.subplots(1, len(panels), figsize=((COLUMN_WIDTH + 1.2) * len(panels), 2.8), layout="constrained", sharey=True, squeeze=False)
    intervals = []
    for ax, (family, members) in zip(axes[0], panels.items()):
        # colours within a panel: a palette's colours repeat past ten curves, so each panel starts it afresh
        colours = _group_colours([r for f in members for r in f.group.runs], [f.group for f in members])
        intervals += _draw_frontier_panel(ax, members, colours, fits, runs, n_boot)
        if len(panels) > 1:
            ax.set_title(family, fontsize=7)
        ax.set_xlabel("KL(π ‖ π_SFT) on test prompts (nats)")
        _legend(ax, outside=True)
        _despine(ax)
    axes[0][0].set_ylabel("Gold reward (test prompts)")
    bars = describe_intervals(intervals)
    seeds = sorted({len(f.seeds) for f in frontiers})
    if len(panels) > 1:  # the panels' titles are their families: the note goes above them all, not over the first
        _figure_note(fig, bars)
    else:
        _note(axes[0][0], bars)
    # The matched-KL table: every curve's gold reward at each target, best group marked.
    rows = matched_kl(frontiers, n_boot=n_boot)
    matched = pd.DataFrame([{"policy": label, **{f"KL {t:g}": next(interval_cell(r.interval) + (" †" if r.best_group else "") for r in rows if r.label == label and r.kl == t) for t in KL_TARGETS}}
                            for label in [f.label for f in frontiers]])
    matched_csv = pd.DataFrame([{"policy": r.label, "kl": r.kl, "gold_reward": r.interval.mean, "ci_low": r.interval.low, "ci_high": r.interval.high,
                                 "diff_vs_best": r.vs_best.mean if r.vs_best else math.nan, "diff_ci_low": r.vs_best.low if r.vs_best else math.nan,
                                 "diff_ci_high": r.vs_best.high if r.vs_best else math.nan, "p_holm_vs_best": r.p_holm_vs_best, "best_group": r.best_group,
                                 "seeds": r.interval.n} for r in rows])
    matched_intervals = [r.interval for r in rows]
    matched_note = (f"Gold reward at matched KL, read off each frontier by linear interpolation between its settings (from SFT at KL 0), "
                    f"never extrapolated (– where the curve does not reach that KL); {describe_intervals(matched_intervals, what='intervals')}; "
                    f"† marks the best group at each KL: the highest and every curve whose paired difference from it is not significant "
                    f"(Holm-adjusted p >= 0.05 over the comparisons with the best). reward_vs_kl_matched.csv adds each curve's paired difference from the best at that KL (diff_vs_best, with its interval).")
    fit_rows = [{"policy": fit.label, "form": form_text(fit.form), "alpha": interval_cell(fit.alpha), "beta": interval_cell(fit.beta), "points": fit.points} for fit in fits.values()]
    fit_csv = pd.DataFrame([{"policy": fit.label, "form": form_text(fit.form), "alpha": fit.alpha.mean, "alpha_ci_low": fit.alpha.low, "alpha_ci_high": fit.alpha.high,
                             "beta": fit.beta.mean, "beta_ci_low": fit.beta.low, "beta_ci_high": fit.beta.high, "points": fit.points} for fit in fits.values()])
    fit_note = ("Gao et al. 2022's functional forms fitted by least squares to each frontier's gain in gold reward over SFT, R = gold − gold_SFT, "
                "against d = √KL: best-of-n R(d) = d(α − βd), every other method the RL form R(d) = d(α − β log d); "
                + describe_intervals([i for fit in fits.values() for i in (fit.alpha, fit.beta)], what="intervals") + ".")
    tables = {
        "reward_vs_kl_matched.md": matched_note + "\n\n" + format_table(matched, "md"), "reward_vs_kl_matched.tex": "% " + matched_note + "\n" + format_table(matched, "latex"),
        "reward_vs_kl_matched.csv": matched_csv.to_csv(index=False),
    }
    if fit_rows:
        frame = pd.DataFrame(fit_rows)
        tables.update({"reward_vs_kl_fits.md": fit_note + "\n\n" + format_table(frame, "md"), "reward_vs_kl_fits.tex": "% " + fit_note + "\n" + format_table(frame, "latex"),
                       "reward_vs_kl_fits.csv": fit_csv.to_csv(index=False)})
    swept_keys = sorted({k for f in frontiers for k in f.swept})
    caption = (f"Gold reward against the KL divergence from the SFT policy, one curve per method across a sweep of "
               f"{', '.join(swept_keys)} (points labelled with the swept value, {'/'.join(map(str, seeds))} seeds each; dotted: from SFT at KL 0); "
               f"{bars}; shaded: the range of the seeds' own curves; dashed: Gao et al.'s fitted forms (reward_vs_kl_fits.md)"
               + (f"; one panel per method family ({', '.join(panels)}), the y-axis shared. " if len(panels) > 1 else ". ")
               + f"reward_vs_kl_matched.md gives each method's gold reward at KL {', '.join(f'{t:g}' for t in KL_TARGETS)} with the best group marked.")
    return Drawn("reward_vs_kl", "Reward vs KL frontiers", fig, caption, tables)


MAX_CURVES_PER_PANEL = 7
"""More curves than this in one frontier panel and its colours and markers stop telling them apart:
the frontier figure then draws one panel per method family (`AlignmentMethod.family`)."""


def _method_family(method: str) -> str:
    from alignbench.config import ConfigError
    from alignbench.registry import get_method

    try:
        return get_method(method).family
    except ConfigError:  # a method this installation does not have (runs read from elsewhere)
        return "other"


def _frontier_panels(frontiers: list) -> dict[str, list]:
    """{family: its frontiers}, in the order the frontiers come; one panel for them all where few."""
    if len(frontiers) <= MAX_CURVES_PER_PANEL:
        return {"all": list(frontiers)}
    panels: dict[str, list] = {}
    for f in frontiers:
        panels.setdefault(_method_family(f.group.method), []).append(f)
    return panels


def _draw_frontier_panel(ax, frontiers: list, colours: dict, fits: dict, runs: list[Run], n_boot: int) -> list[Interval]:
    """One panel of `draw_reward_vs_kl`: each frontier's points with intervals, its line from SFT, its
    seed band and Gao fit, SFT's point and the matched-KL targets. Returns the points' intervals."""
    from alignbench.analysis.frontier import KL_TARGETS
    from alignbench.analysis.stats import gao_curve

    intervals = []
    for index, f in enumerate(frontiers):
        colour = colours[f.label]
        kl_points, gold_points = f.kl.mean(axis=1), f.gold.mean(axis=(1, 2))
        golds = [policy_interval_of_point(f, k, n_boot) for k in range(len(f.settings))]
        intervals += golds
        name = ", ".join(k.removeprefix(f.group.method + ".") for k in f.swept)
        order = np.argsort(kl_points)
        _errorbar(ax, kl_points[order], [golds[i] for i in order], color=colour, marker=marker_of(index), linestyle="-", elinewidth=0.6, label=f"{f.label}: {name}")
        if f.anchor_gold is not None:  # the curve starts at SFT (KL 0)
            first = order[0]
            ax.plot([0.0, kl_points[first]], [f.anchor_gold.mean(), gold_points[first]], color=colour, linestyle=":", linewidth=0.8, label="_from_sft")
        band = _frontier_seed_band(f)
        if band is not None:
            ax.fill_between(band[0], band[1], band[2], color=colour, alpha=0.15, linewidth=0, label="_seed_band")
        fit = fits.get(f.label)
        if fit is not None and np.isfinite(fit.alpha.mean):
            grid = np.linspace(0, max(kl_points.max(), 1e-6), 60)
            ax.plot(grid, f.anchor_gold.mean() + gao_curve(np.sqrt(grid), fit.alpha.mean, fit.beta.mean, fit.form), color=colour, linestyle="--", linewidth=0.7, label="_gao_fit")
        for x, interval, values in zip(kl_points, golds, f.settings):
            ax.annotate(",".join(_format_setting(v) for v in values), (x, interval.mean), textcoords="offset points", xytext=(3, 2), fontsize=4.5, color="0.3")
    sft = [r for r in runs if r.method == ANCHOR and KL in r.metrics and GOLD in r.metrics]
    if sft:
        ax.scatter([np.mean([r.metrics[KL] for r in sft])], [np.mean([r.metrics[GOLD] for r in sft])], marker="*", s=40, color="black", zorder=4, label="SFT")
    if any(f.label in fits for f in frontiers):
        ax.plot([], [], color="0.3", linestyle="--", linewidth=0.7, label="Gao et al. fit")
    for target in KL_TARGETS:
        ax.axvline(target, color="0.85", linewidth=0.5, zorder=0, label="_target")
    return intervals


def policy_interval_of_point(frontier, k: int, n_boot: int) -> Interval:
    """The gold reward of one point of a frontier over its seeds (two-level bootstrap)."""
    from alignbench.analysis.stats import replicate_interval, two_level_replicates

    values = frontier.gold[k]
    return replicate_interval(float(values.mean()), two_level_replicates(values, n_boot), values.shape[0], per_prompt=frontier.per_prompt)


def _format_setting(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ",".join(_format_setting(v) for v in value) + "]"
    return str(value)


# --- 4. temperature ------------------------------------------------------------------------------
_TEMPERATURE_KEY = re.compile(r"^eval/T([0-9.eE+-]+)/win_rate$")


def _win_rates_by_temperature(run: Run) -> dict[float, dict[str, float]]:
    """{t: metrics-like dict with 'win_rate' (+ intervals)} from eval.temperatures and eval.temperature."""
    out: dict[float, dict[str, float]] = {}
    for key, value in run.metrics.items():
        match = _TEMPERATURE_KEY.match(key)
        if match:
            out[float(match.group(1))] = {"win_rate": value, "win_rate_ci_low": run.metrics.get(key + "_ci_low"), "win_rate_ci_high": run.metrics.get(key + "_ci_high")}
    t = run.settings.get("eval.temperature")
    if t is not None and WIN_RATE in run.metrics and float(t) not in out:
        out[float(t)] = {"win_rate": run.metrics[WIN_RATE], "win_rate_ci_low": run.metrics.get(WIN_RATE + "_ci_low"), "win_rate_ci_high": run.metrics.get(WIN_RATE + "_ci_high")}
    return out


def draw_temperatures(runs: list[Run]) -> Drawn:
    curves = group_runs(runs, ignore=lambda key, method: key in ("eval.temperature", "eval.temperatures"))
    plt, colours = _plt(), _group_colours(runs, curves)
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.4), layout="constrained")
    drawn, intervals, all_t = 0, [], set()
    for index, curve in enumerate(curves):
        per_run = [_win_rates_by_temperature(r) for r in curve.runs]
        temperatures = sorted({t for p in per_run for t in p})
        if len(temperatures) < 2:
            continue
        points = [metric_interval([p[t] for p in per_run if t in p], "win_rate") for t in temperatures]
        _errorbar(ax, temperatures, points, color=colours[curve.label], marker=marker_of(index), elinewidth=0.6, label=curve.label)
        intervals += points
        all_t.update(temperatures)
        drawn += 1
    if not drawn:
        raise Skipped("needs evaluations at two or more temperatures: eval.temperatures (experiments/paper/temperature.yaml) or runs at several eval.temperature values")
    ax.axhline(0.5, color="0.4", linestyle="--", linewidth=0.8, label="tie with SFT")
    ax.set_xlabel("Sampling temperature")
    ax.set_ylabel("Win rate vs SFT at the same temperature")
    bars = describe_intervals(intervals)
    _note(ax, bars)
    _legend(ax)
    _despine(ax)
    caption = (f"Win rate against the SFT policy sampled at the same temperature, on the test prompts "
               f"({_judge_name(runs)} judge, ties 1/2), at temperatures {', '.join(f'{t:g}' for t in sorted(all_t))}; {bars}.")
    return Drawn("win_rate_vs_temperature", "Win rate vs sampling temperature", fig, caption)


# --- 5. model size ---------------------------------------------------------------------------------
def _parameter_counts(names: Sequence[str], world_config: dict) -> dict[str, int] | None:
    """Parameter counts of the named tiny world models (built, not loaded: no files needed)."""
    from alignbench.models import TINY_MODELS

    if not all(n in TINY_MODELS for n in names):
        return None
    from alignbench.config import from_dict
    from alignbench.models import (
        build_tiny_policy,
        build_world_tokenizer,
        count_parameters,
    )
    from alignbench.log import quiet_libraries
    from alignbench.world import AssistantWorld, WorldConfig

    quiet_libraries()  # `alignbench plot` loads transformers only here (its other figures read files)
    tokenizer = build_world_tokenizer(AssistantWorld(from_dict(WorldConfig, world_config, "world")).vocabulary())
    return {n: count_parameters(build_tiny_policy(n, tokenizer)) for n in names}


def draw_model_sizes(runs: list[Run]) -> Drawn:
    curves = group_runs(runs, ignore=lambda key, method: key.startswith("model."))
    curves = [c for c in curves if len({r.settings.get("model.name") for r in c.runs}) >= 2]
    if not curves:
        raise Skipped("needs runs of one method at two or more model.name values (experiments/paper/model_size.yaml)")
    plt, colours = _plt(), _group_colours(runs, curves)
    names = sorted({r.settings.get("model.name") for c in curves for r in c.runs})
    counts = _parameter_counts(names, curves[0].runs[0].config.get("world", {}))
    if counts is not None:
        names = sorted(names, key=counts.get)
        position = {n: counts[n] for n in names}
    else:
        position = {n: i for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, 2, figsize=(FULL_WIDTH * 0.75, 2.4), layout="constrained")
    intervals = []
    for ax, key, ylabel in ((axes[0], WIN_RATE, "Win rate vs SFT of the same size"), (axes[1], GOLD, "Gold reward (test prompts)")):
        for index, curve in enumerate(curves):
            points = _by_setting([r for r in curve.runs if key in r.metrics], lambda r: r.settings.get("model.name"))
            ordered = sorted(points, key=position.get)
            values = [policy_interval(points[n], key) for n in ordered]
            _errorbar(ax, [position[n] for n in ordered], values, color=colours[curve.label], marker=marker_of(index), elinewidth=0.6, label=curve.label)
            intervals += values
        if counts is not None:
            ax.set_xscale("log")
            ax.set_xticks([position[n] for n in names], [f"{n.removeprefix('world-')}\n{counts[n] / 1e6:.2f}M" for n in names])
            ax.minorticks_off()
            ax.set_xlabel("Policy parameters (log scale)")
        else:
            ax.set_xticks([position[n] for n in names], names, rotation=30, ha="right")
            ax.set_xlabel("Model")
        ax.set_ylabel(ylabel)
        _despine(ax)
    axes[0].axhline(0.5, color="0.4", linestyle="--", linewidth=0.8)
    bars = describe_intervals(intervals)
    _note(axes[0], bars)
    _legend(axes[1])
    caption = ("Left: win rate against the SFT policy of the same size (each size has its own SFT, labels and reward models). "
               f"Right: gold reward, the absolute quality that makes sizes comparable (InstructGPT Fig. 1 analogue); {bars}.")
    return Drawn("win_rate_vs_model_size", "Win rate vs model size", fig, caption)


# --- 6. helpfulness vs harmlessness across iterations -------------------------------------------
HELP, HARM = "val/gold_helpfulness", "val/gold_harmlessness"


def _iterations(run: Run) -> tuple[str, dict[float, dict]]:
    """The run's evaluated iterations: rounds where it has them, else periodic checkpoints (steps)."""
    rows = [row for row in run.history if HELP in row and HARM in row]
    rounds = {float(row["round"]): row for row in rows if row.get("round") is not None}
    if rounds:
        return "round", rounds
    return "step", {float(row["step"]): row for row in rows if row.get("step") is not None}


def _strip_prefix(row: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in row.items() if k.startswith(prefix)}


def draw_iterations(runs: list[Run]) -> Drawn:
    groups = group_runs(runs)
    plt, colours = _plt(), _group_colours(runs, groups)
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH + 1.4, 2.8), layout="constrained")  # room for the legend beside it
    drawn, intervals, kinds = 0, [], set()
    for index, group in enumerate(groups):
        per_run = [_iterations(r) for r in group.runs]
        kind = per_run[0][0]
        points = sorted({i for _, its in per_run for i in its})
        if len(points) < 2:
            continue
        rows = {i: [_strip_prefix(its[i], "val/") for _, its in per_run if i in its] for i in points}
        helpfulness = [metric_interval(rows[i], "gold_helpfulness") for i in points]
        harmlessness = [metric_interval(rows[i], "gold_harmlessness") for i in points]
        colour = colours[group.label]
        xs, ys = [h.mean for h in harmlessness], [h.mean for h in helpfulness]
        bars_drawn = ax.errorbar(xs, ys, yerr=_bar_lengths(helpfulness), xerr=_bar_lengths(harmlessness), color=colour, marker=marker_of(index),
                                 elinewidth=0.4, capsize=1, label=f"{group.label} ({'rounds' if kind == 'round' else 'checkpoints'})")
        for line in bars_drawn[2]:
            line.set_alpha(0.35)  # the intervals are wide on 256 validation prompts; keep the path readable
        for i, x, y in zip(points, xs, ys):
            ax.annotate(f"R{i:g}" if kind == "round" else f"{i:g}", (x, y), textcoords="offset points", xytext=(3, 2), fontsize=4.5, color=colour)
        intervals += helpfulness + harmlessness
        kinds.add(kind)
        drawn += 1
    if not drawn:
        raise Skipped("needs validation evaluations at two or more iterations: rounds of rejection_sampling / rest / hir, or PPO checkpoints with eval.eval_every > 0 (experiments/paper/iterations.yaml)")
    sft = [r for r in runs if r.method == ANCHOR and "eval/gold_helpfulness" in r.metrics]
    if sft:
        ax.scatter([np.mean([r.metrics["eval/gold_harmlessness"] for r in sft])], [np.mean([r.metrics["eval/gold_helpfulness"] for r in sft])],
                   marker="*", s=40, color="black", zorder=4, label="SFT (test prompts)")
    ax.set_xlabel("Gold harmlessness (validation prompts)")
    ax.set_ylabel("Gold helpfulness (validation prompts)")
    bars = describe_intervals(intervals).replace("test prompts", "validation prompts")
    _note(ax, bars)
    _legend(ax, outside=True)  # the paths fill the corner where the SFT star sits
    _despine(ax)
    what = " and ".join(sorted({"rounds (R1, R2, ...)" if k == "round" else "periodic checkpoints (training step)" for k in kinds}))
    caption = (f"Helpfulness against harmlessness, gold scores on the validation prompts, across {what} "
               f"(Llama 2's RLHF-V1…V5 plot); {bars}; the star is the SFT policy on the test prompts.")
    return Drawn("helpfulness_vs_harmlessness", "Helpfulness vs harmlessness across iterations", fig, caption)


def _bar_lengths(intervals: Sequence[Interval]) -> np.ndarray:
    return np.vstack([[i.mean - i.low if np.isfinite(i.low) else 0.0 for i in intervals], [i.high - i.mean if np.isfinite(i.high) else 0.0 for i in intervals]])


# --- 7. over-optimisation ---------------------------------------------------------------------------
PROXY = "eval/proxy_reward"


def _best_of_n_curves(runs: list[Run]) -> list[tuple[Group, dict[int, list[Run]]]]:
    """Methods swept over their own `n` (best-of-n), with a KL known in closed form."""
    curves = []
    for curve in group_runs(runs, ignore=lambda key, method: key == f"{method}.n"):
        points = _by_setting([r for r in curve.runs if all(k in r.metrics for k in (GOLD, PROXY, KL))], lambda r: r.settings.get(f"{r.method}.n"))
        if len(points) >= 2:
            curves.append((curve, points))
    return curves


def _checkpoint_curves(runs: list[Run]) -> list[tuple[Group, list[float], list[dict]]]:
    """Methods with periodic validation checkpoints (not rounds) that hold gold, proxy and KL."""
    needed = ("val/kl", "val/gold_reward", "val/proxy_reward")
    curves = []
    for curve in group_runs(runs):
        per_run = [{float(row["step"]): row for row in r.history if all(k in row for k in needed) and row.get("round") is None and row.get("step") is not None} for r in curve.runs]
        steps = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
        if len(steps) >= 2:
            curves.append((curve, steps, [{k: float(np.mean([p[s][k] for p in per_run])) for k in needed} for s in steps]))
    return curves


def draw_overoptimization(runs: list[Run]) -> Drawn:
    best_of_n, checkpoints = _best_of_n_curves(runs), _checkpoint_curves(runs)
    if not best_of_n and not checkpoints:
        raise Skipped("needs best-of-n runs at two or more n, or PPO runs with two or more periodic checkpoints (eval.eval_every > 0): experiments/paper/overoptimization.yaml")
    plt = _plt()
    colours = _group_colours(runs, [entry[0] for entry in best_of_n + checkpoints])
    panels = [p for p in (("best_of_n", best_of_n), ("checkpoints", checkpoints)) if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(COLUMN_WIDTH * len(panels), 2.5), squeeze=False, layout="constrained")
    caption = []
    for ax, (kind, curves) in zip(axes[0], panels):
        for index, entry in enumerate(curves):
            curve = entry[0]
            colour = colours[curve.label]
            if kind == "best_of_n":
                points = entry[1]
                ns = list(points)
                # Each run's own eval/kl: tie-aware, from its candidates (log n − (n−1)/n only without ties).
                x = [math.sqrt(max(seed_interval([r.metrics[KL] for r in points[n]]).mean, 0.0)) for n in ns]
                gold = [seed_interval([r.metrics[GOLD] for r in points[n]]).mean for n in ns]
                proxy = [seed_interval([r.metrics[PROXY] for r in points[n]]).mean for n in ns]
                for xi, n, g in zip(x, ns, gold):
                    ax.annotate(f"n={n}", (xi, g), textcoords="offset points", xytext=(2, -7), fontsize=4.5, color="0.3")
            else:
                steps, values = entry[1], entry[2]
                x = [math.sqrt(max(v["val/kl"], 0.0)) for v in values]
                gold = [v["val/gold_reward"] for v in values]
                proxy = [v["val/proxy_reward"] for v in values]
                for i in (0, len(steps) - 1):  # the path runs in training order: name its ends
                    ax.annotate(f"step {steps[i]:g}", (x[i], gold[i]), textcoords="offset points", xytext=(2, -7), fontsize=4.5, color="0.3")
            ax.plot(x, gold, color=colour, marker=marker_of(index), linestyle="-", label=f"{curve.label}: gold")
            ax.plot(x, proxy, color=colour, marker=marker_of(index), linestyle="--", markerfacecolor="white", label=f"{curve.label}: proxy (RM)")
        ax.set_xlabel("√KL(π ‖ π_SFT)  (√nats)")
        ax.set_ylabel("Reward")
        ax.set_title("Best-of-n over n (test prompts)" if kind == "best_of_n" else "Over training (validation checkpoints)")
        _legend(ax)
        _despine(ax)
        if kind == "best_of_n":
            caption.append("best-of-n at each n against √KL with each run's eval/kl (tie-aware, from its candidates' log-probabilities; "
                           "log n − (n−1)/n holds only when no two candidates tie), test prompts")
        else:
            caption.append("periodic validation checkpoints over training, in step order (first and last labelled), KL estimated on the policy's samples")
    seeds = sorted({len(entry[0].runs) for entry in best_of_n + checkpoints})
    text = ("Over-optimisation (Gao et al. 2022): gold reward (solid) and the proxy reward model's score (dashed) against √KL, for "
            + "; and for ".join(caption) + f". Points are means over {'/'.join(map(str, seeds))} seed(s), without intervals; the gap between proxy and gold is the reward model's over-optimisation.")
    return Drawn("overoptimization", "Gold and proxy reward vs √KL", fig, text)


# --- 8. training curves ---------------------------------------------------------------------------------
# The metrics every method logs first, then one that says how its own objective is doing (the
# first of these that a method logs), then the periodic validation win rate where there is one.
_COMMON_CURVES = ("train/loss", "train/kl")
_OBJECTIVE_CURVES = ("train/reward", "train/accuracy", "train/contrastive_loss", "train/margin")  # the offline base logs accuracy and margin for every objective
_VALIDATION_CURVE = "val/win_rate"


def _series(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    points = sorted((float(row["step"]), float(row[key])) for row in run.history if row.get(key) is not None and row.get("step") is not None)
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = map(np.asarray, zip(*points))
    return steps, values


def _seed_band(runs: list[Run], key: str):
    """Mean over seeds and the min–max band, on the steps the seeds share (interpolated)."""
    series = [s for s in (_series(r, key) for r in runs) if len(s[0])]
    if not series:
        return None
    if len(series) == 1:
        steps, values = series[0]
        return steps, values, values, values, 1
    start, end = max(s[0][0] for s in series), min(s[0][-1] for s in series)
    grid = np.unique(np.concatenate([s[0][(s[0] >= start) & (s[0] <= end)] for s in series]))
    if len(grid) == 0:
        return None
    stacked = np.stack([np.interp(grid, steps, values) for steps, values in series])
    return grid, stacked.mean(axis=0), stacked.min(axis=0), stacked.max(axis=0), len(series)


def curve_metrics(runs: list[Run]) -> list[str]:
    """The metrics drawn for one policy's runs: loss, KL, its objective's metric, validation win rate."""
    logged = {k for r in runs for row in r.history for k in row}
    chosen = [k for k in _COMMON_CURVES if k in logged]
    chosen += [k for k in _OBJECTIVE_CURVES if k in logged][:1]
    if _VALIDATION_CURVE in logged:
        chosen.append(_VALIDATION_CURVE)
    return chosen


def draw_training_curves(runs: list[Run]) -> Drawn:
    groups = [g for g in group_runs(runs) if any(k.startswith("train/") for r in g.runs for row in r.history for k in row)]
    if not groups:
        raise Skipped("no run logged training metrics (train/* rows in history.jsonl): the directory holds only baselines")
    plt, colours = _plt(), _group_colours(runs, groups)
    columns = max(len(curve_metrics(g.runs)) for g in groups)
    fig, axes = plt.subplots(len(groups), columns, figsize=(FULL_WIDTH, 1.25 * len(groups) + 0.3), squeeze=False, layout="constrained")
    seed_counts = set()
    for row, group in enumerate(groups):
        keys = curve_metrics(group.runs)
        for col in range(columns):
            ax = axes[row, col]
            if col >= len(keys):
                ax.set_axis_off()
                continue
            band = _seed_band(group.runs, keys[col])
            if band is None:  # the seeds logged this metric at steps they do not share (e.g. early stops): no common curve
                ax.set_axis_off()
                continue
            steps, mean, low, high, n = band
            colour = colours[group.label]
            ax.plot(steps, mean, color=colour, linewidth=0.9, label=group.label)
            if n > 1:
                ax.fill_between(steps, low, high, color=colour, alpha=0.25, linewidth=0, label=f"range over {n} seeds")
            seed_counts.add(n)
            ax.set_ylabel(keys[col], fontsize=5.5)
            if col == 0:
                ax.set_title(group.label, loc="left", fontsize=6)
            _despine(ax)
    for col in range(columns):  # the step axis is named under the lowest panel of each column
        lowest = max((row for row in range(len(groups)) if axes[row, col].axison), default=None)
        if lowest is not None:
            axes[lowest, col].set_xlabel("Training step")
    band = ("bands: range (min–max) over " + "/".join(map(str, sorted(n for n in seed_counts if n > 1))) + " seeds around the mean") if max(seed_counts) > 1 else "one seed per policy (no band)"
    _figure_note(fig, band)
    caption = f"Training curves per policy (rows): loss, estimated KL to SFT, the objective's own metric and the validation win rate where logged; {band}."
    return Drawn("training_curves", "Training curves", fig, caption)


# --- 8b. sample efficiency of the online methods --------------------------------------------------
def rollouts_per_step(run: Run) -> int | None:
    """Policy samples an online method's run draws per training step (an iteration: batch_size
    prompts × samples_per_prompt), from its config; None for a method that does not sample."""
    section = run.config.get(run.method)
    # `iterations` marks an online section: rejection sampling and ReST also have batch_size and
    # samples_per_prompt, but sample per round, not per training step.
    if not isinstance(section, dict) or not {"batch_size", "samples_per_prompt", "iterations"} <= set(section):
        return None
    return int(section["batch_size"]) * int(section["samples_per_prompt"])


def draw_sample_efficiency(runs: list[Run]) -> Drawn:
    """Validation gold reward against the policy samples drawn so far and against the validation
    KL, for every online method with periodic validation (the rlvr experiment): which method turns
    samples into gold reward fastest, and at what KL."""
    curves = []
    for group in group_runs(runs):
        per_step = {rollouts_per_step(r) for r in group.runs}
        if len(per_step) == 1 and None not in per_step and all(len(_series(r, "val/gold_reward")[0]) >= 2 for r in group.runs):
            curves.append((group, per_step.pop()))
    if not curves:
        raise Skipped("needs online methods (ppo, grpo, rloo, ...) validated at two or more steps (eval.eval_every > 0): experiments/rlvr.yaml")
    plt, colours = _plt(), _group_colours(runs, [group for group, _ in curves])
    fig, (by_samples, by_kl) = plt.subplots(1, 2, figsize=(FULL_WIDTH, 2.2 + 0.15 * math.ceil(len(curves) / 2)), layout="constrained")
    seeds, rows = set(), []
    for index, (group, per_step) in enumerate(curves):
        colour, marker = colours[group.label], marker_of(index)
        steps, gold, low, high, n = _seed_band(group.runs, "val/gold_reward")
        seeds.add(n)
        samples = steps * per_step
        by_samples.plot(samples, gold, color=colour, marker=marker, markersize=2.5, linewidth=0.9, label=group.label)
        if n > 1:
            by_samples.fill_between(samples, low, high, color=colour, alpha=0.2, linewidth=0)
        kl_band = _seed_band(group.runs, "val/kl")
        if kl_band is not None:
            kl_steps, kl = kl_band[0], kl_band[1]
            shared = np.intersect1d(steps, kl_steps)
            by_kl.plot(kl[np.isin(kl_steps, shared)], gold[np.isin(steps, shared)], color=colour, marker=marker, markersize=2.5, linewidth=0.9, label=group.label)
        rows.append((group.label, n, dict(zip(samples.astype(int).tolist(), gold.tolist()))))
    by_samples.set_xlabel("Policy samples drawn")
    by_kl.set_xlabel("KL(π ‖ π_SFT), validation (nats)")
    for ax in (by_samples, by_kl):
        ax.set_ylabel("Gold reward (validation)")
        _despine(ax)
    # Below both panels: a policy's label carries its settings, too long for inside an axes.
    handles, labels = by_samples.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(2, len(labels)), frameon=False)
    counts = "/".join(map(str, sorted(seeds)))
    band = f"bands: range (min–max) over {counts} seeds around the mean" if max(seeds) > 1 else "one seed per policy (no band)"
    caption = ("Sample efficiency of the online methods: gold reward on the validation split against the policy samples drawn so "
               f"far (left; training step × batch_size × samples_per_prompt) and against the KL to SFT at the same checkpoints "
               f"(right, in training order). Means over {counts} seed(s); {band}; validation points have no intervals "
               "(gold_vs_samples.md lists them).")
    columns = sorted({samples for _, _, values in rows for samples in values})
    table = [f"Gold reward on the validation split after each number of policy samples (mean over {counts} seed(s)).", "",
             "| policy | seeds | " + " | ".join(map(str, columns)) + " |", "|---|---|" + "---|" * len(columns)]
    table += [f"| {label} | {n} | " + " | ".join(f"{values[c]:.3f}" if c in values else "" for c in columns) + " |" for label, n, values in rows]
    return Drawn("gold_vs_samples", "Gold reward vs policy samples (online methods)", fig, caption, {"gold_vs_samples.md": "\n".join(table) + "\n"})
