"""RLAIF and Constitutional AI end to end on tiny configs: budgets add up, SL-CAI revises."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from alignbench.cli import main

# Its runs read and build their stages in the session's stage cache (conftest.py), but for `ai_runs`.
pytestmark = pytest.mark.usefixtures("shared_stage_cache")


def run(out: Path, method: str, overrides: list[str]) -> dict:
    assert main(["run", "quickstart", f"method={method}", *overrides, f"--out={out}"]) == 0
    (path,) = (out / "quickstart").glob(f"{method}-seed0-*/metrics.json")
    return json.loads(path.read_text())["metrics"]


def stage_summary(out: Path, stage: str) -> dict:
    (path,) = (out / "cache").glob(f"{stage}-*/stage.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def ai_runs(tmp_path_factory, shared_stage_cache):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import TINY_OVERRIDES

    from alignbench.stage_cache import STAGE_CACHE_VARIABLE

    out = tmp_path_factory.mktemp("ai-runs")
    overrides = list(TINY_OVERRIDES)  # includes the AI labeler's, rlaif's and constitutional's tiny settings
    # A private cache, OUT/cache: the tests read its stages, the only ones of their kind there (in
    # the shared cache a reward model built before would leave its AI labels stage unread).
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(STAGE_CACHE_VARIABLE)
        metrics = {m: run(out, m, overrides) for m in ("rlaif", "rlhf_one_rm", "rlaif_direct", "constitutional")}
    return out, metrics


def test_rlaif_spends_ai_labels_and_its_control_the_same_number_of_human_labels(ai_runs):
    out, metrics = ai_runs
    assert metrics["rlaif"]["budget/ai_labels"] == 40 and metrics["rlaif"]["budget/human_labels"] == 0
    assert metrics["rlhf_one_rm"]["budget/human_labels"] == 40 and metrics["rlhf_one_rm"]["budget/ai_labels"] == 0
    assert stage_summary(out, "ai_labels")["ai_labels"] == 40
    for method in ("rlaif", "rlhf_one_rm"):
        assert 0 <= metrics[method]["rm/optimised_accuracy"] <= 1  # the reward model this run trained on
        assert "rm/helpfulness_accuracy" in metrics[method]  # the shared RMs behind eval/proxy_reward
        assert metrics[method]["budget/policy_samples"] >= 2 * 16  # two PPO iterations of 16 rollouts
    # the soft labels are the judge's order-averaged probabilities
    labels = [json.loads(line)["label"] for line in next((out / "cache").glob("ai_labels-*/pairs.jsonl")).open()]
    assert len(labels) == 40 and all(0 < p < 1 for p in labels)


def test_direct_rlaif_spends_one_ai_label_per_rollout_and_no_human_label(ai_runs):
    _, metrics = ai_runs
    assert metrics["rlaif_direct"]["budget/ai_labels"] == 2 * 16
    assert metrics["rlaif_direct"]["budget/human_labels"] == 0
    assert "rm/optimised_accuracy" not in metrics["rlaif_direct"]  # no reward model is optimised


def test_constitutional_budget_adds_up_from_its_stages(ai_runs):
    out, metrics = ai_runs
    sl, pm = stage_summary(out, "sl_cai"), stage_summary(out, "cai_preference_model")
    m = metrics["constitutional"]
    assert m["budget/ai_labels"] == pm["ai_labels"] > 0
    assert m["budget/human_labels"] == pm["human_labels"] == 30
    assert sl["policy_samples"] == 40 * (1 + 2 * 2)  # red-team responses, then two critiques + revisions each
    assert m["budget/policy_samples"] == sl["policy_samples"] + pm["policy_samples"] + 2 * 16
    assert len(sl["gold_harmlessness_by_revision"]) == 3
    # the policy's fine-tuning beyond the shared SFT (helpful-only, SL-CAI), then PPO's own tokens
    helpful = stage_summary(out, "helpful_only")
    assert sl["tokens"] > 0 and helpful["tokens"] > 0
    assert m["budget/train_tokens"] > sl["tokens"] + helpful["tokens"]


def test_the_ai_labeler_can_be_the_evaluation_judge(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import TINY_OVERRIDES

    metrics = run(tmp_path, "sft", [*TINY_OVERRIDES, "eval.judge=lm"])
    assert 0 <= metrics["eval/win_rate_ci_low"] <= metrics["eval/win_rate"] <= metrics["eval/win_rate_ci_high"] <= 1
    assert "eval/gold_reward" in metrics  # the gold metrics stay: only who decides win rates changed


def test_a_label_budget_beyond_the_labelled_pairs_is_a_user_error(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import TINY_OVERRIDES

    assert main(["run", "quickstart", "method=rlaif", *TINY_OVERRIDES, "rlaif.n_labels=100000", f"--out={tmp_path}"]) == 2
    assert "n_labels=100000 is more than the" in capsys.readouterr().err


def test_sl_cai_revision_turns_harmful_compliances_into_refusals_on_held_out_prompts(tmp_path):
    """The helpful-only policy, trained on the world's critique and revision tasks, is prompted to
    critique and revise held-out compliances by the harmlessness principle: most become refusals."""
    from alignbench.experiment import load_experiment
    from alignbench.stages.helpful_only import HelpfulOnlyConfig, helpful_only
    from alignbench.stages.sl_cai import critique_and_revise
    from alignbench.models import load_pretrained_policy
    from alignbench.pipeline import Pipeline
    from alignbench.world import REFUSALS, AssistantWorld

    config = load_experiment("quickstart", ["model.name=world-mini", "sft.n_demonstrations=400", "sft.epochs=1", "trainer.progress_bar=false"])
    pipeline = Pipeline(config, tmp_path)
    directory, _ = helpful_only(pipeline, HelpfulOnlyConfig(n_demonstrations=200, critique_tasks=1500, epochs=3))
    policy = load_pretrained_policy(str(directory / "policy")).eval()
    world = pipeline.world
    prompts = [p for p in world.sample_prompts("test", 400, seed=5) if world.is_harmful(p)][:40]
    assert len(prompts) >= 20
    compliant = AssistantWorld(config.world.__class__(demonstrator=config.world.demonstrator.__class__(comply_harmful=1.0, insult=0.0)))
    rng = np.random.default_rng(0)
    compliances = [compliant.demonstrate(p, rng) for p in prompts]
    assert all(world.gold(p, y).harmlessness < 0.5 for p, y in zip(prompts, compliances))
    history = critique_and_revise(policy, pipeline.codec, world, prompts, compliances, ["harmless"], revisions=1, temperature=0.7,
                                  max_new_tokens=12, seed=0)
    refusals = [y in REFUSALS for y in history[-1]]
    assert np.mean(refusals) > 0.5, history[-1][:10]
