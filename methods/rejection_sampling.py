"""Rejection-sampling fine-tuning (Touvron et al. 2023, Llama 2, sec. 3.2.3).

Each round samples K responses per prompt from the current policy, keeps the one the
reward model scores highest, and fine-tunes on those winners (RLHF-V1..V4 were trained
this way, each round sampling from the previous round's policy). Llama 2 found that
training only on the latest round's winners forgot capabilities, and fixed it by keeping
the best samples of all earlier rounds (`keep_all_rounds`). Sampling temperature may
change per round (`temperatures`): the best temperature moves as the policy sharpens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from alignbench.methods.base import RoundsConfig, SampleAndTuneMethod
from alignbench.training import OptimConfig


def best_per_prompt(scores: np.ndarray) -> np.ndarray:
    """Index of the highest-scoring sample per prompt. scores: [P, K] -> [P] (first on ties)."""
    return np.asarray(scores).argmax(axis=1)


@dataclass
class RejectionSamplingConfig(RoundsConfig):
    """Best-of-K under the reward model, then supervised fine-tuning on the winners."""

    rounds: int = 3
    """Rounds (Llama 2 ran four before PPO)."""
    prompts_per_round: int = 1000
    """Training prompts per round."""
    samples_per_prompt: int = 8
    """K: samples per prompt, of which the best is kept."""
    temperatures: list[float] = field(default_factory=list)
    """Sampling temperature per round (empty: `temperature` for every round)."""
    keep_all_rounds: bool = True
    """Train each round on the winners of all rounds so far (Llama 2's fix for forgetting)."""
    batch_size: int = 32
    """Winners per step."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1.5e-4, warmup_ratio=0.05))
    """Optimiser. Each round trains on every earlier round's winners again: on the quickstart, 3e-4
    reached KL 0.97 and its third round lost gold reward on the validation split; 1.5e-4 rose every
    round and ended at KL 0.63 with the same win rate."""

    def __post_init__(self):
        super().__post_init__()
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt={self.samples_per_prompt} must be >= 2 to choose among samples")
        if self.temperatures and (len(self.temperatures) != self.rounds or min(self.temperatures) <= 0):
            raise ValueError(f"temperatures={self.temperatures} must list one positive temperature per round ({self.rounds})")


class RejectionSampling(SampleAndTuneMethod):
    name = "rejection_sampling"
    config_class = RejectionSamplingConfig
    needs_reference = False
    feedback = "reward"

    def __init__(self, config: RejectionSamplingConfig, context):
        super().__init__(config, context)
        self.winners: list[dict] = []

    def round_temperature(self, round_index: int) -> float:
        return self.config.temperatures[round_index] if self.config.temperatures else self.config.temperature

    def examples(self, round_index, prompts, responses):
        k = self.config.samples_per_prompt
        flat_prompts = [p for p in prompts for _ in range(k)]
        scores = self.reward_scores(flat_prompts, [y for ys in responses for y in ys]).reshape(len(prompts), k)
        best = best_per_prompt(scores)
        winners = [{"prompt": p, "response": ys[b]} for p, ys, b in zip(prompts, responses, best)]
        self.winners = (self.winners if self.config.keep_all_rounds else []) + winners
        return list(self.winners)
