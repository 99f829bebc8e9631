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

from alignbench.data import PreferenceBatch
from alignbench.logprobs import sequence_logprobs
from alignbench.methods.base import MethodConfig, OfflinePreferenceMethod
from alignbench.training import OptimConfig, check_finite


def cpl_score(token_logps: torch.Tensor, response_mask: torch.Tensor, alpha: float, gamma: float = 1.0) -> torch.Tensor:
    """S = α Σ_t γ^t log π(y_t | x, y_<t) (eq. 5), t counted from each response's first token.

    token_logps: [R, T] per-token log-probs (as `sequence_logprobs` returns them; CPL-KL passes
    log π − log π_ref); response_mask: [R, T], True on response tokens. Returns [R].
    """
    mask = response_mask.bool()
    t = (mask.long().cumsum(-1) - 1).clamp_min(0)
    discount = torch.where(mask, gamma ** t.to(token_logps.dtype), torch.zeros_like(token_logps))
    return alpha * (discount * token_logps).sum(-1)


def cpl_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, bias: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CPL loss with the conservative bias λ on the rejected side (eqs. 5-6), and its statistics.

    chosen_scores, rejected_scores: [P] scores S(y⁺), S(y⁻) of P pairs. Returns the mean of
    softplus(λ·S⁻ − S⁺) and detached metrics: `chosen_score`, `rejected_score`, `score_margin`
    (S⁺ − S⁻, unbiased) and `accuracy` (share of pairs with S⁺ > S⁻, as the authors report it).
    """
    loss = F.softplus(bias * rejected_scores - chosen_scores).mean()
    margin = (chosen_scores - rejected_scores).detach()
    metrics = {
        "chosen_score": chosen_scores.detach().mean(),
        "rejected_score": rejected_scores.detach().mean(),
        "score_margin": margin.mean(),
        "accuracy": (margin > 0).float().mean(),
    }
    return loss, metrics


@dataclass
class CPLConfig(MethodConfig):
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
    uses_reference_logprobs = False

    def loss(self, policy_chosen, policy_rejected, reference_chosen, reference_rejected, batch):
        """CPL on the pairs' [P] scores: `training_step` hands `loss` α Σ_t γ^t log π, not plain sums."""
        return cpl_loss(policy_chosen, policy_rejected, self.config.bias)

    def training_step(self, batch: PreferenceBatch, batch_idx: int):
        # Not the base step, which sums each response's log-probs before `loss` sees them: the score
        # discounts token t by γ^t and the BC term is an NLL per token, so both need the per-token values.
        # (Hence no precomputed reference either: for CPL-KL it is scored here, under no_grad.)
        c = self.config
        mask = batch.responses.response_mask
        per_token, _ = sequence_logprobs(self.policy, batch.responses)  # [R, T], each distinct response once
        policy, reference = cpl_score(per_token, mask, c.alpha, c.gamma), None
        if self.uses_reference_logprobs:
            with torch.no_grad():
                reference = cpl_score(sequence_logprobs(self.context.reference, batch.responses)[0], mask, c.alpha, c.gamma)
        ref_chosen, ref_rejected = (None, None) if reference is None else (reference[batch.chosen], reference[batch.rejected])
        cpl, metrics = self.loss(policy[batch.chosen], policy[batch.rejected], ref_chosen, ref_rejected, batch)
        # BC on the chosen side of every pair (the authors' bc_data="pos"): a response counts once per pair it wins.
        bc = -per_token[batch.chosen].sum() / mask[batch.chosen].sum().clamp_min(1)
        loss = bc if self.global_step < c.bc_steps else cpl + c.bc_weight * bc
        check_finite(loss, self.global_step)
        self.budget.train_tokens += int(batch.responses.attention_mask.sum())
        self.log_terms({"loss": loss.detach(), "cpl_loss": cpl.detach(), "bc_loss": bc.detach(), **metrics}, batch_size=batch.num_groups)
        return loss


@dataclass
class CPLKLConfig(CPLConfig):
    """CPL with the score taken relative to the frozen SFT policy (the authors' CPL_KL defaults)."""

    alpha: float = 0.2
    """Temperature α of the score α Σ_t γ^t log π/π_ref (the authors' cpl_kl configs: 0.2)."""
    bias: float = 0.75
    """Conservative bias λ on the rejected score, in (0, 1] (the authors' cpl_kl configs: 0.75)."""


class CPLKL(CPL):
    """CPL-KL: the same loss on scores relative to the frozen SFT policy, α Σ_t γ^t log π/π_ref."""

    name = "cpl_kl"
    config_class = CPLKLConfig
    needs_reference = True
    uses_reference_logprobs = True

    def loss(self, policy_chosen, policy_rejected, reference_chosen, reference_rejected, batch):
        # The score is linear in the log-probs, so α Σ γ^t (log π − log π_ref) is the difference of the two scores.
        return super().loss(policy_chosen - reference_chosen, policy_rejected - reference_rejected, None, None, batch)
