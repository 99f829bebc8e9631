"""The results table: one row per run (or per method, averaged over seeds), from the
`metrics.json` files of an experiment directory — offline, no W&B needed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from alignbench.analysis.paired import PAIRED_METRICS, paired_comparisons
from alignbench.analysis.runs import group_runs, load_local_runs, policy_interval
from alignbench.analysis.stats import describe_intervals

# The columns of a sweep's summary (means over seeds), in the order a reader wants them. No
# `_ci_low`/`_ci_high`: the mean of each seed's evaluation-only bounds is no interval of the mean
# (`results_table` gives that).
TABLE_METRICS = (
    "eval/win_rate", "eval/gold_reward",
    "eval/gold_helpfulness", "eval/gold_harmlessness", "eval/proxy_reward", "eval/kl",
    "eval/length", "eval/distinct_2",
    "budget/human_labels", "budget/ai_labels", "budget/policy_samples", "budget/train_tokens", "budget/wall_s",
    # The shared reward models' held-out accuracy against gold, and that of the reward model a
    # method optimised where it trained its own (RLAIF's AI-label RM, Constitutional AI's PM).
    "rm/helpfulness_accuracy", "rm/safety_accuracy", "rm/optimised_accuracy",
)


def results_frame(runs: list[dict]) -> pd.DataFrame:
    rows = [{"experiment": r["experiment"], "method": r["method"], "seed": r["seed"], "run": r["run_name"], **r["metrics"]} for r in runs]
    return pd.DataFrame(rows)


def _order(methods) -> list[str]:
    baselines = ["sft", "best_of_n", "best_of_n_gold"]
    return [m for m in baselines if m in methods] + sorted(m for m in methods if m not in baselines)


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (experiment, method): metrics averaged over seeds, plus the seed count."""
    columns = [c for c in TABLE_METRICS if c in frame.columns]
    grouped = frame.groupby(["experiment", "method"], sort=False)
    table = grouped[columns].mean()
    table.insert(0, "seeds", grouped.size())
    methods = _order(table.index.get_level_values("method").unique())
    return table.reset_index().set_index("method").loc[methods].reset_index()


def _fmt(value) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and math.isnan(value):
            return "–"
        if float(value).is_integer() or abs(value) >= 1000:
            return f"{value:,.0f}"
        return _three(value)
    return str(value)


def format_table(table: pd.DataFrame, fmt: str = "md") -> str:
    """The table as Markdown, CSV or LaTeX (booktabs)."""
    if fmt == "csv":
        return table.to_csv(index=False)
    headers = [str(c) for c in table.columns]
    cells = [[_fmt(v) for v in row] for row in table.itertuples(index=False)]
    if fmt == "latex":
        escape = lambda s: s.replace("_", r"\_").replace("†", r"$^\dagger$").replace("±", r"$\pm$")
        lines = [r"\begin{tabular}{" + "l" * 2 + "r" * (len(headers) - 2) + "}", r"\toprule", " & ".join(map(escape, headers)) + r" \\", r"\midrule"]
        lines += [" & ".join(map(escape, row)) + r" \\" for row in cells]
        return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells]) + "\n"


# The results table of `alignbench plot` (figure 9): every policy (method and swept setting),
# mean ± 95% interval over seeds — or, for one seed, the evaluation's own bootstrap interval.
RESULT_COLUMNS = (
    ("eval/win_rate", "win rate vs SFT"), ("eval/gold_reward", "gold reward"), ("eval/gold_helpfulness", "helpfulness"),
    ("eval/gold_harmlessness", "harmlessness"), ("eval/proxy_reward", "proxy reward"), ("eval/kl", "KL"),
    ("eval/length", "length"), ("eval/distinct_2", "distinct-2"),
)
BUDGET_COLUMNS = (
    ("budget/human_labels", "human labels"), ("budget/ai_labels", "AI labels"), ("budget/policy_samples", "policy samples"),
    ("budget/train_tokens", "train tokens"), ("budget/wall_s", "wall s"),
)


def interval_cell(interval, fmt: str = "md") -> str:
    """'0.591 ± 0.020' (over seeds: symmetric), '0.591 [0.572, 0.608]' (one seed's bootstrap) or '0.591'."""
    if math.isnan(interval.mean):
        return "–"
    pm = r"$\pm$" if fmt == "latex" else "±"
    if interval.over in ("seeds", "two-level") and np.isfinite(interval.low):
        return f"{_three(interval.mean)} {pm} {_three(interval.half_width)}"
    if interval.over == "prompts":
        return f"{_three(interval.mean)} [{_three(interval.low)}, {_three(interval.high)}]"
    return _three(interval.mean)


def _three(value: float) -> str:
    text = f"{value:.3f}"
    return "0.000" if text == "-0.000" else text


# What eval/kl is (issue 16): written under every results table.
KL_NOTE = ("eval/kl: the KL between the distributions actually sampled: the policy at the evaluation's (T, top_p) against "
           "the reference at the same (T, top_p), a Monte Carlo estimate of the sequence KL over the policy's samples; "
           "best-of-n's is the tie-aware value.")
BEST_MARK = "†"


