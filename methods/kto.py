"""KTO: Model Alignment as Prospect Theoretic Optimization (Ethayarajh et al. 2024, arXiv 2402.01306).

KTO learns from single responses labelled desirable or undesirable (a thumbs up or down), not from
pairs. It maximises a Kahneman-Tversky value of the implicit reward measured against a reference
point z₀, the policy's KL from the reference, so that a response only counts as a gain if it is
more likely under the policy than the policy's average drift (eq. 8):

    r(x, y) = log π(y|x) / π_ref(y|x)
    z₀      = max(0, KL(π(y'|x) ‖ π_ref(y'|x))), estimated on the batch, not differentiated
    v(x, y) = λ_D σ(β (r(x, y) − z₀))   if y is desirable
              λ_U σ(β (z₀ − r(x, y)))   if y is undesirable
    L_KTO   = E[ λ_y − v(x, y) ].

z₀ is estimated as the authors' code does: the mean log-ratio of the batch's mismatched pairs (each
example's prompt with the response of another example, which does not answer it), detached and
clamped at 0. As in TRL, each example's partner is fixed for the run, so the reference's log-probs
of the mismatched pairs are precomputed with the others' and each step scores only the policy.

On the world the labels are binary thumbs from the simulated annotators on the labels stage's
sampled responses (one label per response, counted in `budget/human_labels`); `examples: pairs`
takes them from the preference pairs instead (chosen → desirable, rejected → undesirable, the
paper's ablation). Defaults: β = 1 (the authors' 0.1 drifts far from the reference on the world:
see `beta`) and λ_D = λ_U = 1, the authors' (about half of the world's sampled responses are
desirable, so no reweighting is needed, sec. 4.2); batches of 32, HALOs'
default, so that each z₀ averages enough mismatched pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from alignbench.annotator import AnnotatorConfig, SimulatedAnnotator, thumbs_records
from alignbench.config import ConfigError, config_hash
from alignbench.data import unpaired_from_pairs
from alignbench.methods.offline import Objective, OfflineConfig, UnpairedPreferenceMethod
from alignbench.training import OptimConfig


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    policy_mismatched_logps: torch.Tensor,
    reference_mismatched_logps: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Objective:
    """KTO loss (eq. 8) on B labelled responses: the mean of λ_y − v(x, y).

    policy_logps, reference_logps: [B] summed log-probs of the responses; desirable: [B] bool;
    policy_mismatched_logps, reference_mismatched_logps: [M] summed log-probs of mismatched
    (prompt, response) pairs, whose mean log-ratio, detached and clamped at 0, is z₀. Returns the
    loss, the rewards β·r of the desirable and of the undesirable responses, and the term
    `reference_point` (z₀).
    """
    z0 = (policy_mismatched_logps - reference_mismatched_logps).detach().mean().clamp(min=0)
    logratios = policy_logps - reference_logps
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios)))
    loss = torch.where(desirable, desirable_losses, undesirable_losses).mean()
    rewards = beta * logratios.detach()
    return Objective(loss, rewards[desirable], rewards[~desirable], {"reference_point": z0})


@dataclass
class KTOConfig(OfflineConfig):
    """KTO on desirable / undesirable responses."""

    beta: float = 1.0
    """β: how sharply the value saturates (higher stays closer to the reference). The paper's 0.1
    lets the world's tiny policy push undesirable responses down without bound (quickstart labels,
    one seed: β 0.1 win rate 0.413 at KL 9.5; 0.5: 0.518 at KL 2.65; 1.0: 0.547 [0.528, 0.565] at KL 1.32)."""
    desirable_weight: float = 1.0
    """λ_D, the weight of the desirable responses' losses."""
    undesirable_weight: float = 1.0
    """λ_U, the weight of the undesirable responses' losses (the paper: keep λ_D n_D / λ_U n_U in [1, 4/3])."""
    examples: Literal["thumbs", "pairs"] = "thumbs"
    """'thumbs': the simulated annotators' thumbs up / down on each sampled response of the labels
    stage (the world only); 'pairs': the preference pairs' chosen (desirable) and rejected responses."""
    thumbs_threshold: float = 0.5
    """The gold utility at which an annotator is equally likely to give a thumbs up or down."""
    batch_size: int = 32
    """Labelled responses per step (z₀ is estimated on each batch)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_ratio=0.1))
    """Optimiser (the world's DPO setting)."""

    def __post_init__(self):
        super().__post_init__()
        if not self.beta > 0:
            raise ValueError(f"beta={self.beta} must be a positive number")
        for key in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}={getattr(self, key)} must be a positive number")
        if self.examples not in ("thumbs", "pairs"):
            raise ValueError(f"examples={self.examples!r} is not known; expected 'thumbs' or 'pairs'")
        if not 0 <= self.thumbs_threshold <= 1:
            raise ValueError(f"thumbs_threshold={self.thumbs_threshold} must be a gold utility in [0, 1]")


class KTO(UnpairedPreferenceMethod):
    """KTO: a prospect-theoretic value of the log-ratio against the batch's KL, on unpaired labels."""

    name = "kto"
    config_class = KTOConfig

    def unpaired_data(self) -> tuple[list[dict], int]:
        c, ctx = self.config, self.context
        if c.examples == "pairs":
            return unpaired_from_pairs(ctx.preferences), sum(len(row) for row in ctx.preferences["chosen"])
        if ctx.world is None:
            raise ConfigError("kto.examples='thumbs' needs the world's annotators (data.source=world); with a preference dataset set kto.examples=pairs")
        labels = ctx.config.labels
        # The annotators of the labels stage; oracle labels (labels.source=gold) are noise-free thumbs.
        annotator_config = labels.annotator if labels.source == "annotator" else AnnotatorConfig(temperature=1e-9, flip_rate=0.0)
        annotator = SimulatedAnnotator(ctx.world, annotator_config)
        # The labels stage's seed, not the method's: the thumbs are part of the shared data, like the pairs.
        rng = np.random.default_rng(int(config_hash(["thumbs", labels.seed], length=12), 16))
        responses = [(row["prompt"], row["responses"]) for row in ctx.preferences]
        records = thumbs_records(annotator, responses, rng, c.thumbs_threshold)
        return records, len(records)

    def loss(self, policy, reference, policy_mismatched, reference_mismatched, batch):
        c = self.config
        return kto_loss(policy.summed, reference.summed, batch.desirable, policy_mismatched, reference_mismatched,
                        c.beta, c.desirable_weight, c.undesirable_weight)
