"""Pieces every training loop shares: the optimiser and schedule, the Lightning trainer,
the non-finite loss guard and the budget counters."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import lightning as L
import torch


class NonFiniteLossError(RuntimeError):
    """Raised when a loss becomes NaN or infinite; the run stops and is not marked finished."""


def check_finite(loss: torch.Tensor, step: int, what: str = "loss") -> None:
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(
            f"{what} became {loss.detach().float().item()} at training step {step}; the run is stopped "
            "and not marked finished (lower the learning rate, or check the data)"
        )


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.05
    """Share of the steps spent warming the learning rate up linearly from zero."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 disables it)."""

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be a positive number")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("grad_clip and weight_decay must be >= 0")


def adamw_with_schedule(parameters, optim: OptimConfig, total_steps: int) -> dict[str, Any]:
    """AdamW plus warm-up and decay, in the form `configure_optimizers` returns."""
    optimizer = torch.optim.AdamW([p for p in parameters if p.requires_grad], lr=optim.lr, weight_decay=optim.weight_decay)
    warmup = int(optim.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if optim.schedule == "cosine":
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        if optim.schedule == "linear":
            return 1.0 - 0.9 * progress
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@dataclass
class TrainerConfig:
    """Lightning Trainer settings (how a run is executed, not what it computes)."""

    accelerator: str = "cpu"
    """'cpu', 'gpu', 'auto', ... Defaults to CPU so results do not depend on the machine."""
    devices: Any = 1
    """Number of devices (or a list of ids) per node."""
    num_nodes: int = 1
    """Machines for multi-node training."""
    strategy: str = "auto"
    """Lightning strategy: 'auto', 'ddp', 'ddp_spawn', 'fsdp', 'deepspeed', ..."""
    precision: str = "32-true"
    """Lightning precision. Keep fp32 on CPU: half precision there is ~70x slower. On GPU use 'bf16-mixed'."""
    log_every_n_steps: int = 10
    """How often training metrics are logged."""
    progress_bar: bool = True
    """Show progress bars."""
    threads: int = 0
    """torch CPU threads (0 leaves torch's default)."""

    def __post_init__(self):
        if self.precision not in {"32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true"}:
            raise ValueError(
                f"trainer.precision={self.precision!r} is not accepted; use one of 32-true, bf16-mixed, bf16-true, 16-mixed, 16-true"
            )
        if self.log_every_n_steps < 1:
            raise ValueError(f"trainer.log_every_n_steps={self.log_every_n_steps} must be >= 1")


def make_trainer(config: TrainerConfig, *, max_steps: int = -1, max_epochs: int | None = None, grad_clip: float = 0.0, loggers=None, callbacks=None, **extra) -> L.Trainer:
    if config.threads:
        torch.set_num_threads(config.threads)
    return L.Trainer(
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        precision=config.precision,
        max_steps=max_steps,
        max_epochs=max_epochs,
        logger=loggers if loggers else False,
        callbacks=callbacks or [],
        log_every_n_steps=config.log_every_n_steps,
        enable_progress_bar=config.progress_bar,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        gradient_clip_val=grad_clip or None,
        **extra,
    )


@dataclass
class Budget:
    """What a run spent: labels, samples, tokens and time (reported as `budget/*`).

    Counts include the shared stages a run uses (SFT demonstrations are not labels; the
    preference labels behind a reward model are), so that runs compare at equal budget.
    """

    human_labels: int = 0
    ai_labels: int = 0
    policy_samples: int = 0
    train_tokens: int = 0
    wall_s: float = 0.0
    _started: float = field(default_factory=time.perf_counter, repr=False)

    def metrics(self) -> dict[str, float]:
        values = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        values["wall_s"] = round(time.perf_counter() - self._started, 2)
        return {f"budget/{k}": v for k, v in values.items()}
