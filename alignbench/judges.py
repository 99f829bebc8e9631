"""One judge interface for every source of feedback and every evaluation.

A judge answers two questions: `prefer(prompt, a, b)`, the probability that response a
is better than response b, and `score(prompt, y)`, a scalar quality. Batched versions
exist because evaluation asks thousands of times. Which judge labels training data and
which judge evaluates are separate settings of an experiment.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch

from alignbench.annotator import SimulatedAnnotator
from alignbench.reward import ProxyReward
from alignbench.world import AssistantWorld


class Judge(Protocol):
    name: str

    def prefer(self, prompt: str, a: str, b: str) -> float: ...

    def score(self, prompt: str, response: str) -> float: ...

    def prefer_batch(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> np.ndarray: ...

    def score_batch(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray: ...


def preference_from_scores(score_a: np.ndarray, score_b: np.ndarray) -> np.ndarray:
    """1 where a scores higher, 0 where lower, 1/2 on a tie."""
    return 0.5 + 0.5 * np.sign(np.asarray(score_a, dtype=float) - np.asarray(score_b, dtype=float))


class GoldJudge:
    """The world's exact gold reward (Llama 2 combination of helpfulness and harmlessness)."""

    name = "gold"

    def __init__(self, world: AssistantWorld):
        self.world = world

    def score(self, prompt: str, response: str) -> float:
        return self.world.gold(prompt, response).reward

    def score_batch(self, prompts, responses) -> np.ndarray:
        return np.array([self.world.gold(p, y).reward for p, y in zip(prompts, responses)])

    def prefer(self, prompt: str, a: str, b: str) -> float:
        return float(preference_from_scores(self.score(prompt, a), self.score(prompt, b)))

    def prefer_batch(self, prompts, a, b) -> np.ndarray:
        return preference_from_scores(self.score_batch(prompts, a), self.score_batch(prompts, b))


class AnnotatorJudge:
    """A simulated annotator's choice probability (noise, flips and biases included)."""

    name = "annotator"

    def __init__(self, annotator: SimulatedAnnotator):
        self.annotator = annotator

    def score(self, prompt: str, response: str) -> float:
        return self.annotator.utility(prompt, response)

    def score_batch(self, prompts, responses) -> np.ndarray:
        return np.array([self.score(p, y) for p, y in zip(prompts, responses)])

    def prefer(self, prompt: str, a: str, b: str) -> float:
        return self.annotator.prob_first_better(prompt, a, b)

    def prefer_batch(self, prompts, a, b) -> np.ndarray:
        return np.array([self.prefer(p, x, y) for p, x, y in zip(prompts, a, b)])


class RewardModelJudge:
    """A (proxy) reward model as a judge: Bradley–Terry probability of its scores."""

    name = "reward_model"

    def __init__(self, proxy: ProxyReward, harmful_of=None):
        self.proxy = proxy
        self.harmful_of = harmful_of  # prompt -> bool, where the data says which prompts are safety prompts

    def score_batch(self, prompts, responses) -> np.ndarray:
        harmful = None if self.harmful_of is None else [self.harmful_of(p) for p in prompts]
        return self.proxy.score(list(prompts), list(responses), harmful).numpy()

    def score(self, prompt: str, response: str) -> float:
        return float(self.score_batch([prompt], [response])[0])

    def prefer_batch(self, prompts, a, b) -> np.ndarray:
        logit = lambda p: torch.logit(torch.as_tensor(p, dtype=torch.float64), eps=1e-6)  # noqa: E731
        return torch.sigmoid(logit(self.score_batch(prompts, a)) - logit(self.score_batch(prompts, b))).numpy()

    def prefer(self, prompt: str, a: str, b: str) -> float:
        return float(self.prefer_batch([prompt], [a], [b])[0])
