"""Simulated annotators: label accuracy matches the analytic noise model; biases, rankings and margins."""
import math

import numpy as np
import pytest

from alignbench.annotator import LLAMA2_MARGIN_SMALL, MARGIN_LEVELS, AnnotatorConfig, SimulatedAnnotator
from alignbench.world import AssistantWorld

HARMFUL, REFUSAL = "explain how to steal a car", "sorry i can not help with that"
HOW_TO = "step one find the car step two steal it"


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture(scope="module")
def world() -> AssistantWorld:
    return AssistantWorld()


@pytest.fixture(scope="module")
def pairs(world):
    """Pairs of two demonstrations per prompt whose gold rewards differ."""
    rng = np.random.default_rng(0)
    out = []
    for prompt in world.sample_prompts("train", 8000, seed=0):
        a, b = world.demonstrate(prompt, rng), world.demonstrate(prompt, rng)
        if world.gold(prompt, a).reward != world.gold(prompt, b).reward:
            out.append((prompt, a, b))
    return out


def accuracy(annotator, pairs, seed):
    rng = np.random.default_rng(seed)
    labels = [annotator.label_pair(p, a, b, rng) for p, a, b in pairs]
    return np.mean([label.chosen_utility > label.rejected_utility for label in labels])


def test_accuracy_matches_flip_rate_at_tiny_temperature(world, pairs):
    annotator = SimulatedAnnotator(world, AnnotatorConfig(temperature=1e-6, flip_rate=0.2))
    assert len(pairs) > 2000
    assert abs(accuracy(annotator, pairs, 1) - 0.8) < 4 * math.sqrt(0.8 * 0.2 / len(pairs))


def test_accuracy_matches_bradley_terry_expectation(world, pairs):
    config = AnnotatorConfig(temperature=0.1, flip_rate=0.1)
    annotator = SimulatedAnnotator(world, config)
    expected = []
    for p, a, b in pairs:  # P(the better response is chosen), computed by hand from the model's definition
        q = sigmoid(abs(world.gold(p, a).reward - world.gold(p, b).reward) / config.temperature)
        expected.append(0.9 * q + 0.1 * (1 - q))
    expected_accuracy = np.mean(expected)
    assert 0.8 < expected_accuracy < 0.9
    assert abs(accuracy(annotator, pairs, 2) - expected_accuracy) < 4 * math.sqrt(0.25 / len(pairs))


def test_prob_first_better_by_hand(world):
    annotator = SimulatedAnnotator(world, AnnotatorConfig(temperature=0.1, flip_rate=0.1))
    p = sigmoid((1.0 - 2 / 3) / 0.1)  # "apple pear plum" scores 1, "apple pear" 2/3
    better_first = annotator.prob_first_better("list 3 fruits", "apple pear plum", "apple pear")
    assert better_first == pytest.approx(0.9 * p + 0.1 * (1 - p))
    worse_first = annotator.prob_first_better("list 3 fruits", "apple pear", "apple pear plum")
    assert worse_first == pytest.approx(1 - better_first)
    tiny = SimulatedAnnotator(world, AnnotatorConfig(temperature=1e-9, flip_rate=0.0))
    assert tiny.prob_first_better(HARMFUL, REFUSAL, HOW_TO) == 1.0  # no overflow at huge logits


def test_position_bias_on_gold_ties(world):
    rng = np.random.default_rng(3)
    tie = ("list 3 fruits", "apple pear plum", "pear plum apple")
    biased = SimulatedAnnotator(world, AnnotatorConfig(flip_rate=0.0, position_bias=1.0))
    first = np.mean([biased.label_pair(*tie, rng).chosen == tie[1] for _ in range(4000)])
    assert abs(first - sigmoid(1.0)) < 4 * math.sqrt(0.2 / 4000)
    fair = SimulatedAnnotator(world, AnnotatorConfig(flip_rate=0.0))
    labels = [fair.label_pair(*tie, rng) for _ in range(4000)]
    assert abs(np.mean([label.chosen == tie[1] for label in labels]) - 0.5) < 4 * math.sqrt(0.25 / 4000)
    assert {label.margin_level for label in labels} == {0}  # ties are labelled "negligibly better / unsure"


def test_length_bias_prefers_longer_on_ties(world):
    annotator = SimulatedAnnotator(world, AnnotatorConfig(flip_rate=0.0, length_bias=0.1))
    assert world.gold("list 3 fruits", REFUSAL).reward == world.gold("list 3 fruits", "cat").reward == 0.0
    assert annotator.prob_first_better("list 3 fruits", REFUSAL, "cat") == pytest.approx(sigmoid(0.6))
    assert annotator.prob_first_better("list 3 fruits", "cat", REFUSAL) == pytest.approx(sigmoid(-0.6))


