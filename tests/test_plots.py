"""`alignbench plot`: every figure drawn from a small synthetic results directory, checked for
what it draws (bars, lines and points per policy and sweep value, axis labels); the tables; the
W&B reader; and the extra-temperature evaluation that figure 4 reads."""

from __future__ import annotations

import json
import math
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
from alignbench.analysis.runs import group_runs, load_local_runs, load_wandb_runs

from alignbench.config import ConfigError, to_dict
from alignbench.world import AssistantWorld, WorldConfig

EXPERIMENT = "fixture"
SEEDS = (0, 1)
N_PROMPTS = 40
TEMPERATURES = (0.5, 0.7)


@pytest.fixture(autouse=True)
def agg_backend(isolated_environment, monkeypatch, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))


# --- the fixture: a results directory written by hand -------------------------------------------
def _write_run(root: Path, method: str, seed: int, settings: dict, metrics: dict, history: list[dict], responses: list[str], prompts: list[str], wins: np.ndarray | None = None) -> None:
    """One run's files. With `wins` (per prompt, vs SFT), samples.jsonl holds them and the world's
    gold reward of each response, and eval/win_rate and eval/gold_reward are their means (as the
    evaluator writes them); without, samples.jsonl holds the texts only and the metrics are left
    as given (per-prompt columns whose means were not the metrics would mark the run as damaged)."""
    world = AssistantWorld()
    gold = [world.gold(p, y).reward for p, y in zip(prompts, responses)]
    if wins is not None:
        metrics = dict(metrics)
        for key, values in (("eval/win_rate", wins), ("eval/gold_reward", gold)):
            metrics[key] = float(np.mean(values))
            metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"] = metrics[key] - 0.03, metrics[key] + 0.03
    config = {
        "name": EXPERIMENT, "method": method, "seed": seed, "methods": ["sft", "best_of_n", "dpo", "ppo", "rejection_sampling"], "seeds": list(SEEDS),
        "world": to_dict(WorldConfig()), "model": {"name": settings.pop("model.name", "world-small")},
        "eval": {"temperature": 1.0, "temperatures": list(TEMPERATURES), "judge": "gold"}, "tracking": {"wandb": "offline"},
        method: dict(settings),
    }
    name = f"{method}-seed{seed}-" + "-".join(f"{k}{v}" for k, v in sorted(settings.items())) + config["model"]["name"]
    run_dir = root / EXPERIMENT / name
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({"experiment": EXPERIMENT, "run_name": name, "method": method, "seed": seed, "config": config, "metrics": metrics, "versions": {}}))
    (run_dir / "history.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    samples = [{"prompt": p, "response": y, "reference": ""} for p, y in zip(prompts, responses)]
    if wins is not None:
        samples = [{**s, "win": float(w), "gold_reward": g} for s, w, g in zip(samples, wins, gold)]
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))


def _eval_metrics(rng, quality: float, kl: float, temperatures: bool) -> dict:
    metrics = {}
    names = {"win_rate": 0.5 + 0.3 * quality, "gold_reward": 0.5 + 0.4 * quality, "gold_helpfulness": 0.5 + 0.3 * quality, "gold_harmlessness": 0.9 + 0.05 * quality}
    prefixes = ["eval"] + ([f"eval/T{t:g}" for t in TEMPERATURES] if temperatures else [])
    for prefix in prefixes:
        shift = 0.0 if prefix == "eval" else -0.1 * float(prefix.split("T")[1])
        for name, value in names.items():
            v = value + shift + rng.normal(0, 0.01)
            metrics[f"{prefix}/{name}"], metrics[f"{prefix}/{name}_ci_low"], metrics[f"{prefix}/{name}_ci_high"] = v, v - 0.03, v + 0.03
        metrics[f"{prefix}/proxy_reward"] = 0.55 + 0.5 * quality + rng.normal(0, 0.01)
        metrics[f"{prefix}/kl"] = kl
    metrics.update({"budget/human_labels": 1000, "budget/ai_labels": 0, "budget/policy_samples": 0, "budget/train_tokens": 5000, "budget/wall_s": 3.5})
    return metrics


def _val_row(step: int, quality: float, kl: float, **extra) -> dict:
    return {"step": step, **extra, "val/win_rate": 0.5 + 0.2 * quality, "val/win_rate_ci_low": 0.45 + 0.2 * quality, "val/win_rate_ci_high": 0.55 + 0.2 * quality,
            "val/gold_reward": 0.5 + 0.3 * quality - 0.05 * kl, "val/proxy_reward": 0.5 + 0.4 * quality,
            "val/gold_helpfulness": 0.45 + 0.1 * quality, "val/gold_helpfulness_ci_low": 0.4, "val/gold_helpfulness_ci_high": 0.6,
            "val/gold_harmlessness": 0.9 + 0.05 * quality, "val/gold_harmlessness_ci_low": 0.85, "val/gold_harmlessness_ci_high": 0.99, "val/kl": kl}


