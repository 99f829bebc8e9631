"""Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290).

The policy is trained directly on preference pairs, with the frozen SFT policy as
reference and no reward model (eq. 7):

    L_DPO = −E[ log σ( β log π(y_w|x)/π_ref(y_w|x) − β log π(y_l|x)/π_ref(y_l|x) ) ]

β · log π/π_ref is the implicit reward; DPO fails on the world by going too far (KL
grows fast at high learning rates), so KL is estimated on fresh samples during training
and an optional KL budget (`max_kl`) stops it.

Noisy labels (Mitchell 2023, "A note on DPO with noisy preferences", conservative DPO): if a
label is flipped with probability ε, the loss is the cross-entropy with the smoothed target,

    L = −(1 − ε) log σ(h) − ε log σ(−h),     h = β log π/π_ref(y_w) − β log π/π_ref(y_l),

which stops pushing h up once σ(h) = 1 − ε. A soft label p = P(y_w ≻ y_l) (the AI labeler's,
Lee et al. 2023) is the same cross-entropy with target p; both together give the target
(1 − ε) p + ε (1 − p). With hard labels and ε = 0 this is eq. 7 exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from alignbench.training import OptimConfig
from alignbench.methods.offline import Objective, OfflineConfig, OfflinePreferenceMethod


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    labels: torch.Tensor | None = None,
) -> Objective:
    """DPO loss (eq. 7), with conservative label smoothing ε and soft labels.

    All log-prob inputs are summed response log-probs of shape [P] for P pairs; labels: [P]
    P(chosen ≻ rejected), None for hard labels (all 1). The target of pair i is
    t_i = (1 − ε) labels_i + ε (1 − labels_i), the loss the mean of −t_i log σ(h_i) − (1 − t_i) log σ(−h_i);
    with hard labels and ε = 0 only the first term is computed, so eq. 7 is unchanged to the bit.
    Returns the mean loss and the implicit rewards β log π/π_ref of the chosen and rejected responses.
    """
    chosen_reward = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected_reward = beta * (policy_rejected_logps - reference_rejected_logps)
    logits = chosen_reward - rejected_reward
    if labels is None and label_smoothing == 0.0:
        loss = -F.logsigmoid(logits).mean()
    else:
        p = torch.ones_like(logits) if labels is None else labels.to(logits.dtype)
        target = (1 - label_smoothing) * p + label_smoothing * (1 - p)
        loss = (-target * F.logsigmoid(logits) - (1 - target) * F.logsigmoid(-logits)).mean()
    return Objective(loss, chosen_reward.detach(), rejected_reward.detach())


@dataclass
class DPOConfig(OfflineConfig):
    """DPO on the experiment's preference pairs."""

    beta: float = 0.1
    """Strength of the implicit KL constraint (higher stays closer to the reference)."""
    label_smoothing: float = 0.0
    """ε, the assumed probability that a label is flipped (conservative DPO), in [0, 0.5); 0 is plain DPO."""
    soft_labels: bool = True
    """Train on each pair's label probability where the labels are soft (an AI labeler's); hard labels are 1."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_ratio=0.1))
    """Optimiser (at lr 3e-4 the world's DPO overshoots: KL 2.8, win rate 0.52)."""

    def __post_init__(self):
        super().__post_init__()
        if not self.beta > 0:
            raise ValueError(f"beta={self.beta} must be a positive number")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 0.5) (0: plain DPO)")


class DPO(OfflinePreferenceMethod):
    name = "dpo"
    config_class = DPOConfig

    def loss(self, policy, reference, batch):
        c = self.config
        labels = batch.label if c.soft_labels and batch.label is not None and bool((batch.label != 1).any()) else None
        return dpo_loss(*batch.pairs(policy.summed), *batch.pairs(reference.summed), c.beta, c.label_smoothing, labels)
