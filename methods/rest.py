"""ReST: Reinforced Self-Training (Gulcehre et al. 2023, arXiv 2308.08998).

Grow: sample N responses per prompt from the current policy and score them with the
reward model. Improve: fine-tune on the grown samples whose reward is at least τ_i, for
a rising sequence of thresholds τ_1 < τ_2 < … — each Improve step trains on fewer,
better samples. Grow and Improve alternate: each Grow step samples from the latest
policy, and its Improve steps fine-tune from the SFT initialisation (the paper's
default, `init="sft"`) or continue from the latest policy (`"continue"`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from alignbench.methods.base import RoundsConfig, SampleAndTuneMethod
from alignbench.training import OptimConfig


def filter_by_threshold(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Mask of the samples whose reward is at or above the threshold. scores: [N] -> bool [N]."""
    return np.asarray(scores) >= threshold


@dataclass
class ReSTConfig(RoundsConfig):
    """Grow / Improve loops with rising reward thresholds."""

    rounds: int = 1
    """Grow steps."""
    prompts_per_round: int = 1500
    """Prompts sampled at each Grow step."""
    samples_per_prompt: int = 4
    """N: samples per prompt at each Grow step."""
    thresholds: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.85])
    """τ_1 < τ_2 < ...: one Improve step per threshold, on the proxy reward (a probability in (0, 1))."""
    init: Literal["sft", "continue"] = "sft"
    """After each Grow step, fine-tune from the SFT policy (the paper's default) or continue training."""
    batch_size: int = 32
    """Samples per step."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_ratio=0.05))
    """Optimiser."""

    def __post_init__(self):
        super().__post_init__()
        if not self.thresholds or any(b <= a for a, b in zip(self.thresholds, self.thresholds[1:])):
            raise ValueError(f"thresholds={self.thresholds} must be a non-empty, strictly rising list")


class ReST(SampleAndTuneMethod):
    name = "rest"
    config_class = ReSTConfig
    needs_reference = False
    feedback = "reward"

    def train_policy(self, fit) -> None:
        c = self.config
        for g in range(c.rounds):
            prompts, responses = self.grow(g)  # Grow samples from the latest policy...
            if c.init == "sft" and g > 0:  # ...and Improve fine-tunes from the SFT initialisation
                self.restart_from_sft()
            flat_prompts = [p for p, ys in zip(prompts, responses) for _ in ys]
            flat = [y for ys in responses for y in ys]
            scores = self.reward_scores(flat_prompts, flat)
            for i, threshold in enumerate(c.thresholds):
                keep = filter_by_threshold(scores, threshold)
                examples = [{"prompt": p, "response": y} for p, y, k in zip(flat_prompts, flat, keep) if k]
                self.tune(fit, g * len(c.thresholds) + i + 1, examples)
                if fit.stopped_by_kl_budget:
                    return