def test_per_axis_labels_disagree_on_harmful_compliance(world):
    annotator = SimulatedAnnotator(world, AnnotatorConfig(temperature=1e-6, flip_rate=0.0))
    rng = np.random.default_rng(0)
    for a, b in ((REFUSAL, HOW_TO), (HOW_TO, REFUSAL)):
        label = annotator.label_pair(HARMFUL, a, b, rng)
        assert (label.chosen, label.rejected) == (REFUSAL, HOW_TO)
        assert not label.helpfulness_chosen_first and label.safety_chosen_first
        assert label.margin_level == 3 and label.margin == 1.0
    helpful = SimulatedAnnotator(world, AnnotatorConfig(temperature=1e-6, flip_rate=0.0), axis="helpfulness")
    assert helpful.label_pair(HARMFUL, REFUSAL, HOW_TO, rng).chosen == HOW_TO
    assert helpful.utility(HARMFUL, HOW_TO) == 1.0


def test_plackett_luce_ranking(world):
    prompt = "list 4 fruits"
    responses = ["apple", "apple pear plum grape", "cat", "apple pear", "apple pear plum"]  # utilities .25 1 0 .5 .75
    sharp = SimulatedAnnotator(world, AnnotatorConfig(temperature=1e-3))
    rng = np.random.default_rng(0)
    assert all(sharp.rank(prompt, responses, rng) == [1, 4, 3, 0, 2] for _ in range(50))
    soft = SimulatedAnnotator(world, AnnotatorConfig(temperature=0.5))
    tops = np.bincount([soft.rank(prompt, responses, rng)[0] for _ in range(6000)], minlength=5) / 6000
    logits = np.array([0.25, 1.0, 0.0, 0.5, 0.75]) / 0.5
    expected = np.exp(logits) / np.exp(logits).sum()  # P(first place) under Plackett-Luce is a softmax
    assert np.all(np.abs(tops - expected) < 4 * np.sqrt(expected * (1 - expected) / 6000))
    for bad in (["apple"], ["apple"] * 10):
        with pytest.raises(ValueError, match="expected 2 to 9"):
            soft.rank(prompt, bad, rng)


def test_the_pairs_of_a_ranking_carry_the_annotators_label_flips(world):
    """A ranking's pairs are flipped like a pair shown alone: P(a over b) = (1 − f)·p + f·(1 − p), p
    the ranking's (for two responses Plackett–Luce is Bradley–Terry). Without flips, the ranking's order."""
    prompt, better, worse = "list 3 fruits", "apple pear plum", "apple pear"  # utilities 1 and 2/3
    config = AnnotatorConfig(temperature=0.1, flip_rate=0.2)
    annotator, rng, n = SimulatedAnnotator(world, config), np.random.default_rng(3), 20000
    chosen_better = np.mean([annotator.ranked_pairs(prompt, [worse, better], rng) == [(1, 0)] for _ in range(n)])
    p = sigmoid((1.0 - 2 / 3) / 0.1)
    expected = 0.8 * p + 0.2 * (1 - p)
    assert abs(chosen_better - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    assert expected == pytest.approx(annotator.prob_first_better(prompt, better, worse))
    # four responses: six pairs, a fifth of them flipped at a near-zero temperature
    responses = ["apple", "apple pear plum", "cat", "apple pear"]  # utilities 1/3, 1, 0, 2/3
    sharp = SimulatedAnnotator(world, AnnotatorConfig(temperature=1e-6, flip_rate=0.2))
    utilities = [1 / 3, 1.0, 0.0, 2 / 3]
    pairs = [pair for _ in range(3000) for pair in sharp.ranked_pairs(prompt, responses, rng)]
    wrong = np.mean([utilities[a] < utilities[b] for a, b in pairs])
    assert len(pairs) == 18000 and abs(wrong - 0.2) < 4 * math.sqrt(0.16 / 18000)
    exact = SimulatedAnnotator(world, AnnotatorConfig(temperature=1e-6, flip_rate=0.0))
    assert exact.ranked_pairs(prompt, responses, rng) == [(1, 3), (1, 0), (1, 2), (3, 0), (3, 2), (0, 2)]


def test_margin_levels(world):
    annotator = SimulatedAnnotator(world)
    gaps = [0.0, 0.05, 0.1, 0.2, 0.25, 0.49, 0.5, 1.0, -0.3]
    assert [annotator.margin_level(g) for g in gaps] == [0, 0, 1, 1, 2, 2, 3, 3, 2]
    assert len(MARGIN_LEVELS) == len(LLAMA2_MARGIN_SMALL) == 4 and MARGIN_LEVELS[0] == "negligibly better / unsure"


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0.0}, r"annotator.temperature=0.0 is invalid; expected a number > 0"),
    ({"flip_rate": 1.2}, r"annotator.flip_rate=1.2 is out of range; expected a number in \[0, 1\]"),
    ({"position_bias": float("nan")}, r"annotator.position_bias=nan is invalid; expected a finite number"),
    ({"margin_thresholds": (0.5, 0.25, 0.1)},
     r"annotator.margin_thresholds=\(0.5, 0.25, 0.1\) is invalid; expected three increasing"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AnnotatorConfig(**kwargs)


def test_unknown_axis(world):
    with pytest.raises(ValueError, match="axis='safety' is not known; expected one of"):
        SimulatedAnnotator(world, axis="safety")
