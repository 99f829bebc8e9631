"""SimPO: Simple Preference Optimization with a reference-free reward (Meng et al. 2024, arXiv 2405.14734).

Two changes to DPO. The implicit reward is the policy's average log-likelihood, scaled by β, with no
reference model: the quantity that generation (which ranks by average likelihood) actually uses,
and one that does not reward length (eq. 4). And a target margin γ > 0 separates the two sides, as
in a Bradley-Terry model with a home advantage (eq. 5):

    r(x, y) = (β / |y|) log π(y|x)
    L_SimPO = −E[ log σ( (β/|y_w|) log π(y_w|x) − (β/|y_l|) log π(y_l|x) − γ ) ]

With γ = 0 it is the plain length-normalised Bradley-Terry contrast. No reference model is loaded
into the objective (the evaluation's KL is still measured against the SFT policy).

Defaults: β = 2.0 and γ/β = 0.5 (γ = 1), the authors' training configs (their β ∈ [2, 2.5] and
γ/β ∈ [0.25, 0.55]); the authors' learning rates (3e-7 – 1e-6) are for 7-8B models, here the tiny
world model uses the world's DPO learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from alignbench.methods.offline import Objective, OfflineConfig, OfflinePreferenceMethod
from alignbench.training import OptimConfig


def simpo_loss(policy_chosen_mean_logps: torch.Tensor, policy_rejected_mean_logps: torch.Tensor, beta: float, gamma: float) -> Objective:
    """SimPO loss (eq. 6): mean of −log σ(β·m_w − β·m_l − γ) over P pairs.

    Inputs: [P] length-normalised log-probs m = (1/|y|) log π(y|x) of the chosen and rejected
    responses. Returns the loss and the rewards β·m of both sides.
    """
    chosen_rewards = beta * policy_chosen_mean_logps
    rejected_rewards = beta * policy_rejected_mean_logps
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma).mean()
    return Objective(loss, chosen_rewards.detach(), rejected_rewards.detach())


@dataclass
class SimPOConfig(OfflineConfig):
    """SimPO on the experiment's preference pairs."""

    beta: float = 2.0
    """Scale β of the reward (β/|y|) log π(y|x) (the authors' configs: 2.0 – 2.5)."""
    gamma_beta_ratio: float = 0.5
    """Target margin γ as a fraction of β, the authors' parametrisation (γ = 1 at the defaults)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_ratio=0.1))
    """Optimiser (the world's DPO setting; the authors' lr is for 7B models)."""

    def __post_init__(self):
        super().__post_init__()
        if not self.beta > 0:
            raise ValueError(f"beta={self.beta} must be a positive number")
        if not self.gamma_beta_ratio >= 0:
            raise ValueError(f"gamma_beta_ratio={self.gamma_beta_ratio} must be >= 0 (0: no target margin)")

    @property
    def gamma(self) -> float:
        """The target margin γ = β · gamma_beta_ratio."""
        return self.beta * self.gamma_beta_ratio


class SimPO(OfflinePreferenceMethod):
    """SimPO: a length-normalised, reference-free reward with a target margin."""

    name = "simpo"
    config_class = SimPOConfig
    needs_reference = False

    def loss(self, policy, reference, batch):
        return simpo_loss(*batch.pairs(policy.mean), self.config.beta, self.config.gamma)
