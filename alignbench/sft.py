"""Supervised fine-tuning: next-token cross-entropy on the response, masked on the prompt.

Used for the shared SFT stage and by every method that fine-tunes on selected or
relabeled samples (rejection sampling, ReST, HIR, SL-CAI).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignbench.data import DemonstrationBatch
from alignbench.logprobs import PackedBatch, SharedPromptBatch, sequence_logprobs, shared_prompt_logprobs
from alignbench.training import OptimConfig, StepLoggingModule, adamw_with_schedule, check_finite


@dataclass
class SFTConfig:
    """The shared supervised fine-tuning stage."""

    n_demonstrations: int = 20000
    """Demonstrations written by the world's noisy demonstrator (with data.source=hf the SFT
    dataset's rows are used; data.sft.limit caps them)."""
    epochs: int = 2
    """Passes over the demonstrations (one epoch leaves the world's SFT policy undertrained)."""
    batch_size: int = 64
    """Demonstrations per step."""
    max_length: int = 48
    """Longest prompt + response in tokens (longer responses are truncated at the end)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_ratio=0.05))
    """Optimiser of the SFT stage."""
    seed: int | None = None
    """Seed of the SFT stage (data order, demonstrations). None: the run's seed, so each run seed
    trains its own SFT policy; pin it (0) to share one SFT policy between run seeds."""

    def __post_init__(self):
        for key in ("n_demonstrations", "epochs", "batch_size", "max_length"):
            if getattr(self, key) < 1:
                raise ValueError(f"sft.{key}={getattr(self, key)} must be >= 1")


def response_nll(policy, batch: PackedBatch | SharedPromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean negative log-likelihood per response token, and the number of those tokens; the batch
    one response per row, or packed (the same value up to float rounding)."""
    if isinstance(batch, SharedPromptBatch):
        summed, lengths, _ = shared_prompt_logprobs(policy, batch)
        n_tokens = lengths.sum()
        return -summed.sum() / n_tokens.clamp(min=1), n_tokens
    per_token, _ = sequence_logprobs(policy, batch)
    n_tokens = batch.response_mask.sum()
    return -per_token.sum() / n_tokens.clamp(min=1), n_tokens


class SupervisedFineTuning(StepLoggingModule):
    """Fine-tunes a causal LM on demonstrations (cross-entropy on response tokens)."""

    def __init__(self, policy, optim: OptimConfig, total_steps: int):
        super().__init__()
        self.policy, self.optim, self.total_steps = policy, optim, total_steps
        self.tokens_trained = 0

    def training_step(self, batch: DemonstrationBatch, batch_idx: int):
        loss, n_tokens = response_nll(self.policy, batch.scored)
        check_finite(loss, self.global_step)
        self.tokens_trained += batch.num_tokens
        self.log_step({"train/loss": loss.detach()}, batch.size, prog_bar=("train/loss",))
        return loss

    def configure_optimizers(self):
        return adamw_with_schedule(self.policy.parameters(), self.optim, self.total_steps)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch.to(device)
