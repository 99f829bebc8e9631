"""Online DPO: direct alignment from online AI feedback (Guo et al. 2024, arXiv 2402.04792, Alg. 1).

DPO's loss, but on pairs the current policy has just sampled: each iteration draws two
responses per prompt from π_θ, the reward source (the reward model, the world's verifier, or
the AI labeler as judge) ranks them, and the policy takes the DPO step against the frozen SFT
reference (Rafailov et al. 2023, eq. 7):

    L = −log σ( β log π(y_w|x)/π_ref(y_w|x) − β log π(y_l|x)/π_ref(y_l|x) ),   y_w ≻ y_l by the reward

Pairs that the reward cannot tell apart (equal scores, e.g. two identical samples) carry no
preference and are dropped. The KL constraint is DPO's own β; the online base's KL options
(`kl_penalty`, `init_kl_coef`) are not used, and `train/kl` is still each rollout's KL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from alignbench.logprobs import PackedBatch
from alignbench.methods.dpo import dpo_loss
from alignbench.methods.offline import paired_reward_statistics
from alignbench.methods.online import OnlineConfig, OnlineRLMethod, Rollout, response_token_logprobs
from alignbench.training import OptimConfig


def pair_logps(logprobs: Tensor, mask: Tensor, chosen_first: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token log-probs [2P, L] of P consecutive pairs (rows 2p, 2p + 1), mask [2P, L], and
    chosen_first [P] bool -> summed log-probs [P] of the chosen and of the rejected response."""
    sums = (logprobs * mask).sum(dim=1).view(-1, 2)
    first, second = sums[:, 0], sums[:, 1]
    return torch.where(chosen_first, first, second), torch.where(chosen_first, second, first)


@dataclass
class OnlineDPOConfig(OnlineConfig):
    """Online DPO: two samples per prompt from the current policy, ranked by the reward source."""

    beta: float = 0.1
    """DPO's β: the strength of the implicit KL constraint to the SFT reference."""
    batch_size: int = 32
    """Prompts per iteration (32 × 2 samples: the 64 rollouts of PPO's iteration)."""
    samples_per_prompt: int = 2
    """Two responses per prompt: one pair."""
    minibatch_size: int = 64
    """Responses per update: by default one update per rollout batch (on-policy, as Guo et al.)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_ratio=0.0, schedule="constant"))
    """Optimiser of the policy."""

    def __post_init__(self):
        super().__post_init__()
        if self.samples_per_prompt != 2:
            raise ValueError(f"samples_per_prompt={self.samples_per_prompt}: online DPO ranks a pair per prompt; keep samples_per_prompt=2")
        if not self.beta > 0:
            raise ValueError(f"beta={self.beta} must be a positive number")
        if self.kl_penalty != "reward" or self.kl_controller != "fixed":
            raise ValueError(f"kl_penalty={self.kl_penalty!r}, kl_controller={self.kl_controller!r}: online DPO's KL constraint is beta; "
                             "keep kl_penalty=reward and kl_controller=fixed (unused)")


class OnlineDPO(OnlineRLMethod):
    name = "online_dpo"
    config_class = OnlineDPOConfig

    def train_groups(self, rollout: Rollout) -> Tensor:
        scores = rollout.grouped(rollout.scores)
        return scores[:, 0] != scores[:, 1]

    def prepare(self, rollout: Rollout, kl_coef: float) -> dict[str, Tensor]:
        scores = rollout.grouped(rollout.scores)
        return {"chosen_first": (scores[:, 0] > scores[:, 1]).repeat_interleave(2)}  # per row, for slicing

    def update_loss(self, batch: PackedBatch, rollout: Rollout, idx: Tensor, prepared: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        m, chosen_first = rollout.mask[idx], prepared["chosen_first"][idx][::2]
        policy_chosen, policy_rejected = pair_logps(response_token_logprobs(self.policy, batch, rollout.start), m, chosen_first)
        reference_chosen, reference_rejected = pair_logps(rollout.ref_logprobs[idx], m, chosen_first)
        objective = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, self.config.beta)
        return objective.loss, {**objective.terms, **paired_reward_statistics(objective)}
