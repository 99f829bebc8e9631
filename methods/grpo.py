"""GRPO: group relative policy optimisation (Shao et al. 2024, DeepSeekMath, sec. 4.1), with the
switches of Dr. GRPO (Liu et al. 2025) and DAPO (Yu et al. 2025).

No critic: each prompt gets a group of G samples, and a sample's advantage is its reward
relative to its group's, the same at every token (outcome supervision, eq. 3 and sec. 4.1.2):

    Â_i,t = (r_i − mean(r_1..G)) / std(r_1..G)

The KL to the reference is not in the reward but in the loss, per token, with the k3
estimator (eq. 4): J = (1/G) Σ_i (1/|o_i|) Σ_t { min(ρ Â, clip(ρ, 1 ± ε) Â) − β D_KL,t }.

Switches (all options of the online base, so any online method has them):
- Dr. GRPO: `reward_normalization: none` (no division by the group's std, which up-weights
  groups that are nearly all right or all wrong) and `loss_aggregation: constant` (no
  1/|o_i|, which favours long wrong answers and short right ones).
- DAPO: `clip_range_high: 0.28` (clip-higher), `dynamic_sampling: true` (drop groups whose
  rewards are all equal), `loss_aggregation: token_mean`, and β = 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from alignbench.methods.online import OnlineConfig, OnlineRLMethod, Rollout
from alignbench.training import OptimConfig


def group_advantages(rewards: Tensor) -> Tensor:
    """Outcome advantages [P, G] of rewards [P, G] (already normalised per group, per batch or
    not at all by the base): each reward minus its group's mean. With `reward_normalization:
    group` this is GRPO's (r − mean) / std; with `none` it is Dr. GRPO's r − mean."""
    return rewards - rewards.mean(dim=1, keepdim=True)


@dataclass
class GRPOConfig(OnlineConfig):
    """GRPO: G samples per prompt, group-relative advantages, k3 KL in the loss."""

    batch_size: int = 16
    """Prompts per iteration (16 × 4 samples: the 64 rollouts of PPO's iteration)."""
    samples_per_prompt: int = 4
    """G, the group size."""
    reward_normalization: Literal["group", "batch", "none"] = "group"
    """'group' (GRPO), 'none' (Dr. GRPO), or 'batch' (the std over the whole batch)."""
    loss_aggregation: Literal["token_mean", "sequence_mean", "constant"] = "sequence_mean"
    """'sequence_mean' (GRPO eq. 3), 'constant' (Dr. GRPO), 'token_mean' (DAPO)."""
    kl_penalty: Literal["reward", "loss"] = "loss"
    """β·k3 per token in the loss (GRPO eq. 4)."""
    init_kl_coef: float = 0.04
    """β (DeepSeekMath: 0.04)."""
    ppo_epochs: int = 2
    """Passes of minibatch updates over each rollout batch."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_ratio=0.0, schedule="constant"))
    """Optimiser of the policy."""


class GRPO(OnlineRLMethod):
    name = "grpo"
    config_class = GRPOConfig

    def prepare(self, rollout: Rollout, kl_coef: float) -> dict[str, Tensor]:
        """The group-relative advantage of each sample (of its reward minus β·Σ_t k1 when the KL
        goes in the reward), broadcast over its tokens."""
        rewards = rollout.rewards - kl_coef * rollout.kl.sum(dim=1)
        advantages = group_advantages(rollout.grouped(rewards)).reshape(-1)
        return {"advantages": advantages[:, None] * rollout.mask}
