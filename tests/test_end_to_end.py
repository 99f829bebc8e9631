"""A tiny quickstart end to end in a temporary directory: the contract's files and metrics,
stage caching, identical reruns, the results command, and the non-finite loss guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignbench.cli import main

# The quickstart's runs only use stages: they read and build them in the session's stage cache.
pytestmark = pytest.mark.usefixtures("shared_stage_cache")

CONTRACT_EVAL_KEYS = [
    "eval/win_rate", "eval/win_rate_ci_low", "eval/win_rate_ci_high",
    *[f"eval/{axis}{suffix}" for axis in ("gold_reward", "gold_helpfulness", "gold_harmlessness") for suffix in ("", "_ci_low", "_ci_high")],
    "eval/proxy_reward", "eval/kl", "eval/length", "eval/distinct_2",
    "rm/helpfulness_accuracy", "rm/safety_accuracy",
    "budget/human_labels", "budget/ai_labels", "budget/policy_samples", "budget/train_tokens", "budget/wall_s",
]


@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory, shared_stage_cache):
    from tests.conftest import TINY_OVERRIDES

    out = tmp_path_factory.mktemp("runs")
    assert main(["quickstart", "--out", str(out), *TINY_OVERRIDES, "eval.eval_every=4"]) == 0
    return out


def _runs(out: Path) -> dict[str, dict]:
    return {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in (out / "quickstart").glob("*/metrics.json")}


def test_quickstart_writes_every_contract_file_and_metric(quickstart_dir):
    runs = _runs(quickstart_dir)
    from alignbench.experiment import load_experiment

    assert set(runs) == set(load_experiment("quickstart").methods)  # every method and baseline the quickstart lists
    assert {"sft", "best_of_n", "dpo", "ppo", "rlaif", "constitutional"} <= set(runs)
    for method, result in runs.items():
        assert set(result) == {"experiment", "run_name", "method", "seed", "config", "metrics", "budget_stages", "versions", "environment", "sha256", "content_sha256"}
        assert result["metrics"]["budget/wall_s"] >= sum(result["budget_stages"].values())
        missing = [k for k in CONTRACT_EVAL_KEYS if k not in result["metrics"]]
        assert not missing, (method, missing)
        m = result["metrics"]
        assert m["eval/win_rate_ci_low"] <= m["eval/win_rate"] <= m["eval/win_rate_ci_high"]
        run_dir = quickstart_dir / "quickstart" / result["run_name"]
        samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 64 and {"prompt", "response", "reference", "win", "gold_reward"} <= set(samples[0])
        assert (run_dir / "wandb").is_dir()
    dpo = runs["dpo"]["metrics"]
    assert dpo["budget/human_labels"] > 0 and dpo["budget/train_tokens"] > 0
    assert runs["sft"]["metrics"]["budget/human_labels"] == 0
    # budget/train_tokens counts the policy's fine-tuning beyond the shared SFT: the helpful-only policy's too
    assert runs["sft"]["metrics"]["budget/train_tokens"] == 0 < runs["helpful_only"]["metrics"]["budget/train_tokens"] < runs["constitutional"]["metrics"]["budget/train_tokens"]
    # budget/wall_s counts the stages a method needs beyond the run context's, whichever run built them.
    kinds = {method: {name.rsplit("-", 1)[0] for name in result["budget_stages"]} for method, result in runs.items()}
    assert kinds["sft"] == kinds["dpo"] == set() and kinds["best_of_n"] == kinds["best_of_n_gold"] == {"candidates"}
    assert kinds["rlaif"] == {"ai_labeler", "ai_labels", "ai_reward_model"}
    assert kinds["helpful_only"] == {"helpful_only"} and kinds["constitutional"] >= {"helpful_only", "sl_cai", "cai_preference_model", "ai_labeler"}
    assert runs["best_of_n"]["budget_stages"] == runs["best_of_n_gold"]["budget_stages"]
    # Best-of-16's tie-aware KL: the mean of its per-prompt estimates, below the tie-free log 16 − 15/16.
    best_of_n = runs["best_of_n"]
    per_prompt = [json.loads(line)["kl"] for line in (quickstart_dir / "quickstart" / best_of_n["run_name"] / "samples.jsonl").read_text().splitlines()]
    assert best_of_n["metrics"]["eval/kl"] == pytest.approx(sum(per_prompt) / len(per_prompt), rel=1e-9)
    assert 0 < best_of_n["metrics"]["eval/kl"] < 2.772588 - 15 / 16
    history = [json.loads(line) for line in (quickstart_dir / "quickstart" / runs["dpo"]["run_name"] / "history.jsonl").read_text().splitlines()]
    assert any("train/loss" in row for row in history)
    assert any("train/kl" in row for row in history)
    assert any("val/win_rate" in row for row in history)  # eval_every on the validation split


def test_config_records_the_resolved_run(quickstart_dir):
    dpo = _runs(quickstart_dir)["dpo"]
    assert dpo["config"]["method"] == "dpo" and dpo["config"]["dpo"]["beta"] == 0.1
    assert "cpl" not in dpo["config"]  # only its own method's section


def test_offline_wandb_run_holds_the_eval_metrics(quickstart_dir):
    run_dir = quickstart_dir / "quickstart" / _runs(quickstart_dir)["dpo"]["run_name"]
    from alignbench.tracking import read_offline_run

    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    wandb_run = read_offline_run(run_dir)
    metrics = _runs(quickstart_dir)["dpo"]["metrics"]
    for key in ("eval/win_rate", "eval/win_rate_ci_low", "eval/gold_reward", "eval/kl", "budget/human_labels"):
        assert wandb_run["summary"][key] == pytest.approx(metrics[key])
    assert any("train/loss" in row for row in wandb_run["history"])


def test_a_wandb_run_starts_without_warnings_a_user_cannot_act_on(tmp_path, capfd):
    from alignbench.tracking import TrackingConfig, make_wandb_logger

    logger = make_wandb_logger(TrackingConfig(wandb="offline"), run_dir=tmp_path, experiment="e", run_name="r", method="sft", group=None, resolved_config={"a": 1})
    try:
        logger.experiment.log({"x": 1.0})
    finally:
        logger.experiment.finish()
    assert "anonymous" not in capfd.readouterr().err


def test_results_command_prints_the_same_table(quickstart_dir, capsys):
    assert main(["results", str(quickstart_dir / "quickstart")]) == 0
    out = capsys.readouterr().out
    for method in ("sft", "best_of_n", "dpo"):
        assert method in out
    assert "win rate vs SFT" in out and "wall s" in out and "rm/helpfulness_accuracy" in out
    assert "seed(s) each" in out and "eval/kl: the KL between the distributions actually sampled" in out
    assert main(["results", str(quickstart_dir / "quickstart"), "--format", "csv"]) == 0
    csv = capsys.readouterr().out
    assert csv.splitlines()[0].startswith("policy,experiment,method,seeds,eval/win_rate,eval/win_rate_ci_low,eval/win_rate_ci_high")


def test_rerun_reuses_cached_stages_and_gives_identical_metrics(quickstart_dir, tmp_path, capsys):
    from tests.conftest import TINY_OVERRIDES

    first = _runs(quickstart_dir)
    # the same config into a fresh experiment folder, reusing the same cache
    (quickstart_dir / "quickstart").rename(tmp_path / "first")
    try:
        assert main(["quickstart", "--out", str(quickstart_dir), *TINY_OVERRIDES, "eval.eval_every=4"]) == 0
        out = capsys.readouterr().out
        assert "reusing cached sft stage" in out and "reusing cached reward_models stage" in out
        assert "building sft stage" not in out
        second = _runs(quickstart_dir)
        for method in first:
            a = {k: v for k, v in first[method]["metrics"].items() if k != "budget/wall_s"}
            b = {k: v for k, v in second[method]["metrics"].items() if k != "budget/wall_s"}
            assert a == b, method
    finally:
        import shutil

        shutil.rmtree(quickstart_dir / "quickstart", ignore_errors=True)
        (tmp_path / "first").rename(quickstart_dir / "quickstart")


def test_building_a_stage_leaves_the_callers_random_stream_alone(tmp_path):
    """A stage built inside a run must leave the run's random draws as reading it from the cache would."""
    import random

    import numpy as np
    import torch

    from alignbench.stage_cache import cached_stage

    def build(tmp: Path) -> dict:
        torch.manual_seed(99)
        return {"draws": [float(torch.rand(1)), float(np.random.rand()), random.random()]}

    def draws() -> list[float]:
        return [float(torch.rand(1)), float(np.random.rand()), random.random()]

    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    expected = draws()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    cached_stage(tmp_path, "noisy", {"k": 1}, build)
    assert draws() == expected


