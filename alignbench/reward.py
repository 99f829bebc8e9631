"""Reward models: the ranking loss, training, calibration and the Llama 2 combination.

InstructGPT (Ouyang et al. 2022, eq. 1) trains r_θ on all K-choose-2 comparisons of a
prompt as one batch element:

    loss(θ) = −1/C(K,2) · E_(x, y_w, y_l) [ log σ(r_θ(x, y_w) − r_θ(x, y_l)) ]

Llama 2 (Touvron et al. 2023, eq. 2) subtracts a margin m(r) that grows with how much
better the annotator said the chosen response was:

    L = −log σ(r_θ(x, y_c) − r_θ(x, y_r) − m(r))

Llama 2 trains a helpfulness RM and a safety RM and combines them (section 3.2.2):
R_c = R_s if the prompt is a safety prompt or R_s < 0.15, else R_h.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from alignbench.data import PreferenceBatch, batches_by_width
from alignbench.logprobs import pack_sequences, pack_shared_prompts, scoring_batch_rows
from alignbench.models import RewardModel, TextCodec
from alignbench.training import OptimConfig, StepLoggingModule, adamw_with_schedule, check_finite

SAFETY_THRESHOLD = 0.15  # Llama 2, section 3.2.2


@dataclass
class RewardModelConfig:
    """Training of the reward models (helpfulness and safety)."""

    epochs: int = 3
    """Passes over the labelled comparisons."""
    batch_size: int = 32
    """Prompts per step (each with all of its comparisons)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_ratio=0.05))
    """Optimiser of the reward models (on the world, 1e-3 beats 3e-4 and 3e-3 in held-out accuracy)."""
    margin: bool = True
    """Use Llama 2's margin term m(r) from the annotators' margin levels."""
    safety: bool = True
    """Train a safety RM beside the helpfulness RM and combine them as Llama 2 does."""
    holdout_fraction: float = 0.1
    """Share of labelled prompts held out to measure accuracy against gold."""
    max_length: int = 48
    """Longest prompt + response in tokens."""
    likelihood: Literal["mean", "sum", "none"] = "mean"
    """Add w · log p(response | prompt) under the reward model's own language-model head to its
    score, w learned ('mean' over the response's tokens, as SimPO, or 'sum'); 'none' is InstructGPT's
    head alone. On the world it lifts held-out accuracy from 0.68 to 0.77 (RewardModel explains why)."""
    architecture: Literal["backbone_head", "sequence_classification"] = "backbone_head"
    """'backbone_head': the SFT policy's backbone with a fresh scalar head; 'sequence_classification':
    the SFT policy loaded as a Hugging Face AutoModelForSequenceClassification with one label
    (saved as one, so transformers loads the trained reward model as it is)."""

    def __post_init__(self):
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"reward_model.{key}={getattr(self, key)} must be >= 1")
        if self.architecture == "sequence_classification" and self.likelihood != "none":
            raise ValueError(
                f"reward_model.likelihood={self.likelihood} needs a language-model head, which reward_model.architecture=sequence_classification "
                "does not have: set reward_model.likelihood=none with it"
            )
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"reward_model.holdout_fraction={self.holdout_fraction} must be in (0, 1)")


def ranking_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    group: torch.Tensor,
    num_groups: int,
    margin: torch.Tensor | None = None,
    label: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """InstructGPT's ranking loss with Llama 2's optional margin, and optional soft labels.

    chosen_rewards, rejected_rewards, margin, label, group: [P] for P pairs; `group` [P] in
    0..num_groups-1 says which prompt a pair belongs to. Each prompt's pairs are averaged
    first (the 1/C(K,2) factor), then prompts are averaged. `label` y is the probability that
    the chosen response is better: the loss is the cross-entropy −[y log σ(z) + (1 − y) log σ(−z)]
    with z = r_c − r_r − m, which is −log σ(z) for hard labels (y = 1) and trains on a judge's
    soft labels for RLAIF (Lee et al. 2023).
    """
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - margin
    per_pair = -F.logsigmoid(logits)
    if label is not None:
        per_pair = label * per_pair + (1 - label) * -F.logsigmoid(-logits)
    counts = torch.zeros(num_groups, device=per_pair.device).index_add_(0, group, torch.ones_like(per_pair))
    per_group = torch.zeros(num_groups, device=per_pair.device).index_add_(0, group, per_pair) / counts.clamp(min=1)
    loss = per_group[counts > 0].mean()
    accuracy = (chosen_rewards > rejected_rewards).float().mean()
    return loss, {"accuracy": accuracy.detach(), "margin": (chosen_rewards - rejected_rewards).mean().detach()}