def write_fixture(root: Path) -> Path:
    """An experiment directory with two seeds of: SFT at two model sizes; best-of-n at n = 1, 4,
    16; DPO at β = 0.05, 0.1, 0.5 (and β = 0.1 at the smaller size); PPO with three validation
    checkpoints; rejection sampling with three rounds. The world-small runs were also evaluated
    at temperatures 0.5 and 0.7 (eval.temperatures)."""
    world = AssistantWorld()
    prompts = world.sample_prompts("test", N_PROMPTS, seed=1234)
    ideal = [world.ideal_response(p) for p in prompts]
    policies = [  # method, settings, quality in [0, 1], KL
        ("sft", {}, 0.0, 0.0), ("sft", {"model.name": "world-tiny"}, -0.2, 0.0),
        ("best_of_n", {"n": 1}, 0.0, 0.0), ("best_of_n", {"n": 4}, 0.3, 0.64), ("best_of_n", {"n": 16}, 0.5, 1.84),
        ("dpo", {"beta": 0.05}, 0.6, 1.5), ("dpo", {"beta": 0.1}, 0.5, 0.8), ("dpo", {"beta": 0.5}, 0.2, 0.2),
        ("dpo", {"beta": 0.1, "model.name": "world-tiny"}, 0.3, 0.9),
        ("ppo", {"kl_coef": 0.1, "batch_size": 16, "samples_per_prompt": 2, "iterations": 30}, 0.4, 0.7), ("rejection_sampling", {"rounds": 3}, 0.35, 0.9),
    ]
    for method, settings, quality, kl in policies:
        for seed in SEEDS:
            rng = np.random.default_rng([seed, int(1000 * quality) + 500, len(settings)])
            small = settings.get("model.name", "world-small") == "world-small"
            metrics = _eval_metrics(rng, quality, kl, temperatures=small)
            history = []
            if method in ("dpo", "ppo", "rejection_sampling"):
                for step in range(10, 70, 10):
                    history.append({"step": step, "train/loss": 0.7 - 0.01 * step * quality + rng.normal(0, 0.01), "train/accuracy": 0.5 + 0.003 * step})
                    history.append({"step": step + 5, "train/kl": kl * step / 60})
            if method == "ppo":
                history += [_val_row(step, quality * step / 30, kl * step / 30) for step in (10, 20, 30)]
            if method == "rejection_sampling":
                history += [_val_row(20 * r, quality * r / 3, kl * r / 3, round=float(r), **{"train/examples": 100.0}) for r in (1, 2, 3)]
            # A response is the ideal answer with a probability that rises with the policy's quality.
            right = rng.random(N_PROMPTS) < 0.4 + 0.5 * quality
            responses = [y if ok else "" for y, ok in zip(ideal, right)]
            wins = (rng.random(N_PROMPTS) < 0.5 + 0.3 * quality).astype(float)
            _write_run(root, method, seed, dict(settings), metrics, history, responses, prompts, wins)
    return root / EXPERIMENT


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> Path:
    return write_fixture(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def runs(fixture_dir):
    return load_local_runs(fixture_dir)


@pytest.fixture
def draw():
    """Draws a figure inside the paper style and closes it after the test."""
    import matplotlib.pyplot as plt
    from alignbench.analysis.style import paper_style

    style = paper_style()
    style.__enter__()
    yield lambda function, *args, **kwargs: function(*args, **kwargs)
    plt.close("all")
    style.__exit__(None, None, None)


def legend_labels(ax) -> list[str]:
    return ax.get_legend_handles_labels()[1]


def series_x(ax, label: str) -> list[float]:
    """The x values of the one line or error-bar series labelled `label`."""
    lines = [line for line in ax.get_lines() if line.get_label() == label]
    lines += [c.lines[0] for c in ax.containers if c.get_label() == label and hasattr(c, "has_yerr")]
    assert len(lines) == 1, f"{label}: {[line.get_label() for line in ax.get_lines()]}"
    return list(lines[0].get_xdata())


def errorbar_points(ax, label: str) -> int:
    return len(series_x(ax, label))


# --- the runs and their variants ------------------------------------------------------------
def test_runs_are_grouped_into_policies_by_their_differing_settings(runs):
    labels = [g.label for g in group_runs(runs)]
    assert labels == [
        "sft (model.name=world-small)", "sft (model.name=world-tiny)",
        "best_of_n (n=1)", "best_of_n (n=4)", "best_of_n (n=16)",
        "dpo (beta=0.05, model.name=world-small)", "dpo (beta=0.1, model.name=world-small)", "dpo (beta=0.1, model.name=world-tiny)", "dpo (beta=0.5, model.name=world-small)",
        "ppo", "rejection_sampling",
    ]
    assert all(g.seeds == list(SEEDS) for g in group_runs(runs))


def test_a_run_reads_its_per_prompt_columns_and_prompt_digest_and_keeps_no_texts(tmp_path):
    import hashlib

    prompts = AssistantWorld().sample_prompts("test", 2, seed=0)
    responses = ["I can help with that", "sorry I cannot"]
    _write_run(tmp_path, "sft", 0, {}, {}, [], responses, prompts, wins=np.array([1.0, 0.5]))
    (run,) = load_local_runs(tmp_path / EXPERIMENT)
    np.testing.assert_array_equal(run.per_prompt("eval/win_rate"), [1.0, 0.5])
    gold = run.per_prompt("eval/gold_reward")
    assert gold is not None and gold.mean() == pytest.approx(run.metrics["eval/gold_reward"])
    assert run.per_prompt("eval/kl") is None  # no such column
    assert run.prompts_digest() == hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
    # A sweep's figures hold every run at once: the texts of its samples are not kept.
    assert not any(text in repr(vars(run)) for text in responses)
    # A column that one row lacks is no per-prompt column; a run without samples.jsonl has none.
    path = run.samples_path
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    del rows[1]["win"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run,) = load_local_runs(tmp_path / EXPERIMENT)
    assert run.per_prompt("eval/win_rate") is None and run.per_prompt("eval/gold_reward") is not None
    path.unlink()
    (run,) = load_local_runs(tmp_path / EXPERIMENT)
    assert run.per_prompt("eval/gold_reward") is None and run.prompts_digest() is None


# --- figure 1 ---------------------------------------------------------------------------------
def test_win_rate_bars_one_per_policy_with_two_level_intervals(runs, draw):
    from alignbench.analysis.figures import draw_win_rates
    from alignbench.analysis.stats import student_t_quantile, two_level_replicates

    drawn = draw(draw_win_rates, runs)
    ax = drawn.figure.axes[0]
    groups = group_runs(runs)
    assert len(ax.patches) == len(groups) == 11
    assert [t.get_text() for t in ax.get_xticklabels()] == [g.label for g in groups]
    assert ax.get_ylabel() == "Win rate vs SFT (gold judge)"
    assert "95% two-level bootstrap over 2 seeds and the test prompts within each (mean ± t·sd of the replicates): training and evaluation noise" in drawn.caption
    # The first bar is the mean of SFT's two seeds; its error bar is the interval (mean ± t·sd of the replicates) of
    # the two-level replicates of the per-prompt wins: mean ± t(1 dof) · sd(replicates).
    values = [r.metrics["eval/win_rate"] for r in groups[0].runs]
    assert ax.patches[0].get_height() == pytest.approx(np.mean(values))
    bars = next(c for c in ax.containers if hasattr(c, "has_yerr") and c.has_yerr)
    segments = bars.lines[2][0].get_segments()
    low, high = segments[0][:, 1]
    replicates = two_level_replicates(np.stack([r.per_prompt("eval/win_rate") for r in groups[0].runs]), 1000)
    half = student_t_quantile(0.95, 1) * replicates.std(ddof=1)
    assert (high - low) / 2 == pytest.approx(half)


def test_a_note_of_two_kinds_of_interval_is_wrapped_and_leaves_the_axes_their_width(runs, draw):
    """One policy with one seed beside policies with two: the note names both kinds of interval,
    wider than the figure on one line, where constrained layout squeezed the axes to a strip."""
    import io
    import warnings

    from alignbench.analysis.figures import draw_win_rates

    drawn = draw(draw_win_rates, [r for r in runs if not (r.method == "ppo" and r.seed == 1)])
    ax = drawn.figure.axes[0]
    assert "bootstrap over test prompts of one seed" in ax.get_title(loc="left") and "\n" in ax.get_title(loc="left")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "constrained_layout not applied because axes sizes collapsed to zero"
        drawn.figure.savefig(io.BytesIO(), format="png")
    assert ax.get_position().width > 0.6


# --- figure 2 ---------------------------------------------------------------------------------------
def test_head_to_head_matrix_and_ranking_cover_every_policy(runs, draw):
    from alignbench.analysis.figures import draw_head_to_head

    drawn = draw(draw_head_to_head, runs, n_boot=200)
    matrix_ax, ranking_ax = drawn.figure.axes[:2]
    labels = [g.label for g in group_runs(runs)]
    assert [t.get_text() for t in matrix_ax.get_yticklabels()] == labels
    assert matrix_ax.collections[0].get_array().size == len(labels) ** 2  # the heatmap's cells
    assert matrix_ax.get_xlabel() == "Opponent (column)" and matrix_ax.get_ylabel() == "Policy (row)"
    strengths = next(c for c in ranking_ax.collections if c.get_label() == "_strengths")
    assert len(strengths.get_offsets()) == len(labels)
    assert sorted(t.get_text() for t in ranking_ax.get_yticklabels()) == sorted(labels)
    assert "Bradley–Terry strength" in ranking_ax.get_xlabel()
    assert set(drawn.tables) == {"head_to_head.md", "head_to_head.tex", "bradley_terry.md", "bradley_terry.tex"}
    # each cell of the table carries its two-level interval; the caption says over how many seeds
    cell = drawn.tables["head_to_head.md"].splitlines()[2].split("|")[3].strip()
    rate, low, high = (float(x) for x in cell.replace("[", "").replace("]", "").replace(",", "").split())
    assert low <= rate <= high
    assert "two-level bootstrap over 2 seeds" in drawn.caption


def test_head_to_head_uses_the_gold_judge_of_the_runs_world_with_ties_one_half(tmp_path):
    """Benign prompts only (the world config of the runs says so): the ideal answer beats an
    empty one on every prompt, and two policies that answer identically tie at exactly 1/2."""
    from alignbench.analysis.head_to_head import compare_policies

    world_config = WorldConfig(harmful_fraction=0.0)
    world = AssistantWorld(world_config)
    prompts = world.sample_prompts("test", 30, seed=0)
    for name, responses in (("ideal", [world.ideal_response(p) for p in prompts]), ("copy", [world.ideal_response(p) for p in prompts]), ("empty", [""] * len(prompts))):
        run_dir = tmp_path / "exp" / name
        run_dir.mkdir(parents=True)
        config = {"name": "exp", "method": name, "seed": 0, "world": to_dict(world_config)}
        (run_dir / "metrics.json").write_text(json.dumps({"experiment": "exp", "run_name": name, "method": name, "seed": 0, "config": config, "metrics": {}}))
        (run_dir / "samples.jsonl").write_text("".join(json.dumps({"prompt": p, "response": y}) + "\n" for p, y in zip(prompts, responses)))
    h2h = compare_policies(group_runs(load_local_runs(tmp_path / "exp")))
    rates = dict(zip(h2h.names, h2h.win_rates()))
    index = {n: i for i, n in enumerate(h2h.names)}
    assert rates["ideal"][index["empty"]] == 1.0 and rates["empty"][index["ideal"]] == 0.0
    assert rates["ideal"][index["copy"]] == 0.5
    assert h2h.counts.sum(axis=0)[index["ideal"], index["empty"]] == len(prompts)
    # The evaluation records each response's gold reward in samples.jsonl: read from there, the
    # comparisons are the same as the judge's.
    for path in (tmp_path / "exp").glob("*/samples.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "gold_reward": world.gold(r["prompt"], r["response"]).reward}) + "\n" for r in rows))
    recorded = compare_policies(group_runs(load_local_runs(tmp_path / "exp")))
    assert recorded.names == h2h.names and np.array_equal(recorded.seed_outcomes, h2h.seed_outcomes)


# --- figure 3 ---------------------------------------------------------------------------------------
def test_reward_vs_kl_one_curve_per_swept_method_one_point_per_value(runs, draw):
    from alignbench.analysis.figures import draw_reward_vs_kl

    drawn = draw(draw_reward_vs_kl, runs)
    ax = drawn.figure.axes[0]
    curves = [label for label in legend_labels(ax) if label not in ("SFT", "Gao et al. fit")]
    # DPO's β sweep at world-small and best-of-n over n; DPO at world-tiny has one β only.
    assert curves == ["best_of_n: n", "dpo (model.name=world-small): beta"]
    assert errorbar_points(ax, "best_of_n: n") == 3 and errorbar_points(ax, "dpo (model.name=world-small): beta") == 3
    assert ax.get_xlabel().startswith("KL(π ‖ π_SFT)") and ax.get_ylabel() == "Gold reward (test prompts)"


def test_reward_vs_kl_draws_one_panel_per_method_family_when_the_curves_are_many(tmp_path, draw):
    """Eight swept methods are more than one panel's colours and markers can tell apart: offline
    and online methods get a panel each, the y-axis shared, every curve in its family's panel."""
    from alignbench.analysis.figures import MAX_CURVES_PER_PANEL, draw_reward_vs_kl

    world = AssistantWorld()
    prompts = world.sample_prompts("test", 8, seed=1)
    responses = [world.ideal_response(p) for p in prompts]
    rng = np.random.default_rng(0)
    offline, online = ["dpo", "ipo", "slic", "simpo", "orpo"], ["ppo", "grpo", "rloo"]
    assert len(offline + online) > MAX_CURVES_PER_PANEL
    _write_run(tmp_path, "sft", 0, {}, _eval_metrics(rng, 0.0, 0.0, temperatures=False), [], responses, prompts)
    for method in offline + online:
        for index, value in enumerate((0.05, 0.5)):
            _write_run(tmp_path, method, 0, {"beta" if method in offline else "kl_coef": value}, _eval_metrics(rng, 0.5 - index * 0.3, 1.0 - index * 0.7, temperatures=False), [], responses, prompts)
    drawn = draw(draw_reward_vs_kl, load_local_runs(tmp_path))
    panels = {ax.get_title(): ax for ax in drawn.figure.axes if ax.get_title()}
    assert set(panels) == {"offline preferences", "online RL"}
    curves = {title: sorted(label for label in legend_labels(ax) if label not in ("SFT", "Gao et al. fit")) for title, ax in panels.items()}
    assert curves == {"offline preferences": sorted(f"{m}: beta" for m in offline), "online RL": sorted(f"{m}: kl_coef" for m in online)}
    assert panels["online RL"].get_shared_y_axes().joined(panels["online RL"], panels["offline preferences"])
    assert "one panel per method family (offline preferences, online RL)" in drawn.caption


# --- figure 4 ---------------------------------------------------------------------------------------
def test_win_rate_vs_temperature_one_line_per_policy_one_point_per_temperature(runs, draw):
    from alignbench.analysis.figures import draw_temperatures

    drawn = draw(draw_temperatures, runs)
    ax = drawn.figure.axes[0]
    lines = [label for label in legend_labels(ax) if label != "tie with SFT"]
    # Every world-small policy was also evaluated at 0.5 and 0.7: 9 lines of 3 temperatures.
    small = [g for g in group_runs(runs, ignore=lambda k, m: k.startswith("eval.")) if g.runs[0].settings["model.name"] == "world-small"]
    assert len(lines) == len(small) == 9
    assert all(errorbar_points(ax, label) == 3 for label in lines)
    assert series_x(ax, lines[0]) == [0.5, 0.7, 1.0]
    assert ax.get_xlabel() == "Sampling temperature" and ax.get_ylabel() == "Win rate vs SFT at the same temperature"


# --- figure 5 ---------------------------------------------------------------------------------------
def test_model_size_lines_over_parameter_counts(runs, draw):
    from alignbench.analysis.figures import draw_model_sizes

    drawn = draw(draw_model_sizes, runs)
    win_ax, gold_ax = drawn.figure.axes
    for ax in (win_ax, gold_ax):
        lines = [label for label in legend_labels(ax) if not label.startswith("_")]
        assert lines == ["sft", "dpo (beta=0.1)"]  # the only policies run at both sizes
        assert all(errorbar_points(ax, label) == 2 for label in lines)
        assert ax.get_xscale() == "log" and ax.get_xlabel() == "Policy parameters (log scale)"
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert ticks[0].startswith("tiny") and ticks[1].startswith("small")
    assert win_ax.get_ylabel() == "Win rate vs SFT of the same size" and gold_ax.get_ylabel() == "Gold reward (test prompts)"


# --- figure 6 ---------------------------------------------------------------------------------------
def test_iterations_one_path_per_iterating_policy(runs, draw):
    from alignbench.analysis.figures import draw_iterations

    drawn = draw(draw_iterations, runs)
    ax = drawn.figure.axes[0]
    assert sorted(legend_labels(ax)) == ["SFT (test prompts)", "ppo (checkpoints)", "rejection_sampling (rounds)"]
    assert errorbar_points(ax, "ppo (checkpoints)") == 3 and errorbar_points(ax, "rejection_sampling (rounds)") == 3
    assert ax.get_xlabel() == "Gold harmlessness (validation prompts)" and ax.get_ylabel() == "Gold helpfulness (validation prompts)"
    assert {t.get_text() for t in ax.texts} >= {"R1", "R2", "R3", "10", "20", "30"}


# --- figure 7 ---------------------------------------------------------------------------------------
def test_overoptimization_gold_and_proxy_against_sqrt_kl(runs, draw):
    from alignbench.analysis.figures import draw_overoptimization

    from alignbench.evaluation import best_of_n_kl

    drawn = draw(draw_overoptimization, runs)
    best_of_n_ax, ppo_ax = drawn.figure.axes
    assert legend_labels(best_of_n_ax) == ["best_of_n: gold", "best_of_n: proxy (RM)"]
    assert legend_labels(ppo_ax) == ["ppo: gold", "ppo: proxy (RM)"]
    gold = next(line for line in best_of_n_ax.get_lines() if line.get_label() == "best_of_n: gold")
    assert np.allclose(gold.get_xdata(), [math.sqrt(kl) for kl in (0.0, 0.64, 1.84)])  # the runs' own (tie-aware) eval/kl
    assert not np.allclose(gold.get_xdata(), [math.sqrt(best_of_n_kl(n)) for n in (1, 4, 16)])  # not the tie-free formula
    ppo_gold = next(line for line in ppo_ax.get_lines() if line.get_label() == "ppo: gold")
    assert len(ppo_gold.get_xdata()) == 3
    assert all(ax.get_xlabel().startswith("√KL") and ax.get_ylabel() == "Reward" for ax in (best_of_n_ax, ppo_ax))


# --- figure 8 ---------------------------------------------------------------------------------------
def test_training_curves_one_row_per_trained_policy_with_seed_bands(runs, draw):
    from alignbench.analysis.figures import draw_training_curves

    drawn = draw(draw_training_curves, runs)
    trained = [g for g in group_runs(runs) if g.method in ("dpo", "ppo", "rejection_sampling")]
    rows = [ax for ax in drawn.figure.axes if ax.get_title(loc="left")]
    assert [ax.get_title(loc="left") for ax in rows] == [g.label for g in trained]
    loss_ax = rows[0]
    assert loss_ax.get_ylabel() == "train/loss"
    assert legend_labels(loss_ax) == [trained[0].label, "range over 2 seeds"]
    assert "range (min–max) over 2 seeds" in drawn.caption
    # PPO's row: loss, KL, its objective's metric and the validation win rate.
    ppo_row = [ax for ax in drawn.figure.axes if ax.get_visible() and ax.axison][4 * 4 : 4 * 4 + 4]
    assert [ax.get_ylabel() for ax in ppo_row] == ["train/loss", "train/kl", "train/accuracy", "val/win_rate"]


def test_training_curves_leave_a_panel_empty_where_the_seeds_share_no_step(runs, draw):
    """Two seeds that logged a metric at disjoint steps (one stopped early at its KL budget) have no
    common curve: that panel is left empty, the others are drawn."""
    import dataclasses

    from alignbench.analysis.figures import draw_training_curves

    dpo = [r for r in runs if r.method == "dpo" and r.settings.get("dpo.beta") == 0.1 and r.settings.get("model.name") == "world-small"]
    early = dataclasses.replace(dpo[0], history=[{"step": 1, "train/kl": 0.1}, {"step": 2, "train/kl": 0.2}, *[row for row in dpo[0].history if "train/kl" not in row]])
    late = dataclasses.replace(dpo[1], history=[{"step": 50, "train/kl": 0.5}, {"step": 60, "train/kl": 0.6}, *[row for row in dpo[1].history if "train/kl" not in row]])
    drawn = draw(draw_training_curves, [early, late])
    assert [ax.get_ylabel() for ax in drawn.figure.axes if ax.axison] == ["train/loss", "train/accuracy"]


# --- figure 8b ------------------------------------------------------------------------------------
def test_sample_efficiency_draws_validation_gold_against_policy_samples_and_kl(runs, draw):
    from alignbench.analysis.figures import draw_sample_efficiency

    drawn = draw(draw_sample_efficiency, runs)
    by_samples, by_kl = drawn.figure.axes
    (ppo,) = [g for g in group_runs(runs) if g.method == "ppo"]  # the only method that samples
    (line,) = by_samples.get_lines()
    assert line.get_label() == ppo.label
    # Validation at steps 10, 20, 30; 16 prompts × 2 samples per step; the mean over the two seeds.
    assert line.get_xdata().tolist() == [320, 640, 960]
    expected = [np.mean([row["val/gold_reward"] for r in ppo.runs for row in r.history if row.get("step") == step and "val/gold_reward" in row]) for step in (10, 20, 30)]
    assert np.allclose(line.get_ydata(), expected)
    (kl_line,) = by_kl.get_lines()
    assert np.allclose(kl_line.get_xdata(), [0.7 * step / 30 for step in (10, 20, 30)]) and np.allclose(kl_line.get_ydata(), expected)
    table = drawn.tables["gold_vs_samples.md"]
    assert "| 320 | 640 | 960 |" in table and f"| {ppo.label} | 2 | " + " | ".join(f"{v:.3f}" for v in expected) + " |" in table
    assert "range (min–max) over 2 seeds" in drawn.caption


def test_sample_efficiency_is_skipped_without_validated_online_runs(runs):
    from alignbench.analysis.figures import draw_sample_efficiency
    from alignbench.analysis.style import Skipped

    with pytest.raises(Skipped, match="experiments/rlvr.yaml"):
        draw_sample_efficiency([r for r in runs if r.method != "ppo"])


def test_the_results_table_shows_an_infinite_kl_and_a_metric_missing_at_some_seeds_instead_of_averaging_the_rest(fixture_dir, tmp_path):
    """metrics.json stores an infinite KL (a sample outside the reference's nucleus) as null: the
    mean over the other seeds is not the policy's KL. A metric null at one seed says over how many."""
    from alignbench.analysis.tables import results_table

    folder = tmp_path / EXPERIMENT
    shutil.copytree(fixture_dir, folder)

    def edit(method: str, settings: str, seed: int, **metrics):
        (path,) = folder.glob(f"{method}-seed{seed}-{settings}world-small/metrics.json")
        result = json.loads(path.read_text())
        result["metrics"].update(metrics)
        path.write_text(json.dumps(result))

    edit("dpo", "beta0.05", 1, **{"eval/kl": None, "eval/kl_outside_support": 0.25})
    edit("dpo", "beta0.5", 1, **{"eval/proxy_reward": None})
    table = results_table(load_local_runs(folder), n_boot=50)
    cells = table.frame.set_index("policy")
    numbers = table.numbers.set_index("policy")
    infinite = next(p for p in cells.index if "0.05" in p)
    missing = next(p for p in cells.index if "0.5" in p and "0.05" not in p)
    assert cells.loc[infinite, "KL"] == "inf" and numbers.loc[infinite, "eval/kl"] == math.inf
    assert cells.loc[missing, "proxy reward"].endswith(" (1/2 seeds)") and "seeds" not in cells.loc[missing, "KL"]
    assert cells.loc[infinite, "proxy reward"].count("seeds") == 0


# --- figure 9 and the whole command -------------------------------------------------------------------
def test_plot_directory_writes_every_figure_and_the_tables(fixture_dir, tmp_path):

    from alignbench.analysis.plot import plot_directory

    target = tmp_path / EXPERIMENT
    shutil.copytree(fixture_dir, target)
    written = plot_directory(target, formats=("png",), n_boot=100)
    names = {p.name for p in written}
    for stem in ("win_rate_vs_sft", "head_to_head", "reward_vs_kl", "win_rate_vs_temperature", "win_rate_vs_model_size", "helpfulness_vs_harmlessness", "overoptimization", "training_curves", "gold_vs_samples"):
        assert f"{stem}.png" in names
    assert {"results.md", "results.tex", "index.md", "bradley_terry.md", "head_to_head.tex"} <= names
    results = (target / "figures" / "results.md").read_text()
    sft = [r for r in load_local_runs(target) if r.method == "sft" and r.settings["model.name"] == "world-small"]
    mean = np.mean([r.metrics["eval/win_rate"] for r in sft])
    assert "| sft (model.name=world-small) " in results and f"{mean:.3f} ± " in results
    assert r"$\pm$" in (target / "figures" / "results.tex").read_text()
    assert "## Skipped" not in (target / "figures" / "index.md").read_text()


def test_the_commands_that_read_results_load_no_torch_or_transformers(fixture_dir, tmp_path):
    """`alignbench results` and `alignbench plot` read files only: importing transformers (to quiet
    its logging) or torch would cost them most of their time and memory. (The model-size figure
    builds the tiny world models to count their parameters: its runs are left out here.)"""
    import os
    import subprocess
    import sys

    target = tmp_path / EXPERIMENT
    shutil.copytree(fixture_dir, target, ignore=lambda folder, names: [n for n in names if "world-tiny" in n])
    check = (
        "import sys; from alignbench.cli import main; code = main(sys.argv[1:]); "
        "print('loaded:', sorted(m for m in ('torch', 'transformers', 'lightning') if m in sys.modules)); sys.exit(code)"
    )
    for command in (["results", str(target)], ["plot", str(target), "--formats", "png"]):
        done = subprocess.run([sys.executable, "-c", check, *command], capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"}, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "loaded: []" in done.stdout, (command[0], done.stdout[-300:])
    assert (target / "figures" / "results.md").exists()


def test_a_directory_without_sweeps_lists_the_skipped_figures(fixture_dir, tmp_path, capsys):

    from alignbench.analysis.plot import plot_directory

    target = tmp_path / EXPERIMENT
    target.mkdir()
    for run_dir in fixture_dir.iterdir():
        if run_dir.name in ("sft-seed0-world-small", "dpo-seed0-beta0.1world-small"):
            shutil.copytree(run_dir, target / run_dir.name)
    written = {p.name for p in plot_directory(target, formats=("png",), n_boot=50)}
    assert {"win_rate_vs_sft.png", "head_to_head.png", "training_curves.png", "results.md"} <= written
    index = (target / "figures" / "index.md").read_text()
    for stem in ("reward_vs_kl", "win_rate_vs_model_size", "helpfulness_vs_harmlessness", "overoptimization", "gold_vs_samples"):
        assert f"(`{stem}`)" in index
    assert "figure 3 (reward_vs_kl) skipped: needs runs of one method at two or more settings" in capsys.readouterr().out


def test_cli_plot_and_its_user_errors(fixture_dir, tmp_path, capsys):
    from alignbench.cli import main

    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "results directory not found" in capsys.readouterr().err
    (tmp_path / "two" / "a").mkdir(parents=True)
    for name in ("a", "b"):
        run = tmp_path / "two" / name / "run"
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.json").write_text(json.dumps({"experiment": name, "run_name": "run", "method": "sft", "seed": 0, "config": {}, "metrics": {"eval/win_rate": 0.5}}))
    assert main(["plot", str(tmp_path / "two")]) == 2
    assert f"holds runs of 2 experiments (a, b); plot one experiment's directory, e.g. {tmp_path / 'two' / 'a'}" in capsys.readouterr().err
    mixed = tmp_path / "mixed"  # both experiments' runs in one folder: no subfolder to suggest
    for name in ("a", "b"):
        shutil.copytree(tmp_path / "two" / name / "run", mixed / "all" / f"run{name}")
        result = json.loads((mixed / "all" / f"run{name}" / "metrics.json").read_text())
        (mixed / "all" / f"run{name}" / "metrics.json").write_text(json.dumps({**result, "run_name": f"run{name}"}))
    assert main(["plot", str(mixed)]) == 2
    assert "(a, b); move each experiment's runs to a directory of its own and plot that" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "two" / "a"), "--formats", "png,bmpx"]) == 2
    assert "unknown format(s) bmpx" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "two" / "a"), "--wandb", "not-a-path"]) == 2
    assert "must be ENTITY/PROJECT" in capsys.readouterr().err


