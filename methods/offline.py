"""The offline bases: learning from a fixed set of labelled responses, with no sampling in the loop.

- `OfflinePreferenceMethod`: preference pairs (DPO, IPO, SLiC, SimPO, ORPO, CPL).
- `UnpairedPreferenceMethod`: single responses labelled desirable or undesirable (KTO).

The base does the batching, one forward of the policy over each distinct response of a batch, the
reference's log-probs (precomputed once or scored per step), the budget and the logging; a method
writes only `loss()`. Each objective returns its own implicit reward for the chosen (desirable) and
rejected (undesirable) responses, and the base logs the same statistics of it for every objective,
as HALOs does: `train/rewards_chosen`, `train/rewards_rejected`, `train/margin`, `train/accuracy`.

What an objective is given is declared, not asked for by name: `needs_reference = False` trains
without the reference's log-probs (SimPO, ORPO, SLiC, CPL; the evaluation's KL still uses the SFT
reference), `needs_token_logprobs = True` adds the per-token log-probs and the response mask (CPL's
discounted score and per-token BC term).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from alignbench.config import ConfigError
from alignbench.data import PreferenceBatch, PreferenceDataModule, UnpairedBatch, UnpairedDataModule
from alignbench.logprobs import PackedBatch, SharedPromptBatch, evaluation_mode, sequence_logprobs, shared_prompt_logprobs
from alignbench.methods.base import AlignmentMethod, MethodConfig
from alignbench.models import disable_dropout
from alignbench.training import check_finite


@dataclass
class OfflineConfig(MethodConfig):
    """Fields of every method trained on a fixed set of labelled responses."""

    precompute_reference: bool = True
    """Score every training response under the frozen reference once, before training, instead of in
    every step (same values, one forward less per step). Objectives without a reference never score it."""
    share_prompts: bool = True
    """Score a prompt's responses in one row, the prompt once (`SharedPromptBatch`), instead of one row
    per response: the same log-probs up to float rounding (~1e-7 relative), fewer tokens through the
    model (on rankings of 4, about half). Unpaired data (KTO) is scored one row per response
    whatever this says."""
    disable_dropout: bool = True
    """Train the policy with its dropout off (LoRA adapters' included), as the DPO authors' code and
    TRL do: the reference is scored without dropout, so with it the log-ratios start away from 0 and
    the objective fits dropout noise. The world's models have none; hub models (GPT-2: 0.1) do."""


@dataclass
class ResponseLogProbs:
    """One model's log-probs of a batch's N responses, all from one forward.

    summed: [N] Σ_t log π(y_t | x, y_<t); lengths: [N] response tokens (after truncation to
    `max_length`); per_token, mask: [N, T] per-token log-probs (0 off the response) and the response
    mask, present only for a method that declares `needs_token_logprobs`.
    """

    summed: torch.Tensor
    lengths: torch.Tensor
    per_token: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @property
    def mean(self) -> torch.Tensor:
        """[N] length-normalised log-probs (1/|y|) Σ_t log π(y_t | …) (0 for an empty response)."""
        return self.summed / self.lengths.clamp_min(1)


REFERENCE_LOGITS = 2**27
"""Most logits (tokens x vocabulary, float32: 512 MB) in one batch of the reference's precomputation."""


class Objective(NamedTuple):
    """What an objective returns: the mean loss, its implicit rewards and its own further terms.

    chosen_rewards, rejected_rewards: detached [P] rewards of the chosen and rejected responses of P
    pairs (for unpaired data: of the desirable and of the undesirable responses, any two sizes);
    terms: scalar tensors logged as `train/<name>` beside the base's statistics.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    terms: dict[str, torch.Tensor] = {}


def paired_reward_statistics(objective: Objective) -> dict[str, torch.Tensor]:
    """Means of the pairs' implicit rewards, of their margin, and the share of pairs ranked right
    (also what online DPO logs for the pairs it samples)."""
    margin = objective.chosen_rewards - objective.rejected_rewards
    return {
        "rewards_chosen": objective.chosen_rewards.mean(), "rewards_rejected": objective.rejected_rewards.mean(),
        "margin": margin.mean(), "accuracy": (margin > 0).float().mean(),
    }


class OfflineMethod(AlignmentMethod):
    """What both offline bases share: scoring a batch's responses under the policy and the reference."""

    config_class: ClassVar[type] = OfflineConfig
    family = "offline preferences"
    feedback = "preferences"
    needs_token_logprobs: ClassVar[bool] = False
    """The objective reads per-token log-probs and the response mask, not only their sums."""
    reference_scored: ClassVar[tuple[str, ...]] = ("responses",)
    """The batch's PackedBatch fields whose reference log-probs are precomputed, one value per record."""

    def __init__(self, config, context):
        super().__init__(config, context)
        if config.disable_dropout:
            disable_dropout(self.policy)
        self._reference_cache: dict[str, torch.Tensor] = {}
        """Field of `reference_scored` -> [num_responses] summed reference log-probs, when precomputed (`on_data`)."""

    def on_data(self, data) -> None:
        """Count the data's labels and precompute the reference on its responses if the config asks."""
        self.budget.human_labels += data.num_labels
        if self.needs_reference and self.config.precompute_reference:
            if self.needs_token_logprobs:
                raise ConfigError(
                    f"{self.name}.precompute_reference=True: {self.name} scores the reference per token, and only "
                    "sums are precomputed; set it to false"
                )
            self._reference_cache = self._precompute_reference(data)

    def _precompute_reference(self, data) -> dict[str, torch.Tensor]:
        """For each field of `reference_scored`, [num_responses] summed reference log-probs of every
        distinct response, in dataset order: scored 64 prompts a batch (as always on the world), fewer
        where their logits would pass REFERENCE_LOGITS (a 152k vocabulary at 512 tokens once asked for
        tens of GB), in batches of similar length."""
        out = {name: torch.empty(data.num_responses) for name in self.reference_scored}
        max_tokens = max(1, REFERENCE_LOGITS // len(self.context.codec.tokenizer))
        # Rows of similar length together (each value goes to its own index): less padding to score.
        with evaluation_mode(self.context.reference), torch.inference_mode():
            for batch in data.ordered_dataloader(batch_size=64, max_tokens=max_tokens, by_width=True):
                for name, values in out.items():
                    # in the layout the policy is scored in during training (unpaired batches have no shared rows)
                    shared = getattr(batch, "shared", None) if name == "responses" else None
                    values[batch.response_index] = self.logprobs(self.context.reference, getattr(batch, name), shared)[1].cpu()
        return out

    def precomputed_reference(self, name: str, response_index: torch.Tensor, device) -> torch.Tensor | None:
        """The precomputed summed reference log-probs of field `name` of a batch's records, or None."""
        cache = self._reference_cache.get(name)
        return None if cache is None else cache.to(device)[response_index]

    def score(self, responses: PackedBatch, response_index: torch.Tensor, shared: SharedPromptBatch | None = None) -> tuple[ResponseLogProbs, ResponseLogProbs | None]:
        """The policy's log-probs of `responses` (one forward, with gradients; over their shared-prompt
        rows where given) and, when the objective needs it, the reference's (precomputed, or scored
        here under no_grad)."""
        tokens = self.needs_token_logprobs
        per_token, summed = self.logprobs(self.policy, responses, shared)
        mask = responses.response_mask.to(summed.device)
        lengths = mask.sum(-1)
        policy = ResponseLogProbs(summed, lengths, per_token if tokens else None, mask if tokens else None)
        if not self.needs_reference:
            return policy, None
        if (cached := self.precomputed_reference("responses", response_index, summed.device)) is not None:
            return policy, ResponseLogProbs(cached, lengths)
        with torch.no_grad():
            ref_tokens, ref_summed = self.logprobs(self.context.reference, responses, shared)
        ref_summed = ref_summed.to(summed.device)
        return policy, ResponseLogProbs(ref_summed, lengths, ref_tokens.to(summed.device) if tokens else None, mask if tokens else None)

    def logprobs(self, model, responses: PackedBatch, shared: SharedPromptBatch | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(per-token [R, T] in `responses`' layout, or None where the objective reads only sums;
        summed [R]) log-probs of the responses under `model`, from their shared-prompt rows where given."""
        if shared is None:
            return sequence_logprobs(model, responses)
        width = responses.input_ids.shape[1] if self.needs_token_logprobs else None
        summed, _, per_token = shared_prompt_logprobs(model, shared, row_width=width)
        return per_token, summed

    def log_objective(self, objective: Objective, responses: PackedBatch, batch_size: int) -> torch.Tensor:
        """Check the loss, count the tokens and log the loss, the reward statistics and the terms."""
        check_finite(objective.loss, self.global_step)
        self.budget.train_tokens += int(responses.attention_mask.sum())
        self.log_terms({"loss": objective.loss.detach(), **objective.terms, **self.reward_statistics(objective)}, batch_size=batch_size)
        return objective.loss

    def reward_statistics(self, objective: Objective) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch.to(device)


class OfflinePreferenceMethod(OfflineMethod):
    """Learns from preference pairs; subclasses implement `loss`."""

    def datamodule(self) -> PreferenceDataModule:
        ctx = self.context
        data = PreferenceDataModule(ctx.preferences, ctx.codec, self.config.batch_size, self.config.max_length, seed=ctx.seed, share_prompts=self.config.share_prompts)
        self.on_data(data)
        return data

    def loss(self, policy: ResponseLogProbs, reference: ResponseLogProbs | None, batch: PreferenceBatch) -> Objective:
        """The objective on the P pairs of a batch, from the log-probs of its R distinct responses (the
        reference's are None for a method with `needs_reference = False`); `batch.pairs(values)` gives
        a [R] value's chosen and rejected sides [P]. A response in several pairs is scored once, so a
        per-response quantity (a score, a log-ratio) is computed on [R] before it is paired."""
        raise NotImplementedError

    def training_step(self, batch: PreferenceBatch, batch_idx: int):
        policy, reference = self.score(batch.responses, batch.response_index, batch.shared)  # each distinct response once
        return self.log_objective(self.loss(policy, reference, batch), batch.responses, batch.num_groups)

    def reward_statistics(self, objective: Objective) -> dict[str, torch.Tensor]:
        return paired_reward_statistics(objective)


class UnpairedPreferenceMethod(OfflineMethod):
    """Learns from single responses labelled desirable or undesirable (KTO); subclasses implement
    `unpaired_data` (the labelled records) and `loss`.

    Each record also has a mismatched example (its prompt with another record's response, fixed for
    the run) for an estimate of KL(π‖π_ref) that needs no preference (KTO's reference point); they
    are scored under no_grad by the policy, and by the reference once before training (with
    `precompute_reference`) or in each step."""

    reference_scored = ("responses", "mismatched")

    def unpaired_data(self) -> tuple[list[dict], int]:
        """The records ({prompt, response, desirable}) and the number of labels behind them."""
        raise NotImplementedError

    def datamodule(self) -> UnpairedDataModule:
        ctx = self.context
        records, num_labels = self.unpaired_data()
        data = UnpairedDataModule(records, ctx.codec, self.config.batch_size, self.config.max_length, seed=ctx.seed, num_labels=num_labels)
        self.on_data(data)
        return data

    def loss(
        self, policy: ResponseLogProbs, reference: ResponseLogProbs | None,
        policy_mismatched: torch.Tensor, reference_mismatched: torch.Tensor | None, batch: UnpairedBatch,
    ) -> Objective:
        """The objective on a batch of B labelled responses (`batch.desirable` [B]), with the summed
        log-probs [B] of the mismatched responses (detached)."""
        raise NotImplementedError

    def training_step(self, batch: UnpairedBatch, batch_idx: int):
        policy, reference = self.score(batch.responses, batch.response_index)
        with torch.no_grad():
            policy_mismatched = sequence_logprobs(self.policy, batch.mismatched)[1]
            reference_mismatched = None
            if self.needs_reference:
                reference_mismatched = self.precomputed_reference("mismatched", batch.response_index, policy_mismatched.device)
                if reference_mismatched is None:
                    reference_mismatched = sequence_logprobs(self.context.reference, batch.mismatched)[1].to(policy_mismatched.device)
        objective = self.loss(policy, reference, policy_mismatched, reference_mismatched, batch)
        return self.log_objective(objective, batch.responses, batch.size)

    def reward_statistics(self, objective: Objective) -> dict[str, torch.Tensor]:
        """Means of the desirable and undesirable responses' rewards, their difference, and the share of
        the batch's (desirable, undesirable) combinations ranked right (a batch with one side only logs
        that side's mean)."""
        d, u = objective.chosen_rewards, objective.rejected_rewards
        stats = {}
        if d.numel():
            stats["rewards_chosen"] = d.mean()
        if u.numel():
            stats["rewards_rejected"] = u.mean()
        if d.numel() and u.numel():
            stats["margin"] = stats["rewards_chosen"] - stats["rewards_rejected"]
            stats["accuracy"] = (d[:, None] > u[None, :]).float().mean()
        return stats