@dataclass
class ResultsTable:
    """The results of an experiment directory: one row per policy (runs that differ only in seed)."""

    frame: pd.DataFrame  # display cells ("0.591 ± 0.020 †")
    numbers: pd.DataFrame  # the same as numbers (mean, _ci_low, _ci_high), for CSV
    header: str  # seeds, interval method, what the intervals cover, the best groups
    notes: str


def infinite_kl(key: str, metrics: list[dict]) -> bool:
    """Whether KL `key` is infinite in one of the runs: metrics.json stores inf as null, and
    `<key>_outside_support` > 0 tells it apart from a KL not measured (evaluation.py). A mean over
    the other seeds would hide it."""
    return any(m.get(key) is None and (m.get(f"{key}_outside_support") or 0) > 0 for m in metrics)


def results_table(runs, n_boot: int = 1000, fmt: str = "md") -> ResultsTable:
    """Group `runs` (analysis.runs.Run) by their whole config except the seed, and give every
    quality metric as mean ± its interval (two-level bootstrap over seeds and prompts; one seed:
    prompts only), budgets as means, and mark with † the best group by gold reward and by win rate
    (analysis/paired.py: not told apart from the best, paired, Holm-adjusted)."""

    groups = group_runs(runs)
    paired = paired_comparisons(groups, n_boot=n_boot)
    rows, numbers, intervals = [], [], []
    for g in groups:
        metrics = [r.metrics for r in g.runs]
        row = {"policy": g.label, "seeds": len(g.runs)}
        number = {"policy": g.label, "experiment": g.experiment, "method": g.method, "seeds": len(g.runs)}
        kinds = set()
        for key, name in RESULT_COLUMNS:
            if any(key in m for m in metrics):
                if infinite_kl(key, metrics):
                    row[name] = "inf"
                    number.update({key: math.inf, f"{key}_ci_low": math.nan, f"{key}_ci_high": math.nan})
                    continue
                interval = policy_interval(g.runs, key, n_boot)
                intervals.append(interval)
                kinds.add(interval.over)
                mark = f" {BEST_MARK}" if key in paired.best_group and g.label in paired.best_group[key] else ""
                reported = sum(m.get(key) is not None for m in metrics)  # null: not a number (NaN) in that run
                row[name] = interval_cell(interval, fmt) + mark + (f" ({reported}/{len(metrics)} seeds)" if 0 < reported < len(metrics) else "")
                number.update({key: interval.mean, f"{key}_ci_low": interval.low, f"{key}_ci_high": interval.high})
                if key in PAIRED_METRICS:
                    number[f"{key}_best_group"] = bool(mark)
        for key, name in BUDGET_COLUMNS + OTHER_COLUMNS:
            if any(key in m for m in metrics):  # reported, if only as null (an accuracy with no held-out pairs): shown as –
                values = [m[key] for m in metrics if m.get(key) is not None]
                row[name] = number[key] = float(np.mean(values)) if values else math.nan
        number["interval"] = "/".join(sorted(kinds - {"none"})) or "none"
        rows.append(row)
        numbers.append(number)
    seeds = sorted({len(g.runs) for g in groups})
    experiments = sorted({g.experiment for g in groups})
    header = (f"{', '.join(experiments)}: {len(groups)} policies (runs grouped by their whole config except the seed), "
              f"{'/'.join(map(str, seeds))} seed(s) each; quality metrics: mean ± half-width of its 95% interval over several seeds, "
              f"mean [low, high] for one seed; " + describe_intervals(intervals, what="intervals") + "; budgets: means over seeds.")
    best = " ".join(f"{BEST_MARK} best group by {PAIRED_METRICS[k]}: {', '.join(v)} (not told apart from the best: paired bootstrap of the differences over seeds and prompts, p >= 0.05 Holm-adjusted over the comparisons with the best; figures/paired.md)."
                    for k, v in paired.best_group.items())
    notes = (best + " " if best else "") + KL_NOTE
    return ResultsTable(pd.DataFrame(rows), pd.DataFrame(numbers), header, notes)


def print_results(directory: Path, fmt: str, n_boot: int = 1000) -> str:
    """`alignbench results DIR`: the results table of every run under DIR, as text."""

    runs = load_local_runs(directory)
    if not runs:
        raise FileNotFoundError(f"no finished runs (metrics.json) under {directory}")
    table = results_table(runs, n_boot=n_boot)  # format_table turns ± and † into LaTeX
    if fmt == "csv":
        return table.numbers.to_csv(index=False)
    if fmt == "latex":
        return f"% {table.header}\n% {table.notes}\n" + format_table(table.frame, "latex")
    # Metrics as rows and policies as columns: readable in a terminal with many metrics.
    frame = table.frame.set_index("policy").T.reset_index().rename(columns={"index": "metric"})
    return f"{table.header}\n\n" + format_table(frame, "md") + f"\n{table.notes}\n"


# Further per-policy means shown in the results (the reward models' held-out accuracy).
OTHER_COLUMNS = (
    ("rm/helpfulness_accuracy", "rm/helpfulness_accuracy"), ("rm/safety_accuracy", "rm/safety_accuracy"), ("rm/optimised_accuracy", "rm/optimised_accuracy"),
)