# --- W&B -----------------------------------------------------------------------------------------
class _FakeRun:
    """The attributes of `wandb.apis.public.Run` that the reader uses."""

    def __init__(self, run, state="finished"):
        self.name, self.state, self.job_type = run.name, state, run.method
        self.config = run.config
        self.summary_metrics = {**run.metrics, "_runtime": 3.0, "_wandb": {"runtime": 3}}
        self._history = run.history

    def scan_history(self):
        for i, row in enumerate(self._history):
            yield {"_step": i, "trainer/global_step": row["step"], **{k: v for k, v in row.items() if k != "step"}}


def test_wandb_runs_read_like_local_ones(runs):
    api = types.SimpleNamespace(runs=lambda path: [_FakeRun(r) for r in runs] + [_FakeRun(runs[0], state="running")])
    remote = load_wandb_runs("team/fixture", api=api)
    assert len(remote) == len(runs)
    by_name = {r.name: r for r in remote}
    for run in runs:
        twin = by_name[run.name]
        assert (twin.method, twin.seed, twin.experiment) == (run.method, run.seed, EXPERIMENT)
        assert twin.metrics == run.metrics
        assert [row["step"] for row in twin.history] == [row["step"] for row in run.history]
        assert twin.samples_path is None
    assert [g.label for g in group_runs(remote)] == [g.label for g in group_runs(runs)]