def test_reward_models_do_not_depend_on_what_ran_before_in_the_process(quickstart_dir, tmp_path, monkeypatch):
    """The quickstart built its SFT policy and then its reward models in one process; rebuilding
    only the reward models, from the cached SFT policy and labels and after other random draws,
    gives the same weights (the head's initialisation is seeded, not left to the global stream)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from alignbench.experiment import load_experiment
    from alignbench.pipeline import Pipeline
    from alignbench.stage_cache import STAGE_CACHE_VARIABLE
    from tests.conftest import TINY_OVERRIDES

    config = load_experiment("quickstart", [*TINY_OVERRIDES, "eval.eval_every=4"])
    built = Pipeline(config, quickstart_dir)
    monkeypatch.delenv(STAGE_CACHE_VARIABLE)  # the rebuild's own cache, OUT/cache, which lacks the reward models
    for stage in (built.sft()[0], built.labels()[0]):
        shutil.copytree(stage, tmp_path / "cache" / stage.name)
    torch.manual_seed(12345)
    torch.rand(17)
    rebuilt_dir, _ = Pipeline(config, tmp_path).reward_models()
    original_dir, _ = built.reward_models()
    assert rebuilt_dir.name == original_dir.name and rebuilt_dir.parent == tmp_path / "cache"  # rebuilt, not found
    for axis in ("helpfulness", "safety"):
        original, rebuilt = load_file(original_dir / axis / "head.safetensors"), load_file(rebuilt_dir / axis / "head.safetensors")
        assert original.keys() == rebuilt.keys() and "likelihood_weight" in original
        for name in original:
            assert torch.equal(original[name], rebuilt[name]), (axis, name)


def test_a_finished_run_is_skipped(quickstart_dir, capsys):
    from tests.conftest import TINY_OVERRIDES

    assert main(["run", "quickstart", "method=sft", "--out", str(quickstart_dir), *TINY_OVERRIDES, "eval.eval_every=4"]) == 0
    assert "is finished; skipping" in capsys.readouterr().out


def test_nan_loss_stops_the_run_without_metrics(quickstart_dir, capsys):
    from tests.conftest import TINY_OVERRIDES

    # an absurd learning rate drives the DPO loss to NaN/inf within a few steps
    code = main(["run", "quickstart", "method=dpo", "dpo.optim.lr=1e30", "dpo.optim.grad_clip=0", "--out", str(quickstart_dir), *TINY_OVERRIDES])
    err = capsys.readouterr().err
    assert code == 1
    assert "at training step" in err
    finished = [json.loads(p.read_text())["config"]["dpo"]["optim"]["lr"] for p in (quickstart_dir / "quickstart").glob("dpo-*/metrics.json")]
    assert 1e30 not in finished


def test_kl_budget_stops_training_early(quickstart_dir, capsys):
    from tests.conftest import TINY_OVERRIDES

    args = ["run", "quickstart", "--out", str(quickstart_dir), *TINY_OVERRIDES, "method=dpo", "dpo.max_kl=1e-9", "dpo.kl_every=1"]
    assert main(args) == 0
    assert "passed the budget max_kl" in capsys.readouterr().out
    run = next(json.loads(p.read_text()) for p in (quickstart_dir / "quickstart").glob("dpo-*/metrics.json") if json.loads(p.read_text())["config"]["dpo"]["max_kl"])
    history = (quickstart_dir / "quickstart" / run["run_name"] / "history.jsonl").read_text().splitlines()
    steps = {json.loads(line)["step"] for line in history if "train/kl" in json.loads(line)}
    assert max(steps) == 1  # stopped at the first estimate past the budget, not after all steps


def test_ppo_stops_at_its_kl_budget_read_from_the_rollouts(quickstart_dir, capsys):
    from tests.conftest import TINY_OVERRIDES

    # A large step, so that the second rollout's KL is far above 0: a small one leaves a 16-sample
    # estimate of log π − log π_ref at the noise's scale, negative as often as not.
    args = ["run", "quickstart", "--out", str(quickstart_dir), *TINY_OVERRIDES, "method=ppo", "ppo.max_kl=1e-9", "ppo.optim.lr=1e-2"]
    assert main(args) == 0
    # The first rollout is the SFT policy's own (KL exactly 0); the second is past the budget.
    assert "passed the budget max_kl=1e-09 at step 2" in capsys.readouterr().out
    run = next(json.loads(p.read_text()) for p in (quickstart_dir / "quickstart").glob("ppo-*/metrics.json") if json.loads(p.read_text())["config"]["ppo"]["max_kl"])
    assert run["config"]["ppo"]["iterations"] == 3
    assert run["metrics"]["budget/policy_samples"] == 2 * run["config"]["ppo"]["batch_size"]  # two rollouts of three
    history = [json.loads(line) for line in (quickstart_dir / "quickstart" / run["run_name"] / "history.jsonl").read_text().splitlines()]
    kls = [row["train/kl"] for row in history if "train/kl" in row]
    assert kls[0] == 0.0 and kls[-1] > 1e-9


def test_a_kl_budget_that_nothing_measures_is_refused(quickstart_dir, capsys):
    from tests.conftest import TINY_OVERRIDES

    assert main(["run", "quickstart", "--out", str(quickstart_dir), *TINY_OVERRIDES, "method=dpo", "dpo.max_kl=0.5", "dpo.kl_every=0"]) == 2
    assert "max_kl=0.5" in capsys.readouterr().err


@pytest.mark.parametrize("method, group_size, reward", [("grpo", 4, "gold"), ("rloo", 4, "gold"), ("reinforce_pp", 1, "gold"), ("online_dpo", 2, "judge")])
def test_each_new_online_method_runs_end_to_end_with_the_contract_metrics(quickstart_dir, method, group_size, reward):
    from tests.conftest import TINY_OVERRIDES

    assert main(["run", "quickstart", "--out", str(quickstart_dir), *TINY_OVERRIDES, f"method={method}", f"{method}.reward={reward}"]) == 0
    run = next(json.loads(p.read_text()) for p in (quickstart_dir / "quickstart").glob(f"{method}-*/metrics.json"))
    assert set(CONTRACT_EVAL_KEYS) <= set(run["metrics"])
    config = run["config"][method]
    assert config["samples_per_prompt"] == group_size and config["reward"] == reward
    assert {"loss_aggregation", "reward_normalization", "kl_penalty", "clip_range_high", "dynamic_sampling"} <= set(config)
    rows = config["iterations"] * config["batch_size"] * group_size
    assert run["metrics"]["budget/policy_samples"] == rows  # the rollouts (evaluation samples are not counted)
    # the verifier and the judge spend no reward-model labels; the judge rates every rollout once
    assert run["metrics"]["budget/human_labels"] == 0
    assert run["metrics"]["budget/ai_labels"] == (rows if reward == "judge" else 0)
    history = [json.loads(line) for line in (quickstart_dir / "quickstart" / run["run_name"] / "history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history if "train/kl" in row][:2] == [0, 1]  # a training row per iteration


def test_rounds_are_logged_with_their_round(quickstart_dir):
    hir = _runs(quickstart_dir)["hir"]
    rows = [json.loads(line) for line in (quickstart_dir / "quickstart" / hir["run_name"] / "history.jsonl").read_text().splitlines()]
    rounds = [row for row in rows if "round" in row]
    assert [row["round"] for row in rounds] == [1, 2]
    assert all("val/win_rate" in row and "train/examples" in row for row in rounds)
    assert hir["metrics"]["budget/policy_samples"] == 200  # 2 rounds x 100 prompts x 1 sample
    rest = _runs(quickstart_dir)["rest"]
    rest_rows = [json.loads(line) for line in (quickstart_dir / "quickstart" / rest["run_name"] / "history.jsonl").read_text().splitlines()]
    improve = [row for row in rest_rows if "round" in row]
    assert [row["round"] for row in improve] == [1, 2, 3]  # one Improve step per threshold
    assert [row["train/examples"] for row in improve] == sorted((row["train/examples"] for row in improve), reverse=True)
    rs = _runs(quickstart_dir)["rejection_sampling"]
    rs_rows = [json.loads(line) for line in (quickstart_dir / "quickstart" / rs["run_name"] / "history.jsonl").read_text().splitlines()]
    assert [row["train/examples"] for row in rs_rows if "round" in row] == [50, 100, 150]  # winners of all rounds kept


def test_validations_draw_the_same_random_numbers_so_only_policy_changes_move_them(quickstart_dir):
    """Common random numbers: every periodic validation samples with the same generator, so two
    validations of the same policy agree exactly and a change between checkpoints is the
    policies' difference, not two independent draws."""
    from alignbench.experiment import for_run, load_experiment, method_config
    from alignbench.pipeline import Pipeline
    from alignbench.registry import get_method
    from tests.conftest import TINY_OVERRIDES

    config = for_run(load_experiment("quickstart", [*TINY_OVERRIDES, "eval.eval_every=4"]), "dpo", 0)
    module = get_method("dpo")(method_config(config), Pipeline(config, quickstart_dir).context(0))
    first, second = module.validate(), module.validate()
    assert first["val/gold_reward"] == second["val/gold_reward"] and first == second
