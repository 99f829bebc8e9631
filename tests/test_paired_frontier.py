"""Paired comparisons, KL-matched frontiers and how results pool seeds, on small synthetic run
folders written by hand (per-prompt values chosen so that the answers are known)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from alignbench.analysis.runs import group_runs, load_local_runs

P = 200  # test prompts per run
PROMPTS = [f"prompt {i}" for i in range(P)]


@pytest.fixture(autouse=True)
def agg_backend(isolated_environment, monkeypatch, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))


def write_run(root: Path, experiment: str, method: str, seed: int, gold: np.ndarray, win: np.ndarray | None = None, kl: float = 0.0,
              section: dict | None = None, temperature: float = 1.0) -> None:
    """A finished run as the runner writes it: metrics.json (the means of the per-prompt values)
    and samples.jsonl (one row per prompt)."""
    win = np.full(P, 0.5) if win is None else win
    config = {"name": experiment, "method": method, "seed": seed, "seeds": [0, 1, 2], "eval": {"temperature": temperature, "n_test_prompts": P},
              "model": {"name": "world-small"}, "trainer": {"threads": 0, "progress_bar": seed == 0}, **({method: section} if section else {})}
    name = f"{method}-seed{seed}-" + "-".join(f"{k}{v}" for k, v in (section or {}).items()) + f"-T{temperature}"
    run_dir = root / experiment / name
    run_dir.mkdir(parents=True)
    metrics = {"eval/gold_reward": float(np.mean(gold)), "eval/win_rate": float(np.mean(win)), "eval/kl": kl, "budget/human_labels": 100}
    (run_dir / "metrics.json").write_text(json.dumps({"experiment": experiment, "run_name": name, "method": method, "seed": seed, "config": config, "metrics": metrics}))
    rows = [{"prompt": p, "response": "", "win": float(w), "gold_reward": float(g)} for p, w, g in zip(PROMPTS, win, gold)]
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# --- issue 21: runs are pooled over seeds only ------------------------------------------------
def test_results_keep_a_run_at_another_temperature_apart(tmp_path, capsys):
    """The issue's case: an extra `sft` run with eval.temperature=0.7 in a quickstart folder is its
    own column, not a second seed of `sft` averaged with the first."""
    from alignbench.cli import main

    write_run(tmp_path, "quickstart", "sft", 0, np.full(P, 0.5))
    write_run(tmp_path, "quickstart", "dpo", 0, np.full(P, 0.6), section={"beta": 0.1})
    write_run(tmp_path, "quickstart", "sft", 0, np.full(P, 0.3), temperature=0.7)
    assert main(["results", str(tmp_path / "quickstart"), "--format", "csv"]) == 0
    import io

    import pandas as pd

    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(table["policy"]) == ["sft (eval.temperature=0.7)", "sft (eval.temperature=1)", "dpo"]
    assert list(table["seeds"]) == [1, 1, 1]
    assert list(table["eval/gold_reward"]) == pytest.approx([0.3, 0.5, 0.6])
    assert list(table["interval"]) == ["prompts"] * 3
    assert main(["results", str(tmp_path / "quickstart")]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| metric"))
    assert [cell.strip() for cell in header.split("|")[2:-1]] == ["sft (eval.temperature=0.7)", "sft (eval.temperature=1)", "dpo"]
    assert "1 seed(s) each" in out and "evaluation noise only" in out and "eval/kl: the KL between the distributions actually sampled" in out


def test_seeds_pool_only_where_everything_but_the_seed_agrees(tmp_path):
    """Three seeds of one config are one policy; the progress bar (how a run is shown) does not
    split them; a second experiment in the folder is named in the label."""
    for seed in (0, 1, 2):
        write_run(tmp_path, "quickstart", "sft", seed, np.full(P, 0.5))
    write_run(tmp_path, "other", "sft", 0, np.full(P, 0.5))
    groups = group_runs(load_local_runs(tmp_path))
    assert [(g.label, g.seeds) for g in groups] == [("other: sft", [0]), ("quickstart: sft", [0, 1, 2])]


def test_without_per_prompt_values_the_interval_is_the_t_interval_over_seeds(tmp_path):
    """W&B runs and old runs have no samples.jsonl: the seeds' reported values, t with S−1 dof."""
    from alignbench.analysis.runs import policy_interval, seed_values
    from alignbench.analysis.stats import student_t_quantile

    for seed, value in enumerate((0.5, 0.6, 0.7)):
        write_run(tmp_path, "exp", "sft", seed, np.full(P, value))
        (tmp_path / "exp" / f"sft-seed{seed}--T1.0" / "samples.jsonl").unlink()
    runs = load_local_runs(tmp_path / "exp")
    assert not seed_values(runs, "eval/gold_reward").per_prompt
    interval = policy_interval(runs, "eval/gold_reward", n_boot=20000)
    assert interval.over == "seeds" and interval.mean == pytest.approx(0.6)
    assert interval.half_width == pytest.approx(student_t_quantile(0.95, 2) * 0.1 / math.sqrt(3), rel=0.03)


