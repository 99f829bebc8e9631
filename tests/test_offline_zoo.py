"""Each new offline objective end to end on a tiny world (`alignbench run quickstart method=X` in a
temporary directory): the contract's metrics and budget, the shared `train/` statistics, parameters
that moved (KL from the SFT reference); and the shipped `offline_zoo` sweep file."""

from __future__ import annotations

import json

import pytest

from alignbench.cli import main

# Its runs only use stages: they read and build them in the session's stage cache (conftest.py).
pytestmark = pytest.mark.usefixtures("shared_stage_cache")

NEW_METHODS = ["ipo", "slic", "simpo", "orpo", "kto"]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, shared_stage_cache):
    return tmp_path_factory.mktemp("runs")


@pytest.mark.parametrize("method", NEW_METHODS)
def test_tiny_run_reports_the_contract_and_the_shared_statistics(runs_dir, method):
    from tests.conftest import TINY_OVERRIDES

    assert main(["run", "quickstart", f"method={method}", "--out", str(runs_dir), *TINY_OVERRIDES, f"{method}.kl_every=0", f"{method}.optim.lr=1e-3"]) == 0
    (run,) = [d for d in (runs_dir / "quickstart").iterdir() if d.name.startswith(f"{method}-seed0-")]
    result = json.loads((run / "metrics.json").read_text())
    m = result["metrics"]
    for key in ("eval/win_rate", "eval/win_rate_ci_low", "eval/kl", "eval/gold_reward", "budget/human_labels", "budget/train_tokens"):
        assert key in m, key
    assert m["budget/human_labels"] > 0 and m["budget/train_tokens"] > 0
    assert m["eval/kl"] > 0  # the policy moved away from the SFT reference
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    steps = [row for row in history if "train/loss" in row]
    # (A KTO batch with labels of one side only logs that side's mean alone.)
    assert steps and {"train/rewards_chosen", "train/rewards_rejected", "train/margin", "train/accuracy"} <= set().union(*steps)
    # (Whether each objective learns its preference is tested on clean pairs in test_offline_objectives.py:
    # the tiny world's SFT policy is barely trained, so most of its sampled pairs are gold ties labelled at random.)


def test_offline_zoo_sweeps_every_offline_objective_from_the_quickstart():
    from alignbench.experiment import load_experiment

    config = load_experiment("offline_zoo")
    assert config.methods == ["sft", "dpo", "ipo", "slic", "simpo", "orpo", "kto", "cpl"]
    assert config.labels == load_experiment("quickstart").labels  # the same labels, so the same budget and cache
    assert set(NEW_METHODS) <= set(load_experiment("head_to_head").methods)
