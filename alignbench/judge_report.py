"""`alignbench judge-report`: how good is each source of feedback, measured against gold.

On pairs of SFT samples to held-out prompts (the labels stage's holdout, never trained on),
each judge is asked for P(first shown is better) in both presentation orders. Reported per
judge, on the pairs whose gold rewards differ:

- agreement: expected agreement with gold of one label drawn from the judge's probability
  (what a reward model trained on its labels sees); majority: of its more likely label;
- first-position rate: mean P(first shown wins) over both orders (0.5 = no position bias);
- order flips: share of pairs whose decision changes when the order is swapped;
- label cost: measured seconds per 1,000 labels, and whose labels they are (human or AI).

The AI labeler appears twice: as it answers one order (its raw position bias) and averaged
over both orders, as RLAIF uses it (Lee et al. 2023).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from alignbench.config import ConfigError


@dataclass
class JudgeRow:
    judge: str
    labels: str
    agreement: float
    majority: float
    first_position_rate: float
    order_flips: float
    seconds_per_1k: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", nargs="?", default="quickstart", help="the experiment whose stages and judges are compared (default: quickstart)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--pairs", type=int, default=1000, help="held-out pairs to judge (default: 1000)")
    parser.add_argument("--format", choices=["md", "csv", "latex"], default="md")


def holdout_pairs(pipeline, n: int) -> tuple[list[str], list[str], list[str]]:
    """Up to n pairs of distinct SFT samples to the held-out labelled prompts."""
    from alignbench.stages.training import holdout_pairs

    prompts, firsts, seconds = holdout_pairs(pipeline.holdout())
    return prompts[:n], firsts[:n], seconds[:n]


def measure(name: str, labels: str, first_better: Callable, prompts, a, b, gold_a, gold_b) -> JudgeRow:
    """Score one judge given `first_better(prompts, x, y)` -> P(x, shown first, is better)."""
    import numpy as np

    started = time.perf_counter()
    p_ab, p_ba = np.asarray(first_better(prompts, a, b), dtype=float), np.asarray(first_better(prompts, b, a), dtype=float)
    seconds = time.perf_counter() - started
    differ = gold_a != gold_b
    a_better = gold_a > gold_b
    agreement = np.where(a_better, p_ab, 1 - p_ab)[differ].mean()
    majority = np.where(p_ab == 0.5, 0.5, (p_ab > 0.5) == a_better)[differ].mean()
    decided = (p_ab != 0.5) | (p_ba != 0.5)
    flips = ((p_ab > 0.5) == (p_ba > 0.5))[decided].mean() if decided.any() else 0.0
    return JudgeRow(name, labels, float(agreement), float(majority), float(0.5 * (p_ab + p_ba).mean()), float(flips), 1000 * seconds / (2 * len(prompts)))


def judge_rows(pipeline, n_pairs: int) -> list[JudgeRow]:
    import numpy as np

    from alignbench.annotator import SimulatedAnnotator, annotator_profile
    from alignbench.judges import AnnotatorJudge, RewardModelJudge
    from alignbench.stages.ai_labeler import ai_judge

    world = pipeline.world
    if world is None:
        raise ConfigError("judge-report measures judges against the built-in world's gold reward; it needs data.source=world")
    prompts, a, b = holdout_pairs(pipeline, n_pairs)
    if not prompts:
        raise ConfigError("the labels stage has no held-out pairs; raise labels.n_prompts or reward_model.holdout_fraction")
    gold_a, gold_b = pipeline.source.gold_scores(prompts, a), pipeline.source.gold_scores(prompts, b)
    proxy = pipeline.proxy()
    annotators = {
        "annotator (this experiment's labels)": pipeline.config.labels.annotator,
        "annotator, human profile": annotator_profile("human"),
        "annotator, AI profile": annotator_profile("ai"),
    }
    judges: list[tuple[str, str, Callable]] = [("gold", "-", pipeline.source.gold_judge.prefer_batch)]
    judges += [(name, "human" if "AI" not in name else "AI (simulated)", AnnotatorJudge(SimulatedAnnotator(world, cfg)).prefer_batch) for name, cfg in annotators.items()]
    judges.append(("reward models (Llama 2 combination)", "model", RewardModelJudge(proxy, world.is_harmful).prefer_batch))
    lm = ai_judge(pipeline)

    def one_order(ps, xs, ys):
        rules = lm.principles
        return np.mean([lm.first_preferred(ps, xs, ys, [r] * len(ps)) for r in rules], axis=0)

    judges.append((f"AI labeler ({pipeline.config.ai_labeler.model}), one order", "AI", one_order))
    judges.append((f"AI labeler ({pipeline.config.ai_labeler.model}), both orders", "AI", lm.prefer_batch))
    return [measure(name, labels, fn, prompts, a, b, gold_a, gold_b) for name, labels, fn in judges]


def main(args) -> None:
    import pandas as pd

    from alignbench.analysis.tables import format_table
    from alignbench.experiment import load_experiment
    from alignbench.log import log
    from alignbench.pipeline import Pipeline

    if args.pairs < 1:  # before any stage is built (0 ended in 'no held-out pairs', -5 judged all but 5)
        raise ConfigError(f"--pairs={args.pairs} must be >= 1: the number of held-out pairs to judge")
    config = load_experiment(args.experiment, args.overrides)
    pipeline = Pipeline(config, Path(args.out))
    rows = judge_rows(pipeline, args.pairs)
    table = pd.DataFrame([vars(r) for r in rows]).round(3)
    out = Path(args.out) / config.name / "judge_report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([vars(r) for r in rows], indent=2))
    print(format_table(table, args.format))
    log(f"{len(rows)} judges on {args.pairs} held-out pairs at most; written to {out}")