# --- paired comparisons -------------------------------------------------------------------------
def _three_policies(root: Path) -> dict[str, float]:
    """3 seeds; each seed shifts every policy alike by a large amount (shared stages), so only a
    paired comparison can see the small, real differences: good = base + 0.05, same = base +
    tiny noise, base; good also wins 90% of its prompts against SFT, the others about half.
    Returns the true differences."""
    rng = np.random.default_rng(0)
    for seed in range(3):
        shift = rng.normal(0, 0.1)
        base = np.clip(0.5 + shift + rng.normal(0, 0.2, P), -5, 5)
        write_run(root, "exp", "sft", seed, base, win=np.full(P, 0.5))
        write_run(root, "exp", "good", seed, base + 0.05, win=(rng.random(P) < 0.9).astype(float))
        write_run(root, "exp", "same", seed, base + rng.normal(0, 0.001, P), win=(rng.random(P) < 0.5).astype(float))
    return {"good": 0.05, "same": 0.0}


def test_paired_comparisons_find_the_real_difference_and_group_the_rest(tmp_path):
    from alignbench.analysis.paired import paired_comparisons, paired_frame
    from alignbench.analysis.stats import holm

    _three_policies(tmp_path)
    result = paired_comparisons(group_runs(load_local_runs(tmp_path / "exp")), n_boot=500)
    gold = {(c.a, c.b): c for c in result.comparisons if c.metric == "eval/gold_reward"}
    assert set(gold) == {("sft", "good"), ("sft", "same"), ("good", "same")}
    runs = {r.method: [x for x in load_local_runs(tmp_path / "exp") if x.method == r.method] for r in load_local_runs(tmp_path / "exp")}
    exact = np.mean([r.metrics["eval/gold_reward"] for r in runs["sft"]]) - np.mean([r.metrics["eval/gold_reward"] for r in runs["good"]])
    assert gold[("sft", "good")].diff == pytest.approx(exact) == pytest.approx(-0.05)
    assert gold[("sft", "good")].significant and gold[("good", "same")].significant
    assert not gold[("sft", "same")].significant
    assert gold[("sft", "good")].seeds == 3 and gold[("sft", "good")].prompts == P and gold[("sft", "good")].interval == "two-level"
    # the seed shift (sd 0.1) cancels: the paired interval is far narrower than that spread
    assert gold[("sft", "good")].ci_high - gold[("sft", "good")].ci_low < 0.02
    ordered = [c for c in result.comparisons if c.metric == "eval/gold_reward"]
    np.testing.assert_allclose([c.p_holm for c in ordered], holm([c.p for c in ordered]))
    assert result.best["eval/gold_reward"] == "good" and result.best_group["eval/gold_reward"] == ["good"]
    assert result.best_group["eval/win_rate"] == ["good"]
    frame = paired_frame(result)
    assert list(frame.columns[:7]) == ["a", "b", "metric", "diff", "ci_low", "ci_high", "p"] and "p_holm" in frame.columns


def test_plot_writes_the_paired_files_and_marks_the_best_group(tmp_path):
    import pandas as pd

    from alignbench.analysis.plot import plot_directory

    _three_policies(tmp_path)
    written = {p.name for p in plot_directory(tmp_path / "exp", formats=("png",), n_boot=200)}
    assert {"paired.md", "paired.csv", "paired.tex", "paired.png", "results.csv"} <= written
    paired = pd.read_csv(tmp_path / "exp" / "figures" / "paired.csv")
    assert {"a", "b", "metric", "diff", "ci_low", "ci_high", "p_holm"} <= set(paired.columns)
    assert len(paired) == 6  # 3 pairs x 2 metrics
    results = (tmp_path / "exp" / "figures" / "results.md").read_text()
    assert "3 seed(s) each" in results and "two-level bootstrap over 3 seeds" in results
    assert "best group by gold reward: good" in results
    row = next(line for line in results.splitlines() if line.startswith("| good"))
    assert row.count("†") == 2  # gold reward and win rate
    assert "†" not in next(line for line in results.splitlines() if line.startswith("| same"))
    index = (tmp_path / "exp" / "figures" / "index.md").read_text()
    assert "Paired comparisons" in index and "Holm" in index


