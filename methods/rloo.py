"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, "Back to Basics",
eq. 6; Kool et al. 2019).

Each prompt gets k samples; each sample's baseline is the mean reward of the other k − 1,
an unbiased baseline (it does not depend on the sample itself) that needs no critic:

    A_i = R(y_i) − (1 / (k − 1)) Σ_{j ≠ i} R(y_j),    R(y) = r(x, y) − β log π(y|x) / π_ref(y|x)

The whole sequence is one action (the KL is in the sequence reward, as in the paper); the
update is the online base's clipped surrogate with A_i at every token of y_i.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from alignbench.methods.online import OnlineConfig, OnlineRLMethod, Rollout
from alignbench.training import OptimConfig


def leave_one_out_advantages(rewards: Tensor) -> Tensor:
    """[P, k] rewards -> [P, k] advantages r_i − mean_{j≠i} r_j (k ≥ 2); equal to
    k/(k − 1) · (r_i − mean_j r_j)."""
    k = rewards.shape[1]
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    return rewards - baseline


@dataclass
class RLOOConfig(OnlineConfig):
    """RLOO: k samples per prompt, leave-one-out baseline, sequence-level KL in the reward."""

    batch_size: int = 16
    """Prompts per iteration (16 × 4 samples: the 64 rollouts of PPO's iteration)."""
    samples_per_prompt: int = 4
    """k (Ahmadian et al.: 2 to 4)."""
    init_kl_coef: float = 0.05
    """β of the KL in the sequence reward."""
    reward_transform: Literal["none", "whiten", "logit_whiten"] | None = "none"
    """The source's score as it is: the baseline removes its offset."""
    ppo_epochs: int = 2
    """Passes of minibatch updates over each rollout batch."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_ratio=0.0, schedule="constant"))
    """Optimiser of the policy."""

    def __post_init__(self):
        super().__post_init__()
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt={self.samples_per_prompt}: the leave-one-out baseline needs >= 2 samples per prompt")


class RLOO(OnlineRLMethod):
    name = "rloo"
    config_class = RLOOConfig

    def prepare(self, rollout: Rollout, kl_coef: float) -> dict[str, Tensor]:
        rewards = rollout.rewards - kl_coef * rollout.kl.sum(dim=1)  # R(y): the sequence reward minus β·KL
        advantages = leave_one_out_advantages(rollout.grouped(rewards)).reshape(-1)
        return {"advantages": advantages[:, None] * rollout.mask}
