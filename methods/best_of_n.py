"""Best-of-n sampling at inference (Stiennon et al. 2020; Nakano et al. 2021).

n samples from the SFT policy per prompt; the one the reward model scores highest is
the response. No training. Its KL to the SFT policy is known in closed form,
log n − (n−1)/n. `best_of_n_gold` chooses by the gold reward instead: the upper bound
that shows how much of the gap is the reward model's error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from alignbench.evaluation import PolicyResponses, best_of_n_kl, sample_policy
from alignbench.methods.base import AlignmentMethod


@dataclass
class BestOfNConfig:
    """Best-of-n at inference."""

    n: int = 16
    """Samples per prompt."""

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n={self.n} must be >= 1")


class BestOfN(AlignmentMethod):
    name = "best_of_n"
    config_class = BestOfNConfig
    trains = False
    feedback = "reward"

    def select_scores(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """Scores the candidates are chosen by: the proxy reward model."""
        return self.reward_scores(prompts, responses)

    def respond(self, prompts, generator: torch.Generator, desc=False) -> PolicyResponses:
        n, ctx = self.config.n, self.context
        candidates = sample_policy(self.policy, None, ctx.codec, prompts, ctx.eval_config, generator, desc=desc, num_samples=n)
        self.budget.policy_samples += len(candidates.texts)
        scores = self.select_scores([p for p in prompts for _ in range(n)], candidates.texts)  # score_texts scores repeats once
        best = np.asarray(scores).reshape(len(prompts), n).argmax(axis=1)
        chosen = np.arange(len(prompts)) * n + best
        return PolicyResponses(
            [candidates.response_ids[i] for i in chosen], [candidates.texts[i] for i in chosen], analytic_kl=best_of_n_kl(n)
        )


class BestOfNGold(BestOfN):
    name = "best_of_n_gold"
    feedback = "gold"

    def select_scores(self, prompts, responses) -> np.ndarray:
        return self.context.gold_judge.score_batch(prompts, responses)
