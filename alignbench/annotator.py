"""Simulated annotators: the world's gold utilities seen through human-like noise.

A pair is labelled with a Bradley-Terry choice on the gold utility (temperature), plus a logit bonus
for the response shown first (position bias) and for the longer one (length bias), after which the
label is flipped with probability flip_rate, AlpacaFarm-style (Dubois et al. 2023). Each label also
carries Llama 2's four-level margin (Touvron et al. 2023, sec. 3.2.1) from the gold utility gap, and
separately sampled helpfulness and safety labels. Rankings of K = 2..9 responses (InstructGPT) are
Plackett-Luce samples. A single response gets a binary thumbs up or down (KTO's desirable /
undesirable feedback, Ethayarajh et al. 2024): the same Bradley-Terry choice, against a response of
utility `threshold`, and the same flips.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from alignbench.world import AssistantWorld, check_probability

MARGIN_LEVELS = ("negligibly better / unsure", "slightly better", "better", "significantly better")
LLAMA2_MARGIN_SMALL = (0.0, 1 / 3, 2 / 3, 1.0)  # m(r) per level, Llama 2 Table 28 "margin small"
AXES = ("reward", "helpfulness", "harmlessness")  # GoldScore fields that can drive the overall choice
MAX_RANKED = 9  # InstructGPT showed labelers 4 to 9 responses per prompt


def _is_real(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass
class AnnotatorConfig:
    """Noise of a simulated annotator (AlpacaFarm's "human" and "AI" profiles are two settings of it)."""
    temperature: float = 0.1   # Bradley-Terry noise: P(a > b) = sigmoid((u_a - u_b) / temperature)
    flip_rate: float = 0.1     # probability that a pair label is flipped after the choice
    position_bias: float = 0.0  # logit bonus for the response shown first
    length_bias: float = 0.0   # logit bonus per word of length difference (a - b)
    margin_thresholds: tuple[float, float, float] = (0.1, 0.25, 0.5)  # utility gaps between the 4 margin levels

    def __post_init__(self) -> None:
        if not _is_real(self.temperature) or self.temperature <= 0:
            raise ValueError(f"annotator.temperature={self.temperature!r} is invalid; expected a number > 0")
        check_probability("annotator.flip_rate", self.flip_rate)
        for key in ("position_bias", "length_bias"):
            if not _is_real(getattr(self, key)):
                raise ValueError(f"annotator.{key}={getattr(self, key)!r} is invalid; expected a finite number")
        t = tuple(self.margin_thresholds)
        if len(t) != 3 or not all(_is_real(x) for x in t) or not 0 < t[0] < t[1] < t[2]:
            raise ValueError(f"annotator.margin_thresholds={self.margin_thresholds!r} is invalid; "
                             "expected three increasing positive numbers such as (0.1, 0.25, 0.5)")
        self.margin_thresholds = t


# AlpacaFarm (Dubois et al. 2023) simulates a pool of human labellers with label noise (about a
# quarter of their labels disagree with the majority) and found AI annotators to be less noisy but
# biased: towards the first response shown and towards longer ones. Two settings of one annotator
# give controlled "human" and "AI" feedback of known quality; the world's AI labeler proper is a
# model (alignbench.ai_feedback), whose errors are a model's, not a noise setting.
ANNOTATOR_PROFILES = {
    "human": AnnotatorConfig(temperature=0.2, flip_rate=0.25),
    "ai": AnnotatorConfig(temperature=0.05, flip_rate=0.05, position_bias=0.5, length_bias=0.15),
}


def annotator_profile(name: str) -> AnnotatorConfig:
    """The annotator settings of a named profile ("human" or "ai")."""
    if name not in ANNOTATOR_PROFILES:
        raise ValueError(f"annotator profile {name!r} is not known; expected one of {list(ANNOTATOR_PROFILES)}")
    return ANNOTATOR_PROFILES[name]


@dataclass(frozen=True)
class PairLabel:
    """One labelled comparison, the record a preference data set is built from."""
    prompt: str
    chosen: str
    rejected: str
    margin_level: int               # index into MARGIN_LEVELS, from the gold utility gap
    helpfulness_chosen_first: bool  # is `chosen` preferred on helpfulness (a separate draw from h)
    safety_chosen_first: bool       # is `chosen` preferred on harmlessness (a separate draw from s)
    chosen_utility: float           # gold utilities on the annotator's axis, to measure label accuracy
    rejected_utility: float

    @property
    def margin(self) -> float:
        """Llama 2's margin m(r) for the ranking loss -log sigmoid(r_c - r_r - m(r))."""
        return LLAMA2_MARGIN_SMALL[self.margin_level]


def _sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * x))  # no overflow at the huge logits of a near-zero temperature


