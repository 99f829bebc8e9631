"""IPO: Identity Preference Optimisation (Azar et al. 2023, arXiv 2310.12036).

"A General Theoretical Paradigm to Understand Learning from Human Preferences".

DPO's loss keeps pushing the log-ratio margin up as long as any pair is not yet certain, so on
deterministic (or finite) preference data its optimum lies at an infinite margin and the KL
regularisation stops mattering. ΨPO with Ψ the identity instead regresses the margin onto a fixed
target; the empirical IPO loss (eq. 17) is

    h(y_w, y_l) = log π(y_w|x)/π_ref(y_w|x) − log π(y_l|x)/π_ref(y_l|x)
    L_IPO       = E[ (h − 1/(2τ))² ],

minimised at h = 1/(2τ) for every pair, where τ is the KL regularisation strength. The paper's
log-probabilities are sums over the response's tokens; TRL divides them by the response length
first (`length_normalized`), which moves the target from 1/(2τ) nats per response to 1/(2τ) nats
per token.

Defaults: τ = 0.1, TRL's and HALOs' β for IPO (the paper sweeps τ). The implicit reward logged is
τ · log π/π_ref, DPO's with β = τ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignbench.methods.offline import Objective, OfflineConfig, OfflinePreferenceMethod
from alignbench.training import OptimConfig


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    tau: float,
) -> Objective:
    """IPO loss (eq. 17): mean of (h − 1/(2τ))² over P pairs.

    Inputs: [P] log-probs of the chosen and rejected responses under the policy and the reference
    (sums, or per-token means for the length-normalised form). Returns the loss and the implicit
    rewards τ · log π/π_ref of both sides.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    h = chosen_logratios - rejected_logratios
    loss = ((h - 1 / (2 * tau)) ** 2).mean()
    return Objective(loss, tau * chosen_logratios.detach(), tau * rejected_logratios.detach())


@dataclass
class IPOConfig(OfflineConfig):
    """IPO on the experiment's preference pairs."""

    tau: float = 0.1
    """KL regularisation τ: the loss is 0 where the log-ratio margin h equals 1/(2τ)."""
    length_normalized: bool = False
    """Average the log-probs over the response's tokens (TRL's IPO) instead of summing them (the paper)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_ratio=0.1))
    """Optimiser (the world's DPO setting)."""

    def __post_init__(self):
        super().__post_init__()
        if not self.tau > 0:
            raise ValueError(f"tau={self.tau} must be a positive number")


class IPO(OfflinePreferenceMethod):
    """IPO: the squared distance of the log-ratio margin from 1/(2τ)."""

    name = "ipo"
    config_class = IPOConfig

    def loss(self, policy, reference, batch):
        c = self.config
        pol, ref = (policy.mean, reference.mean) if c.length_normalized else (policy.summed, reference.summed)
        return ipo_loss(*batch.pairs(pol), *batch.pairs(ref), c.tau)