class RewardModelTraining(StepLoggingModule):
    def __init__(self, model: RewardModel, config: RewardModelConfig, total_steps: int):
        super().__init__()
        self.model, self.config, self.total_steps = model, config, total_steps
        model.train()  # the backbone comes from `from_pretrained`, which returns eval mode

    def training_step(self, batch: PreferenceBatch, batch_idx: int):
        if batch.shared is not None:  # the prompt once for all of its responses, prompts packed
            rewards = self.model.score_shared(batch.shared)
        else:  # one row per distinct response
            responses = batch.responses
            rewards = self.model(responses.input_ids, responses.attention_mask, responses.response_mask)
        loss, metrics = ranking_loss(
            *batch.pairs(rewards), batch.group, batch.num_groups, batch.margin if self.config.margin else None, batch.label
        )
        check_finite(loss, self.global_step)
        statistics = {"train/loss": loss.detach(), "train/accuracy": metrics["accuracy"]}
        if self.model.likelihood != "none":
            statistics["train/likelihood_weight"] = self.model.likelihood_weight.detach()
        self.log_step(statistics, batch.num_groups, prog_bar=("train/loss", "train/accuracy"))
        return loss

    def configure_optimizers(self):
        return adamw_with_schedule(self.model.parameters(), self.config.optim, self.total_steps)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch.to(device)


MAX_CHARS_PER_TOKEN = 64


