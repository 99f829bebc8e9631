"""ORPO: Monolithic Preference Optimization without Reference Model (Hong et al. 2024, arXiv 2403.07691).

ORPO adds to the supervised fine-tuning loss a term that favours the chosen response over the
rejected one by their odds, so that one stage does both SFT and preference alignment (eqs. 6-7):

    P(y|x)   = exp( (1/|y|) Σ_t log π(y_t | x, y_<t) )       (length-averaged likelihood)
    odds(y)  = P / (1 − P)
    L_OR     = −log σ( log odds(y_w|x) − log odds(y_l|x) )
    L_ORPO   = E[ L_SFT + λ · L_OR ],

with L_SFT the NLL of the chosen response. No reference model is used. The paper trains from the
pretrained model; here ORPO starts from the shared SFT checkpoint like every method, so that all of
them begin at the same policy (its SFT term then keeps the policy near the chosen responses).

Defaults: λ = 0.1, the paper's (and TRL's `beta`). The implicit reward logged is λ · (1/|y|) log π(y|x),
as TRL logs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from alignbench.methods.offline import Objective, OfflineConfig, OfflinePreferenceMethod
from alignbench.training import OptimConfig


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, stable at both ends (Mächler 2012), with finite gradients everywhere:
    each branch sees only the inputs it is used for."""
    x = x.clamp(max=-1e-6)  # a response of likelihood 1 has infinite odds
    near = torch.log(-torch.expm1(x.clamp(min=-math.log(2))))
    far = torch.log1p(-torch.exp(x.clamp(max=-math.log(2))))
    return torch.where(x > -math.log(2), near, far)


def orpo_loss(
    policy_chosen_mean_logps: torch.Tensor,
    policy_rejected_mean_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    lam: float,
) -> Objective:
    """ORPO loss (eq. 6): L_SFT + λ · mean over P pairs of −log σ(log odds(y_w) − log odds(y_l)).

    policy_*_mean_logps: [P] length-averaged log-probs log P(y|x) of the chosen and rejected
    responses; chosen_nll: scalar L_SFT, the NLL per token of the chosen responses. log odds(y) =
    log P − log(1 − P). Returns the loss, the rewards λ · log P of both sides, and the terms
    `sft_loss`, `or_loss` and `log_odds_ratio` (its mean).
    """
    log_odds = (policy_chosen_mean_logps - policy_rejected_mean_logps) - (
        log1mexp(policy_chosen_mean_logps) - log1mexp(policy_rejected_mean_logps)
    )
    or_loss = -F.logsigmoid(log_odds).mean()
    loss = chosen_nll + lam * or_loss
    return Objective(loss, lam * policy_chosen_mean_logps.detach(), lam * policy_rejected_mean_logps.detach(),
                     {"sft_loss": chosen_nll.detach(), "or_loss": or_loss.detach(), "log_odds_ratio": log_odds.detach().mean()})


@dataclass
class ORPOConfig(OfflineConfig):
    """ORPO on the experiment's preference pairs (from the SFT checkpoint)."""

    lam: float = 0.1
    """Weight λ of the odds-ratio term beside the SFT loss (the paper's 0.1)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_ratio=0.1))
    """Optimiser (the world's DPO setting)."""

    def __post_init__(self):
        super().__post_init__()
        if not self.lam > 0:
            raise ValueError(f"lam={self.lam} must be a positive number")


class ORPO(OfflinePreferenceMethod):
    """ORPO: SFT on the chosen responses plus λ times the log-odds-ratio loss; no reference."""

    name = "orpo"
    config_class = ORPOConfig
    needs_reference = False

    def loss(self, policy, reference, batch):
        chosen_summed, _ = batch.pairs(policy.summed)
        chosen_lengths, _ = batch.pairs(policy.lengths)
        # L_SFT per token over the batch's chosen responses (a response counts once per pair it wins).
        nll = -chosen_summed.sum() / chosen_lengths.sum().clamp_min(1)
        return orpo_loss(*batch.pairs(policy.mean), nll, self.config.lam)