def test_wandb_errors_are_user_errors():
    def unreachable(path):
        raise RuntimeError("could not find project team/nothing")

    with pytest.raises(ConfigError, match="cannot read the W&B project 'team/nothing'"):
        load_wandb_runs("team/nothing", api=types.SimpleNamespace(runs=unreachable))


# --- figure 4's data: evaluation at extra temperatures -----------------------------------------------
def test_evaluation_at_extra_temperatures_names_its_metrics_and_compares_at_the_same_temperature(world, codec):
    """The SFT policy against itself: greedy decoding (t = 0) gives the reference's own answers, so
    every prompt ties (win rate exactly 1/2) and the KL terms are 0; the metrics are deterministic."""
    from alignbench.evaluation import (
        EvalConfig,
        Evaluator,
        evaluate_at_temperatures,
        sample_policy,
    )
    from alignbench.judges import GoldJudge
    from alignbench.models import build_tiny_policy, freeze

    policy = freeze(build_tiny_policy("world-tiny", codec.tokenizer, seed=0))
    config = EvalConfig(n_test_prompts=24, bootstrap_samples=100, max_new_tokens=8, temperatures=[0.0, 0.7])
    prompts = world.sample_prompts("test", 24, seed=0)
    context = types.SimpleNamespace(eval_config=config, reference=policy, codec=codec, evaluator=Evaluator(config, {"test": prompts}, {}, GoldJudge(world), world=world))
    module = types.SimpleNamespace(respond=lambda ps, generator, desc=False: sample_policy(policy, policy, codec, ps, context.eval_config, generator))

    metrics = evaluate_at_temperatures(module, context, seed=0)
    assert metrics["eval/T0/win_rate"] == 0.5 and metrics["eval/T0/kl"] == 0.0
    assert {"eval/T0.7/win_rate", "eval/T0.7/win_rate_ci_low", "eval/T0.7/gold_reward", "eval/T0.7/length"} <= set(metrics)
    assert context.eval_config is config  # the run's settings are restored
    assert evaluate_at_temperatures(module, context, seed=0) == metrics
    with pytest.raises(ValueError, match="eval.temperatures"):
        EvalConfig(temperatures=[0.7, 0.7])