@torch.no_grad()
def score_texts(model: RewardModel, codec: TextCodec, prompts: Sequence[str], responses: Sequence[str], *, max_length: int, batch_size: int | None = None) -> torch.Tensor:
    """Raw reward-model scores [N] of responses to prompts, each prompt + response cut to
    `max_length` tokens (the end of the response goes, as in training: reward_model.max_length), so
    that no text, however long a dataset's response, asks for unbounded memory.

    Each distinct (prompt, response) is scored once (a tiny policy repeats itself: 29% of the world
    SFT policy's best-of-16 candidates repeat another), in batches of similar length: less padding
    took best-of-16 on the quickstart from 49 s to 34 s. Where prompts have two responses or more on
    average (best-of-n candidates, rejection sampling's samples), each prompt goes through the model
    once, followed by its responses (`RewardModel.score_shared`): the same scores up to float rounding.
    `batch_size` rows of `max_length` tokens a batch (shared rows: as many tokens; default:
    `scoring_batch_rows`).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch_size = scoring_batch_rows(device, batch_size)
    distinct: dict[tuple[str, str], int] = {}
    where = torch.tensor([distinct.setdefault(pair, len(distinct)) for pair in zip(prompts, responses)], dtype=torch.long)
    prompt_ids = codec.encode_prompts([p for p, _ in distinct])
    # A token covers at least one character, and no tokenizer's tokens average anywhere near
    # MAX_CHARS_PER_TOKEN; cutting the text there first keeps a 20 MB response from being tokenised
    # whole, and leaves the first max_length tokens as they are.
    response_ids = codec.encode_responses([y[: max_length * MAX_CHARS_PER_TOKEN] for _, y in distinct])
    scores = torch.zeros(len(distinct))
    by_prompt: dict[str, list[int]] = {}
    for index, (prompt, _) in enumerate(distinct):
        by_prompt.setdefault(prompt, []).append(index)
    if len(distinct) >= 2 * len(by_prompt):
        groups = list(by_prompt.values())
        widths = [len(prompt_ids[g[0]]) + sum(min(len(response_ids[i]), max(0, max_length - len(prompt_ids[g[0]]))) for i in g) for g in groups]
        for batch in batches_by_width([(1, w) for w in widths], batch_size, batch_size * max_length):
            members = [groups[b] for b in batch]
            shared = pack_shared_prompts([prompt_ids[g[0]] for g in members], [[response_ids[i] for i in g] for g in members], codec.pad_token_id, max_length=max_length)
            scores[[i for g in members for i in g]] = model.score_shared(shared).float().cpu()  # it moves the batch to the model
    else:
        by_length = sorted(range(len(distinct)), key=lambda i: len(prompt_ids[i]) + len(response_ids[i]))
        for start in range(0, len(by_length), batch_size):
            rows = by_length[start : start + batch_size]
            packed = pack_sequences([prompt_ids[i] for i in rows], [response_ids[i] for i in rows], codec.pad_token_id, max_length=max_length).to(device)
            scores[rows] = model(packed.input_ids, packed.attention_mask, packed.response_mask).float().cpu()
    model.train(was_training)
    return scores[where]


def fit_calibration(raw_scores: torch.Tensor, labels: torch.Tensor, steps: int = 100, slope_penalty: float = 1e-4) -> tuple[float, float]:
    """Platt scaling: (a, b) maximising the likelihood of binary labels under σ(a·s + b).

    A Bradley–Terry reward model is only defined up to a shift, but Llama 2 thresholds
    the safety score (R_s < 0.15). Calibrating on the annotators' per-response safe /
    unsafe labels gives the score that meaning: σ(a·s + b) ≈ P(safe).

    Newton's method on standardised scores, halving each step until the likelihood improves:
    plain Newton from (1, 0) on raw scores spanning ±15 diverged (a = 4e5 to 6e7, a step
    function; at 12,000 labelled prompts its threshold called every response unsafe). A small
    penalty on the slope (`slope_penalty` per label) keeps perfectly separable labels finite.
    """
    x, y = raw_scores.double(), labels.double()
    centre, spread = x.mean(), x.std().clamp(min=1e-12) if len(x) > 1 else torch.tensor(1.0, dtype=torch.float64)
    z = (x - centre) / spread
    penalty = slope_penalty * len(y)

    def objective(params: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(params[0] * z + params[1], y, reduction="sum") + 0.5 * penalty * params[0] ** 2

    params = torch.zeros(2, dtype=torch.float64)
    value = objective(params)
    for _ in range(steps):
        p = torch.sigmoid(params[0] * z + params[1])
        grad = torch.stack([((p - y) * z).sum() + penalty * params[0], (p - y).sum()])
        w = (p * (1 - p)).clamp(min=1e-12)
        hess = torch.stack([torch.stack([(w * z * z).sum() + penalty, (w * z).sum()]), torch.stack([(w * z).sum(), w.sum()])])
        direction = torch.linalg.solve(hess + 1e-9 * torch.eye(2, dtype=torch.float64), grad)
        size = 1.0
        while size > 1e-10:
            candidate = params - size * direction
            candidate_value = objective(candidate)
            if candidate_value <= value:
                break
            size /= 2
        else:
            break  # no step improves: at the optimum
        converged = float((candidate - params).abs().max()) < 1e-10
        params, value = candidate, candidate_value
        if converged:
            break
    scale = params[0] / spread
    return float(scale), float(params[1] - scale * centre)


class ProxyReward:
    """The proxy reward a method optimises: the helpfulness RM, or Llama 2's combination
    of the helpfulness and safety RMs. Scores are probabilities in (0, 1)."""

    def __init__(self, codec: TextCodec, helpfulness: RewardModel, safety: RewardModel | None = None, *, max_length: int):
        self.codec, self.helpfulness, self.safety = codec, helpfulness, safety
        self.max_length = max_length
        """Longest prompt + response read (reward_model.max_length, what the models were trained on)."""

    def to(self, device) -> "ProxyReward":
        self.helpfulness.to(device)
        if self.safety is not None:
            self.safety.to(device)
        return self

    def score(self, prompts: Sequence[str], responses: Sequence[str], harmful: Sequence[bool] | None = None) -> torch.Tensor:
        """R_c per response [N]; `harmful` marks safety prompts (unknown -> threshold only)."""
        help_prob = self.helpfulness.probability(score_texts(self.helpfulness, self.codec, prompts, responses, max_length=self.max_length))
        if self.safety is None:
            return help_prob
        safe_prob = self.safety.probability(score_texts(self.safety, self.codec, prompts, responses, max_length=self.max_length))
        flagged = torch.zeros_like(safe_prob, dtype=torch.bool) if harmful is None else torch.tensor(list(harmful), dtype=torch.bool)
        return torch.where(flagged | (safe_prob < SAFETY_THRESHOLD), safe_prob, help_prob)
