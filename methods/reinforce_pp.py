"""REINFORCE++ (Hu 2025, arXiv 2501.03262): PPO's tricks without a critic.

Per-token rewards put the KL penalty on every token (k1) and the sequence reward on the last:

    r_t = 1[t = T] · r(x, y) − β · log π(y_t | ·) / π_SFT(y_t | ·)

the advantage is the return to go, normalised over the whole batch (not per prompt, which the
paper argues biases the estimate and over-fits easy prompts),

    A_t = Σ_{s ≥ t} γ^{s−t} r_s,    A ← (A − mean_batch A) / std_batch A

and the update is the online base's clipped surrogate (token mean).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from alignbench.methods.online import OnlineConfig, OnlineRLMethod, Rollout, kl_penalised_rewards, masked_whiten
from alignbench.training import OptimConfig


def reinforce_pp_advantages(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Token rewards [B, L] (mask [B, L]) -> returns to go Σ_{s≥t} γ^{s−t} r_s, whitened over
    every response token of the batch; 0 off the mask."""
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[1])):
        running = token_rewards[:, t] * mask[:, t] + gamma * running
        returns[:, t] = running
    return masked_whiten(returns, mask)


@dataclass
class ReinforcePPConfig(OnlineConfig):
    """REINFORCE++: k1 KL in the token rewards, returns whitened over the batch, no critic."""

    gamma: float = 1.0
    """Discount (1: the episode is one response)."""
    init_kl_coef: float = 0.05
    """β of the per-token KL penalty."""
    ppo_epochs: int = 2
    """Passes of minibatch updates over each rollout batch."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_ratio=0.0, schedule="constant"))
    """Optimiser of the policy."""

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma={self.gamma} must be in [0, 1]")
        if self.kl_penalty != "reward":
            raise ValueError(f"kl_penalty={self.kl_penalty!r}: REINFORCE++ puts the KL in the token rewards; keep kl_penalty=reward")


class ReinforcePP(OnlineRLMethod):
    name = "reinforce_pp"
    config_class = ReinforcePPConfig

    def prepare(self, rollout: Rollout, kl_coef: float) -> dict[str, Tensor]:
        rewards = kl_penalised_rewards(rollout.rewards, rollout.kl, rollout.mask, kl_coef)
        return {"advantages": reinforce_pp_advantages(rewards, rollout.mask, self.config.gamma)}
