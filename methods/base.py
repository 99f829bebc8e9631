"""Base classes of the methods, chosen by data regime (not by method).

- `AlignmentMethod`: what every method has — a trainable copy of the SFT policy, the
  shared run context, a config, how it responds at evaluation, and its budget.
- `SampleAndTuneMethod`: rounds of sampling, selecting or relabeling, and fine-tuning.
- The offline bases (preference pairs, and unpaired desirable / undesirable responses) are
  in `methods/offline.py`; the online base (rollouts with a reward) in `methods/online.py`.

A method declares what it needs as class attributes (`needs_reference`, `feedback`);
the shared code reads them (`feedback` through `feedback_of`, the one place that says what a
method learns from under its config). Nothing outside the registry checks a method's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal, Sequence

import lightning as L
import numpy as np
import torch

from alignbench.data import DemonstrationDataModule, Rows
from alignbench.evaluation import EvalConfig, PolicyResponses, sample_policy
from alignbench.log import log
from alignbench.seeding import seeded_generator
from alignbench.sft import response_nll
from alignbench.training import OptimConfig, StepLoggingModule, adamw_with_schedule, check_finite

if TYPE_CHECKING:
    from alignbench.pipeline import RunContext


@dataclass
class MethodConfig:
    """Fields every trained method has."""

    epochs: int = 1
    """Passes over the method's training data."""
    batch_size: int = 8
    """Examples per step (for preference methods: prompts, each with all of its pairs)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser."""
    max_length: int = 48
    """Longest prompt + response in tokens."""
    kl_every: int = 25
    """Estimate KL(π‖π_ref) on fresh policy samples every this many steps (0: never)."""
    kl_prompts: int = 64
    """Training prompts sampled for each KL estimate."""
    max_kl: float | None = None
    """KL budget in nats: training stops once the estimated KL passes it (None: no budget)."""

    def __post_init__(self):
        for key in ("epochs", "batch_size", "max_length", "kl_prompts"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if self.kl_every < 0:
            raise ValueError(f"kl_every={self.kl_every} must be >= 0 (0 turns KL estimates off)")
        if self.max_kl is not None and self.max_kl <= 0:
            raise ValueError(f"max_kl={self.max_kl} must be a positive number of nats, or null for no budget")


class AlignmentMethod(StepLoggingModule):
    """A method: a trainable policy initialised from the shared SFT checkpoint."""

    name: ClassVar[str]
    config_class: ClassVar[type] = MethodConfig
    needs_reference: ClassVar[bool] = True
    """The frozen SFT policy is used in the objective."""
    family: ClassVar[str] = "other"
    """The kind of method (its base class's): figures that would crowd draw one panel per family."""
    feedback: ClassVar[Literal["none", "preferences", "reward", "gold"]] = "none"
    """What the method learns from: nothing, preference labels, the reward models (whose
    labels count in its budget), or the gold reward (oracle experiments)."""
    trains: ClassVar[bool] = True
    """False for baselines that are evaluated as they are."""

    @classmethod
    def feedback_of(cls, config) -> str:
        """What the method learns from with its config section `config`: `feedback`, unless a
        method's depends on its settings (an online method's reward source)."""
        return cls.feedback

    def __init__(self, config, context: "RunContext"):
        super().__init__()
        self.config, self.context = config, context
        self.policy = context.load_policy(trainable=self.trains)
        self.budget = context.budget
        if self.feedback_of(config) == "reward":
            self.budget.human_labels += context.reward_model_labels

    # --- what the pipeline calls -------------------------------------------------------
    def datamodule(self) -> L.LightningDataModule:
        raise NotImplementedError

    def train_policy(self, fit) -> None:
        """Train; `fit(datamodule, epochs)` runs one Lightning fit with the run's loggers.
        The default is one fit on `datamodule()`; methods with rounds call it per round."""
        fit(self.datamodule(), self.config.epochs)

    def asked(self, prompts: Sequence[str]) -> list[str]:
        """What the trained policy is asked for each instruction (HIR in score mode: with its positive
        phrase). Its KL is always against the reference's answers to the instruction itself."""
        return list(prompts)

    def respond(self, prompts: Sequence[str], generator: torch.Generator, desc: str | bool = False) -> PolicyResponses:
        """The policy's evaluation responses; the default samples the trained policy once."""
        ctx = self.context
        return sample_policy(self.policy, ctx.reference, ctx.codec, self.asked(prompts), ctx.eval_config, generator, desc=desc, reference_prompts=prompts)

    def on_fit_start(self) -> None:
        # The frozen reference follows the policy to the training device (GPU runs), where the
        # objective uses it; a method that does not keeps it where evaluation reads it.
        if self.needs_reference and self.context.reference is not None:
            self.context.reference.to(self.device)

    def reward_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """The proxy reward (Llama 2 combination of the reward models) of each response."""
        ctx = self.context
        return ctx.proxy.score(list(prompts), list(responses), [ctx.harmful_of(p) for p in prompts]).numpy()

    def validate(self) -> dict[str, float]:
        """`val/*` metrics of the current policy on the validation split."""
        ctx = self.context
        # The same random numbers at every evaluation (common random numbers): the samples of two
        # checkpoints differ only where the policies do, so the change between evaluations is
        # measured with far less noise than two independent 256-prompt samples would give.
        responses = self.respond(ctx.evaluator.prompts["val"], seeded_generator(ctx.seed, "val"))
        return ctx.evaluator.evaluate(responses, split="val", prefix="val")[0]

    def configure_optimizers(self):
        return adamw_with_schedule(self.policy.parameters(), self.config.optim, self.trainer.max_steps)

    def log_terms(self, metrics: dict[str, torch.Tensor], batch_size: int) -> None:
        """Log a training step's statistics as `train/<name>` (on the steps the loggers write)."""
        self.log_step({f"train/{key}": value for key, value in metrics.items()}, batch_size, prog_bar=("train/loss", "train/kl"))


@dataclass
class RoundsConfig(MethodConfig):
    """Fields of methods that iterate sample -> select or relabel -> fine-tune."""

    rounds: int = 2
    """Sample-and-tune rounds; each samples from the previous round's policy."""
    prompts_per_round: int = 2000
    """Training prompts sampled from each round."""
    samples_per_prompt: int = 1
    """Policy samples per prompt and round."""
    temperature: float = 1.0
    """Sampling temperature of the rounds."""
    init: Literal["continue", "sft"] = "continue"
    """Each round after the first fine-tunes the latest policy ("continue") or starts again from
    the SFT policy ("sft"; the samples still come from the latest policy)."""

    def __post_init__(self):
        super().__post_init__()
        for key in ("rounds", "prompts_per_round", "samples_per_prompt"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")


class SampleAndTuneMethod(AlignmentMethod):
    """Rounds of: sample from the current policy, turn the samples into supervised examples
    (`examples`: filter by reward, pick the best, relabel), fine-tune on them. Each round is
    evaluated on the validation split and logged with `round`."""

    config_class: ClassVar[type] = RoundsConfig
    family = "sample and tune"
    packs_examples: ClassVar[bool] = True
    """Whether the fine-tuning scores the examples packed several to a row (`DemonstrationBatch.scored`);
    a method whose loss reads the one-per-row layout (`batch.batch`) says False."""

    def examples(self, round_index: int, prompts: list[str], responses: list[list[str]]) -> list[dict]:
        """Supervised examples ({prompt, response, ...}) from each prompt's samples."""
        raise NotImplementedError

    def round_datamodule(self, examples: list[dict]) -> L.LightningDataModule:
        return DemonstrationDataModule(Rows.from_list(examples), self.context.codec, self.config.batch_size, self.config.max_length, seed=self.context.seed,
                                       pack=self.packs_examples)

    def round_temperature(self, round_index: int) -> float:
        return self.config.temperature

    def grow(self, round_index: int) -> tuple[list[str], list[list[str]]]:
        """Fresh training prompts and `samples_per_prompt` samples of each from the current policy."""
        c, ctx = self.config, self.context
        k = c.samples_per_prompt
        sampling = EvalConfig(temperature=self.round_temperature(round_index), max_new_tokens=ctx.eval_config.max_new_tokens, batch_size=ctx.eval_config.batch_size)
        prompts = ctx.sample_train_prompts(c.prompts_per_round, seed=1000 * ctx.seed + round_index)
        out = sample_policy(self.policy, None, ctx.codec, prompts, sampling, seeded_generator(ctx.seed, self.name, round_index), desc=f"round {round_index + 1} samples", num_samples=k)
        self.budget.policy_samples += len(out.texts)
        return prompts, [out.texts[i * k : (i + 1) * k] for i in range(len(prompts))]

    def train_policy(self, fit) -> None:
        for r in range(self.config.rounds):
            prompts, responses = self.grow(r)
            if self.config.init == "sft" and r > 0:
                self.restart_from_sft()
            self.tune(fit, r + 1, self.examples(r, prompts, responses))
            if fit.stopped_by_kl_budget:
                break

    def restart_from_sft(self) -> None:
        """Reset the policy's weights to the SFT policy's (the next fit starts a fresh optimiser)."""
        self.policy.load_state_dict(self.context.load_policy().state_dict())

    def tune(self, fit, round_number: int, examples: list[dict]) -> None:
        """Fine-tune on one round's examples, then evaluate and log the round."""
        if examples:
            fit(self.round_datamodule(examples), self.config.epochs)
        else:  # e.g. nothing a barely trained policy wrote can be relabeled: nothing to learn from
            log(f"round {round_number} of {self.name} kept no training examples; the policy is unchanged")
        fit.log({"round": round_number, "train/examples": len(examples), **self.validate()})

    def training_step(self, batch, batch_idx: int):
        loss, _ = response_nll(self.policy, batch.scored)
        check_finite(loss, self.global_step)
        self.budget.train_tokens += batch.num_tokens
        self.log_terms({"loss": loss.detach()}, batch_size=batch.size)
        return loss

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch.to(device)
