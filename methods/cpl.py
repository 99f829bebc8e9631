"""Contrastive Preference Learning (Hejna et al. 2023, arXiv 2310.13639): no reward model, no RL.

CPL models a preference by regret, not reward: the preferred response is the one whose tokens have the
larger summed optimal advantage A*. Under maximum-entropy RL the optimal advantage is the optimal
policy's own log-likelihood, A*(s, a) = α log π*(a|s), so putting the policy in its place turns the
preference likelihood into a supervised, contrastive loss on the policy itself (eq. 5):

    S(y)  = α Σ_t γ^t log π(y_t | x, y_<t)
    L_CPL = −E[ log exp S(y⁺) / (exp S(y⁺) + exp S(y⁻)) ]

With finite offline data this loss is convex but not strictly so, and some of its optima put mass on
responses outside the data. The conservative bias λ ∈ (0, 1] on the rejected side (eq. 6),

    L_CPL(λ) = −E[ log exp S(y⁺) / (exp S(y⁺) + exp λ·S(y⁻)) ] = E[ softplus(λ·S(y⁻) − S(y⁺)) ],

makes the lower-loss solutions raise the likelihood of the data; a BC term (the NLL of the chosen
responses, CPL-BC) is the other remedy. The authors' code sums α·log π undiscounted (γ = 1), pretrains
with `bc_steps` of pure BC, then trains CPL with α = 0.1, λ = 0.5 and no BC; here the shared SFT stage
is that pretraining, so `bc_steps` is 0 unless asked.

`cpl_kl` scores log π − log π_ref against the frozen SFT policy instead (the authors' CPL_KL: α = 0.2,
λ = 0.75). With λ = 1 and γ = 1 it is exactly DPO with β = α: DPO is CPL on a contextual bandit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from alignbench.methods.offline import Objective, OfflineConfig, OfflinePreferenceMethod, ResponseLogProbs
from alignbench.training import OptimConfig


def cpl_score(token_logps: torch.Tensor, response_mask: torch.Tensor, alpha: float, gamma: float = 1.0) -> torch.Tensor:
    """S = α Σ_t γ^t log π(y_t | x, y_<t) (eq. 5), t counted from each response's first token.

    token_logps: [R, T] per-token log-probs (as `sequence_logprobs` returns them; CPL-KL passes
    log π − log π_ref); response_mask: [R, T], True on response tokens. Returns [R].
    """
    mask = response_mask.bool()
    t = (mask.long().cumsum(-1) - 1).clamp_min(0)
    discount = torch.where(mask, gamma ** t.to(token_logps.dtype), torch.zeros_like(token_logps))
    return alpha * (discount * token_logps).sum(-1)


def cpl_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, bias: float) -> Objective:
    """CPL loss with the conservative bias λ on the rejected side (eqs. 5-6).

    chosen_scores, rejected_scores: [P] scores S(y⁺), S(y⁻) of P pairs. Returns the mean of
    softplus(λ·S⁻ − S⁺) and the scores themselves as the implicit rewards (unbiased: a pair is
    ranked right when S⁺ > S⁻, as the authors report accuracy).
    """
    loss = F.softplus(bias * rejected_scores - chosen_scores).mean()
    return Objective(loss, chosen_scores.detach(), rejected_scores.detach())


@dataclass
class CPLConfig(OfflineConfig):
    """CPL on the experiment's preference pairs."""

    alpha: float = 0.1
    """Temperature α of the score α Σ_t γ^t log π (the paper's and authors' CPL default)."""
    bias: float = 0.5
    """Conservative bias λ on the rejected score, in (0, 1]; 1 is the plain, unbiased loss."""
    gamma: float = 1.0
    """Discount γ over a response's tokens, in (0, 1]; the authors sum undiscounted (1)."""
    bc_weight: float = 0.0
    """Weight of the BC term (per-token NLL of the chosen responses) added to the CPL loss (CPL-BC: 1)."""
    bc_steps: int = 0
    """Steps of pure BC before the CPL loss is switched on (the SFT stage already plays that part)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_ratio=0.1))
    """Optimiser (the authors' lr, and the world's DPO setting)."""

    def __post_init__(self):
        super().__post_init__()
        if not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha} must be a positive number")
        for key in ("bias", "gamma"):
            if not 0 < getattr(self, key) <= 1:
                raise ValueError(f"{key}={getattr(self, key)} must be in (0, 1]")
        if not self.bc_weight >= 0:
            raise ValueError(f"bc_weight={self.bc_weight} must be >= 0 (0 turns the BC term off)")
        if self.bc_steps < 0:
            raise ValueError(f"bc_steps={self.bc_steps} must be >= 0 (0: CPL from the first step)")


class CPL(OfflinePreferenceMethod):
    """CPL: the contrastive loss on the policy's own scores α Σ_t γ^t log π, no reference."""

    name = "cpl"
    config_class = CPLConfig
    needs_reference = False
    needs_token_logprobs = True  # the score discounts token t by γ^t; the BC term is an NLL per token

    def scores(self, policy: ResponseLogProbs, reference: ResponseLogProbs | None) -> torch.Tensor:
        """[R] scores α Σ_t γ^t log π of the batch's responses (CPL-KL: of log π − log π_ref)."""
        return cpl_score(policy.per_token, policy.mask, self.config.alpha, self.config.gamma)

    def loss(self, policy, reference, batch):
        c = self.config
        cpl = cpl_loss(*batch.pairs(self.scores(policy, reference)), c.bias)
        # BC on the chosen side of every pair (the authors' bc_data="pos"): a response counts once per pair it wins.
        # index_select, as PreferenceBatch.pairs reads: a response's gradients added in pair order.
        bc = -policy.per_token.index_select(0, batch.chosen).sum() / policy.mask[batch.chosen].sum().clamp_min(1)
        loss = bc if self.global_step < c.bc_steps else cpl.loss + c.bc_weight * bc
        return Objective(loss, cpl.chosen_rewards, cpl.rejected_rewards, {"cpl_loss": cpl.loss.detach(), "bc_loss": bc.detach()})


@dataclass
class CPLKLConfig(CPLConfig):
    """CPL with the score taken relative to the frozen SFT policy (the authors' CPL_KL defaults)."""

    alpha: float = 0.2
    """Temperature α of the score α Σ_t γ^t log π/π_ref (the authors' cpl_kl configs: 0.2)."""
    bias: float = 0.75
    """Conservative bias λ on the rejected score, in (0, 1] (the authors' cpl_kl configs: 0.75)."""
    precompute_reference: bool = False
    """False: the reference is scored per token in each step (the discount γ^t needs its per-token
    log-probs; only sums are precomputed)."""


class CPLKL(CPL):
    """CPL-KL: the same loss on scores relative to the frozen SFT policy, α Σ_t γ^t log π/π_ref."""

    name = "cpl_kl"
    config_class = CPLKLConfig
    needs_reference = True

    def scores(self, policy, reference):
        # The score is linear in the log-probs, so α Σ γ^t (log π − log π_ref) is the difference of the two scores.
        return super().scores(policy, None) - cpl_score(reference.per_token, reference.mask, self.config.alpha, self.config.gamma)
