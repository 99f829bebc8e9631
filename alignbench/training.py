"""Pieces every training loop shares: the optimiser and schedule, the Lightning trainer,
the non-finite loss guard and the budget counters."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import lightning as L
import torch

from alignbench.stage_cache import StageReads


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
    fused: bool = True
    """AdamW's fused kernel: one kernel updates every parameter (on the CPU torch otherwise loops over
    them one at a time: 2.9 ms against 0.8 ms a step for world-small). The same update up to float
    rounding (the order of the operations differs), as a change of thread count gives; false for a
    device without the fused kernel."""

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be a positive number")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        for key in ("grad_clip", "weight_decay"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 0 (0 turns it off)")


def adamw_with_schedule(parameters, optim: OptimConfig, total_steps: int) -> dict[str, Any]:
    """AdamW plus warm-up and decay, in the form `configure_optimizers` returns."""
    optimizer = torch.optim.AdamW([p for p in parameters if p.requires_grad], lr=optim.lr, weight_decay=optim.weight_decay, fused=optim.fused)
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


class StepLoggingModule(L.LightningModule):
    """A LightningModule whose training steps hand their statistics to Lightning (`self.log`) only
    on the steps the loggers write: every `trainer.log_every_n_steps`, and the step at which a
    callback stops training (a KL budget). `self.log` costs ~0.75 ms a call on the CPU (Lightning
    moves its stored metric to the value's device each time), ~15% of a DPO step at five statistics;
    the rows written are the same. `trainer.callback_metrics` and the progress bar therefore hold the
    last logged step's values, not the last step's."""

    _step_statistics: tuple[dict[str, torch.Tensor], int, tuple[str, ...]] | None = None

    def log_step(self, metrics: dict[str, torch.Tensor], batch_size: int, prog_bar: tuple[str, ...] = ()) -> None:
        """Log `metrics` (name -> scalar) of this training step, `prog_bar` among them on the progress bar."""
        self._step_statistics = (metrics, batch_size, prog_bar)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Runs after the callbacks' on_train_batch_end (which may stop training) and before Lightning
        # decides, with the same test, whether this step's logged values go to the loggers.
        statistics, self._step_statistics = self._step_statistics, None
        if statistics is None or not self.trainer._logger_connector.should_update_logs:
            return
        metrics, batch_size, prog_bar = statistics
        for key, value in metrics.items():
            self.log(key, value, prog_bar=key in prog_bar, batch_size=batch_size)


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
    checkpoint_every: int = 10
    """Save a resume checkpoint every this many training steps (0: only at the end of each fit).
    A run killed part-way resumes from its last checkpoint when the same command runs again."""

    def __post_init__(self):
        if self.precision not in {"32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true"}:
            raise ValueError(
                f"trainer.precision={self.precision!r} is not accepted; use one of 32-true, bf16-mixed, bf16-true, 16-mixed, 16-true"
            )
        if self.log_every_n_steps < 1:
            raise ValueError(f"trainer.log_every_n_steps={self.log_every_n_steps} must be >= 1")
        if self.accelerator == "cpu" and self.precision not in {"32-true", "32", "64-true"}:
            raise ValueError(f"trainer.precision={self.precision!r} on accelerator='cpu' is many times slower than fp32; use 32-true on CPU")
        if self.checkpoint_every < 0:
            raise ValueError(f"trainer.checkpoint_every={self.checkpoint_every} must be >= 0 (0: only at the end of each fit)")
        if self.num_nodes < 1:
            raise ValueError(f"trainer.num_nodes={self.num_nodes} must be >= 1")
        if self.threads < 0:
            raise ValueError(f"trainer.threads={self.threads} must be >= 0 (0 leaves torch's default)")
        if not _devices_accepted(self.devices):
            raise ValueError(f"trainer.devices={self.devices!r} must be a number of devices >= 1, -1 (every device), 'auto' or a list of device ids "
                             "(e.g. [0, 1] or '0,1')")
        from lightning.pytorch.accelerators import AcceleratorRegistry
        from lightning.pytorch.strategies import StrategyRegistry

        # Checked as the config loads: Lightning itself refuses them only when a run's trainer is
        # made, after the shared stages were built, with a traceback.
        accelerators = sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()})
        if self.accelerator not in accelerators:
            raise ValueError(f"trainer.accelerator={self.accelerator!r} is not known; use one of {', '.join(accelerators)}")
        strategies = ["auto", *StrategyRegistry.available_strategies()]
        if self.strategy not in strategies:
            raise ValueError(f"trainer.strategy={self.strategy!r} is not known; use 'auto' or a Lightning strategy such as ddp, ddp_spawn, fsdp, deepspeed "
                             f"(all: {', '.join(strategies)})")

    @property
    def distributed(self) -> bool:
        """More than one training process (DDP, FSDP, ... over several devices or nodes)."""
        one_device = self.devices in (1, "1") or (isinstance(self.devices, (list, tuple)) and len(self.devices) == 1)
        return self.num_nodes > 1 or not one_device  # "auto" may mean every GPU

    def single_process(self) -> TrainerConfig:
        """The same settings on one device: for the shared stages, which every rank of a
        distributed run loads from the cache rather than trains together."""
        return replace(self, devices=1, num_nodes=1, strategy="auto")


def _devices_accepted(devices: Any) -> bool:
    """Lightning's forms of `devices`: a count >= 1, -1 for every device, 'auto', or device ids
    (a non-empty list of ids >= 0, or a string of them: '0,1')."""
    if isinstance(devices, bool):
        return False
    if isinstance(devices, int):
        return devices >= 1 or devices == -1
    if isinstance(devices, str):
        return devices == "auto" or re.fullmatch(r"-1|\d+|\d+(,\s*\d+)*,?", devices.strip()) is not None and devices.strip() not in ("0", "")
    if isinstance(devices, (list, tuple)):
        return len(devices) > 0 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
    return False


def steps_per_epoch(loader, world_size: int = 1) -> int:
    """Batches one rank sees in an epoch: across several ranks Lightning shards the data
    with a DistributedSampler (padded to a multiple of the ranks), each rank batching its share."""
    if world_size == 1:
        return len(loader)
    per_rank = math.ceil(len(loader.dataset) / world_size)
    return per_rank // loader.batch_size if loader.drop_last else math.ceil(per_rank / loader.batch_size)


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


def trainer_fit(trainer: L.Trainer, module: L.LightningModule, **kwargs) -> None:
    """`trainer.fit(module, **kwargs)`, with Ctrl-C raised as KeyboardInterrupt. Lightning catches
    it, tears the fit down, ignores SIGINT from then on and exits the process with status 1, which
    skipped what the caller does on an interrupt: the CLI's message and exit status 130, Optuna
    marking the trial failed, the W&B run's finish."""
    import signal
    import threading

    handler = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(module, **kwargs)
    except SystemExit:
        if not trainer.interrupted:
            raise
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)
        raise KeyboardInterrupt from None