# --- frontiers ------------------------------------------------------------------------------------
GAO = {"best_of_n": ("best_of_n", 0.3, 0.08, "n", [2, 4, 8, 16]), "dpo": ("rl", 0.25, 0.05, "beta", [1.0, 0.3, 0.1, 0.03])}
KLS = [0.2, 0.6, 1.2, 1.8]


def _frontier_dir(root: Path, noise: float = 0.0) -> None:
    """SFT at gold 0.5 and two methods whose gain over SFT follows Gao et al.'s forms exactly at
    KLS (per-prompt values ±0.1 around the mean, so the means are exact), on 3 seeds."""
    from alignbench.analysis.stats import gao_curve

    rng = np.random.default_rng(1)
    wobble = np.where(np.arange(P) % 2 == 0, 0.1, -0.1)
    for seed in range(3):
        write_run(root, "frontier", "sft", seed, 0.5 + wobble)
        for method, (form, alpha, beta, knob, values) in GAO.items():
            for kl, value in zip(KLS, values):
                gain = float(gao_curve(math.sqrt(kl), alpha, beta, form))
                write_run(root, "frontier", method, seed, 0.5 + gain + wobble + rng.normal(0, noise, P) * (noise > 0), kl=kl, section={knob: value})


def test_frontier_fits_recover_gao_coefficients_and_interpolate_at_matched_kl(tmp_path):
    from alignbench.analysis.frontier import find_frontiers, gao_fits, matched_kl
    from alignbench.analysis.stats import gao_curve

    _frontier_dir(tmp_path)
    frontiers = find_frontiers(load_local_runs(tmp_path / "frontier"))
    assert [f.label for f in frontiers] == ["best_of_n", "dpo"]
    assert all(f.seeds == [0, 1, 2] and f.per_prompt and f.anchor_gold is not None for f in frontiers)
    fits = {fit.label: fit for fit in gao_fits(frontiers, n_boot=200)}
    for method, (form, alpha, beta, _, _) in GAO.items():
        assert fits[method].form == form
        assert fits[method].alpha.mean == pytest.approx(alpha, abs=1e-9) and fits[method].beta.mean == pytest.approx(beta, abs=1e-9)
        assert fits[method].alpha.low <= alpha <= fits[method].alpha.high
    rows = {(r.label, r.kl): r for r in matched_kl(frontiers, n_boot=200)}
    # KL 0.5 lies between the points at 0.2 and 0.6: linear interpolation of their gold rewards
    for method, (form, alpha, beta, _, _) in GAO.items():
        g02, g06 = (0.5 + float(gao_curve(math.sqrt(k), alpha, beta, form)) for k in (0.2, 0.6))
        assert rows[(method, 0.5)].interval.mean == pytest.approx(g02 + (0.5 - 0.2) / 0.4 * (g06 - g02))
        # and so does KL 0.25
        assert rows[(method, 0.25)].interval.mean == pytest.approx(g02 + (0.25 - 0.2) / 0.4 * (g06 - g02))
    best_at_1 = max(GAO, key=lambda m: rows[(m, 1.0)].interval.mean)
    other = next(m for m in GAO if m != best_at_1)
    assert rows[(best_at_1, 1.0)].best_group and rows[(best_at_1, 1.0)].vs_best is None
    assert rows[(other, 1.0)].vs_best.mean == pytest.approx(rows[(other, 1.0)].interval.mean - rows[(best_at_1, 1.0)].interval.mean)
    # the same seeds and shapes, other test prompts: no prompt-by-prompt pairing with the best
    assert all(len(f.prompts) == 3 and None not in f.prompts for f in frontiers)
    moved = [dataclasses.replace(f, prompts=tuple(f"other{s}" for s in f.seeds)) if f.label == other else f for f in frontiers]
    apart = {(r.label, r.kl): r for r in matched_kl(moved, n_boot=200)}
    assert apart[(other, 1.0)].vs_best is None and math.isnan(apart[(other, 1.0)].p_holm_vs_best)
    assert apart[(other, 1.0)].interval.mean == rows[(other, 1.0)].interval.mean