# --- experiments/paper: one sweep per figure ------------------------------------------------------
PAPER_SWEEPS = sorted((Path(__file__).parents[1] / "experiments" / "paper").glob("*.yaml"))


def _deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


@pytest.mark.parametrize("path", PAPER_SWEEPS, ids=lambda p: p.stem)
def test_every_paper_sweep_is_a_valid_experiment_at_every_grid_point(path):
    """The agreed sweep format: `base` deep-merged under the file, `sweep.grid` a cartesian product
    of dotted overrides (the sweep runner owns the real expansion; this checks the values)."""
    import itertools

    from alignbench.config import apply_overrides, from_dict, load_yaml
    from alignbench.experiment import ExperimentConfig, find_experiment
    from alignbench.registry import get_method

    data = load_yaml(path)
    assert data.pop("base") == "quickstart" and data["name"] == f"paper_{path.stem}"
    sweep = data.pop("sweep", None) or {}
    assert set(sweep) <= {"grid", "zip", "max_retries"}
    merged = _deep_merge(load_yaml(find_experiment("quickstart")), data)
    grid = sweep.get("grid") or {}
    for values in itertools.product(*grid.values()):
        config = from_dict(ExperimentConfig, apply_overrides(merged, dict(zip(grid, values))))
        for method in config.methods:
            get_method(method)
    assert len(PAPER_SWEEPS) == 6