@dataclass
class Budget:
    """What a run spent: labels, samples, tokens and time (reported as `budget/*`).

    Counts include the shared stages a run uses (SFT demonstrations are not labels; the
    preference labels behind a reward model are), so that runs compare at equal budget.

    `wall_s` is the run's own wall time plus the build seconds of every stage its method needs
    beyond the run context's (`excluded`: the SFT policy, labels, reward models and reference
    samples every run starts from), e.g. best-of-n's candidates, the AI labeler and its labels,
    the helpful-only policy: counted whether this run built them, waited for another process to
    build them or found them built, so a run's time does not depend on which runs went before it.
    """

    human_labels: int = 0
    ai_labels: int = 0
    policy_samples: int = 0
    train_tokens: int = 0
    excluded: frozenset[str] = field(default_factory=frozenset, repr=False)
    """Stage folders (`<stage>-<hash>`) whose seconds are not counted: those of the run context."""
    _started: float = field(default_factory=time.perf_counter, repr=False)
    _reads_from: int = field(default_factory=StageReads.mark, repr=False)
    _carried_stages: dict[str, float] = field(default_factory=dict, repr=False)  # from a checkpoint

    COUNTS = ("human_labels", "ai_labels", "policy_samples", "train_tokens")

    def stages(self) -> dict[str, float]:
        """The stages counted in `wall_s`, each with its own build seconds."""
        read = StageReads.since(self._reads_from).stages
        return {k: v for k, v in sorted({**self._carried_stages, **read}.items()) if k not in self.excluded}

    def _run_seconds(self) -> float:
        """The run's own wall time: the time spent getting stages left out."""
        return time.perf_counter() - self._started - StageReads.since(self._reads_from).seconds

    def metrics(self) -> dict[str, float]:
        values = {k: getattr(self, k) for k in self.COUNTS}
        values["wall_s"] = round(self._run_seconds() + sum(self.stages().values()), 2)
        return {f"budget/{k}": v for k, v in values.items()}

    def state_dict(self) -> dict[str, Any]:
        """The counts, the run's own seconds and the stages counted so far (a resumed run keeps
        counting from them)."""
        return {**{k: getattr(self, k) for k in self.COUNTS}, "run_s": self._run_seconds(), "stages": self.stages()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self.COUNTS:
            setattr(self, k, int(state[k]))
        # (A checkpoint written before stages were counted holds `wall_s`, the run's time then.)
        self._started = time.perf_counter() - float(state.get("run_s", state.get("wall_s", 0.0)))
        self._reads_from = StageReads.mark()
        self._carried_stages = {k: float(v) for k, v in state.get("stages", {}).items()}


def rng_state() -> dict[str, Any]:
    """Every global random state a training step may draw from (torch, CUDA, numpy, random),
    in types that `torch.load(weights_only=True)` reads back."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumableLoader:
    """A shuffling DataLoader that a run resumed mid-epoch continues where it stopped.

    Lightning saves the `state_dict()` of any train loader that has one in its checkpoints
    and hands it back through `load_state_dict` before iterating again. The state is the
    loader's generator at the start of the epoch and the batches already trained on
    (`trained_batches`, set after each step: Lightning fetches a batch ahead, so the loader
    cannot count them itself); resuming replays the epoch's order and skips those batches.
    """

    def __init__(self, loader):
        self.loader = loader
        self.trained_batches = 0
        self._epoch_start: torch.Tensor | None = None
        self._resume: dict | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        generator = getattr(self.loader, "generator", None)
        skip = 0
        if self._resume is not None:
            if generator is not None and self._resume["generator"] is not None:
                generator.set_state(self._resume["generator"])
            skip, self._resume = self._resume["batches"], None
        self._epoch_start = generator.get_state() if generator is not None else None
        self.trained_batches = skip
        for index, batch in enumerate(self.loader):
            if index >= skip:
                yield batch

    def state_dict(self) -> dict:
        return {"generator": self._epoch_start, "batches": self.trained_batches}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state