def test_frontier_fits_from_noisy_points_cover_the_truth(tmp_path):
    from alignbench.analysis.frontier import find_frontiers, gao_fits

    _frontier_dir(tmp_path, noise=0.05)
    fits = {fit.label: fit for fit in gao_fits(find_frontiers(load_local_runs(tmp_path / "frontier")), n_boot=300)}
    for method, (_, alpha, beta, _, _) in GAO.items():
        assert fits[method].alpha.mean == pytest.approx(alpha, abs=0.03) and fits[method].beta.mean == pytest.approx(beta, abs=0.03)
        assert fits[method].alpha.over == "two-level" and fits[method].alpha.high > fits[method].alpha.low


def test_plot_draws_the_frontiers_with_seed_bands_fits_and_the_matched_table(tmp_path):
    import pandas as pd

    from alignbench.analysis.plot import plot_directory

    _frontier_dir(tmp_path)
    written = {p.name for p in plot_directory(tmp_path / "frontier", formats=("png",), n_boot=100)}
    assert {"reward_vs_kl.png", "reward_vs_kl_matched.md", "reward_vs_kl_matched.csv", "reward_vs_kl_fits.md", "reward_vs_kl_fits.csv"} <= written
    matched = pd.read_csv(tmp_path / "frontier" / "figures" / "reward_vs_kl_matched.csv")
    assert sorted(set(matched["kl"])) == [0.25, 0.5, 1.0] and set(matched["policy"]) == {"best_of_n", "dpo"}
    assert matched.groupby("kl")["best_group"].any().all()
    fits = pd.read_csv(tmp_path / "frontier" / "figures" / "reward_vs_kl_fits.csv")
    assert list(fits["form"]) == ["R(d) = d(α − βd)", "R(d) = d(α − β log d)"]
    text = (tmp_path / "frontier" / "figures" / "reward_vs_kl_matched.md").read_text()
    assert "†" in text and "two-level bootstrap over 3 seeds" in text


def test_the_frontier_sweep_varies_every_kl_knob_five_times():
    from alignbench.config import apply_overrides, from_dict, load_yaml
    from alignbench.experiment import ExperimentConfig, find_experiment

    data = load_yaml(find_experiment("frontier"))
    assert data.pop("base") == "quickstart" and data["seeds"] == [0, 1, 2]
    zipped = data.pop("sweep")["zip"]
    assert set(zipped) >= {"best_of_n.n", "dpo.beta", "cpl_kl.alpha", "ppo.init_kl_coef", "rejection_sampling.rounds", "rest.thresholds"}
    assert {len(v) for v in zipped.values()} == {5}
    base = load_yaml(find_experiment("quickstart"))
    for i in range(5):
        config = from_dict(ExperimentConfig, apply_overrides({**base, **data}, {k: v[i] for k, v in zipped.items()}))
        assert {m.split(".")[0] for m in zipped} <= set(config.methods)


def test_the_best_group_adjusts_over_the_comparisons_with_the_best_not_every_pair(tmp_path):
    """13 policies on 3 seeds: `good` beats twelve equal ones by 0.05 with a little seed noise. Holm
    over all 78 pairs cannot set it apart (three seeds give p of a few thousandths at best); over
    the 12 comparisons with the best it does."""
    from alignbench.analysis.paired import paired_comparisons
    from alignbench.analysis.stats import holm

    rng = np.random.default_rng(1)
    for seed in range(3):
        base = np.clip(0.5 + rng.normal(0, 0.1) + rng.normal(0, 0.2, P), -5, 5)
        write_run(tmp_path, "exp", "good", seed, base + 0.05 + rng.normal(0, 0.003), win=np.full(P, 0.5))
        for k in range(12):
            write_run(tmp_path, "exp", f"same{k:02d}", seed, base + rng.normal(0, 0.001, P), win=np.full(P, 0.5))
    result = paired_comparisons(group_runs(load_local_runs(tmp_path / "exp")), n_boot=500)
    gold = [c for c in result.comparisons if c.metric == "eval/gold_reward"]
    against_good = [c for c in gold if "good" in (c.a, c.b)]
    assert len(gold) == 78 and len(against_good) == 12
    assert not any(c.significant for c in against_good)  # all-pairs Holm: nothing set apart
    assert max(holm([c.p for c in against_good])) < 0.05
    assert result.best["eval/gold_reward"] == "good" and result.best_group["eval/gold_reward"] == ["good"]