class SimulatedAnnotator:
    """Labels pairs and rankings from the world's gold scores, with configurable noise."""

    def __init__(self, world: AssistantWorld, config: AnnotatorConfig | None = None, axis: str = "reward"):
        if axis not in AXES:
            raise ValueError(f"annotator axis={axis!r} is not known; expected one of {list(AXES)}")
        self.world, self.axis = world, axis
        self.config = config if config is not None else AnnotatorConfig()

    def utility(self, prompt: str, response: str) -> float:
        """The gold utility on this annotator's axis."""
        return getattr(self.world.gold(prompt, response), self.axis)

    def _p_first(self, u_first: float, u_second: float, length_difference: int) -> float:
        """P(the first shown is chosen): Bradley-Terry with biases, then flips p' = (1 - f) p + f (1 - p)."""
        c = self.config
        p = _sigmoid((u_first - u_second) / c.temperature + c.position_bias + c.length_bias * length_difference)
        return (1.0 - c.flip_rate) * p + c.flip_rate * (1.0 - p)

    def prob_first_better(self, prompt: str, a: str, b: str) -> float:
        """P(a is labelled better than b) with `a` shown first, all noise included."""
        return self._p_first(self.utility(prompt, a), self.utility(prompt, b), len(a.split()) - len(b.split()))

    def label_pair(self, prompt: str, a: str, b: str, rng: np.random.Generator) -> PairLabel:
        """Label one pair shown as (a, b). Gold ties are still labelled at random, with margin level 0."""
        gold_a, gold_b = self.world.gold(prompt, a), self.world.gold(prompt, b)
        length_difference = len(a.split()) - len(b.split())

        def a_wins(axis: str) -> bool:
            return bool(rng.random() < self._p_first(getattr(gold_a, axis), getattr(gold_b, axis), length_difference))

        first = a_wins(self.axis)
        (chosen, gold_c), (rejected, gold_r) = ((a, gold_a), (b, gold_b)) if first else ((b, gold_b), (a, gold_a))
        return PairLabel(prompt, chosen, rejected,
                         margin_level=self.margin_level(getattr(gold_a, self.axis) - getattr(gold_b, self.axis)),
                         helpfulness_chosen_first=a_wins("helpfulness") == first,
                         safety_chosen_first=a_wins("harmlessness") == first,
                         chosen_utility=getattr(gold_c, self.axis), rejected_utility=getattr(gold_r, self.axis))

    def rank(self, prompt: str, responses: list[str], rng: np.random.Generator) -> list[int]:
        """A Plackett-Luce ranking (indices, best first) with logits u / temperature + length bias,
        sampled by Gumbel-max sorting. Position bias is a pairwise notion and does not apply; flips
        apply to the pairs a ranking gives (`ranked_pairs`)."""
        if not 2 <= len(responses) <= MAX_RANKED:
            raise ValueError(f"rank got {len(responses)} responses; expected 2 to {MAX_RANKED}")
        c = self.config
        logits = np.array([self.utility(prompt, r) / c.temperature + c.length_bias * len(r.split()) for r in responses])
        return [int(i) for i in np.argsort(-(logits + rng.gumbel(size=len(responses))), kind="stable")]

    def ranked_pairs(self, prompt: str, responses: list[str], rng: np.random.Generator) -> list[tuple[int, int]]:
        """The (chosen, rejected) index pairs of a ranking (`rank`), each flipped with probability
        `flip_rate`, as `label_pair` flips a pair shown alone: a pair is labelled with probability
        (1 − f)·p + f·(1 − p), p the ranking's. Flipped pairs need not form a ranking any more (a
        careless label is not consistent with the others). No flip draws where flip_rate is 0."""
        order = self.rank(prompt, responses, rng)
        pairs = [(order[a], order[b]) for a in range(len(order)) for b in range(a + 1, len(order))]
        if self.config.flip_rate == 0:
            return pairs
        flipped = rng.random(len(pairs)) < self.config.flip_rate
        return [(b, a) if flip else (a, b) for (a, b), flip in zip(pairs, flipped)]

    def prob_thumbs_up(self, prompt: str, response: str, threshold: float = 0.5) -> float:
        """P(thumbs up): σ((u − threshold) / temperature), then flipped with flip_rate. Position and
        length bias are comparisons between two shown responses and do not apply to one."""
        c = self.config
        p = _sigmoid((self.utility(prompt, response) - threshold) / c.temperature)
        return (1.0 - c.flip_rate) * p + c.flip_rate * (1.0 - p)

    def thumbs(self, prompt: str, response: str, rng: np.random.Generator, threshold: float = 0.5) -> bool:
        """One binary label of one response: True for a thumbs up (desirable)."""
        return bool(rng.random() < self.prob_thumbs_up(prompt, response, threshold))

    def margin_level(self, gap: float) -> int:
        """Llama 2 margin level of a utility gap: 0 below the first threshold, 3 at or above the last."""
        return bisect.bisect_right(self.config.margin_thresholds, abs(gap))


def thumbs_records(annotator: SimulatedAnnotator, responses: Sequence[tuple[str, Sequence[str]]], rng: np.random.Generator,
                   threshold: float = 0.5) -> list[dict]:
    """Thumbs labels ({prompt, response, desirable}) for each prompt's responses, one label each, in order."""
    check_probability("thumbs threshold", threshold)
    return [
        {"prompt": prompt, "response": response, "desirable": annotator.thumbs(prompt, response, rng, threshold)}
        for prompt, group in responses for response in group
    ]
