"""The online base: methods that learn from rollouts of the current policy scored by a reward
(PPO-RLHF, RLAIF, RL-CAI).

One iteration samples responses to a batch of prompts with the shared sampling engine,
scores them with the configured reward source, and computes what every KL-regularised
RL objective needs (Ziegler et al. 2019, eq. 2; Ouyang et al. 2022, eq. 2):

    R(x, y) = r(x, y) − β · log π(y|x) / π_ref(y|x)

with the KL term spread over the tokens (k1 estimator: log π − log π_ref on the sampled
token) and the reward placed on the last response token (EOS). Llama 2 (Touvron et al. 2023,
sec. 3.2.3) optionally whitens the logit of the reward model's probability first.

Each Lightning `training_step` gets one batch of prompts and is one whole iteration
(rollout, then the method's own updates), so the optimiser is stepped by hand
(`automatic_optimization = False`) and `trainer.max_steps` counts iterations: the LR
schedule, the KL monitor, periodic evaluation and logging all run per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from alignbench.config import ConfigError
from alignbench.data import PromptDataModule
from alignbench.generation import sample
from alignbench.logprobs import PackedBatch, sequence_logprobs
from alignbench.methods.base import AlignmentMethod, MethodConfig
from alignbench.reward import score_texts
from alignbench.seeding import seeded_generator


# --- pure pieces -------------------------------------------------------------------------
def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of `x` over the positions where `mask` is 1 (any shape, same for both)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean) / std over the masked positions; 0 elsewhere."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def transform_rewards(scores: Tensor, kind: Literal["none", "logit_whiten"], eps: float = 1e-6) -> Tensor:
    """Rewards [B] from reward probabilities [B] in [0, 1].

    'logit_whiten' (Llama 2, sec. 3.2.3): the logit of the probability, whitened over the
    batch, so that a reward model's saturated scores do not dwarf the KL penalty.
    """
    if kind == "none":
        return scores
    logits = torch.logit(scores.clamp(eps, 1 - eps))
    return masked_whiten(logits, torch.ones_like(logits))


def kl_penalised_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards [B, L]: −β·kl_t on every response token, plus the sequence reward
    scores [B] on the last one (EOS). kl, mask: [B, L] (k1 = log π − log π_ref per token)."""
    rewards = -kl_coef * kl * mask
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
    return rewards.index_put((torch.arange(len(scores), device=mask.device), last), scores, accumulate=True)


class FixedKLController:
    """A constant KL coefficient β (InstructGPT: β = 0.02)."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019 (sec. 2.2): steer β so the observed KL approaches a target,

        e = clip(KL / KL_target − 1, −0.2, 0.2),    β ← β · (1 + e · n_steps / horizon)

    where n_steps is the number of samples (episodes) behind this KL estimate.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        error = float(np.clip(kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + error * n_steps / self.horizon


def pack_rollout(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_token_id: int) -> tuple[PackedBatch, int]:
    """Prompts left-padded to a common width P, responses right-padded after it, so response
    token t of every row sits in column P + t. Returns the batch [B, P + L] and P."""
    start, width = max(map(len, prompt_ids)), max(map(len, response_ids))
    input_ids = torch.full((len(prompt_ids), start + width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, start - len(p) : start + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[i, start - len(p) : start + len(r)] = 1
    response_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    response_mask[:, start:] = attention_mask[:, start:].bool()
    return PackedBatch(input_ids, attention_mask, response_mask), start


@dataclass
class Rollout:
    """B sampled responses, laid out by `pack_rollout`; every [B, L] tensor is indexed by
    response token (column t = token t), with `mask` 1 on response tokens (EOS included)."""

    prompts: list[str]
    responses: list[str]
    batch: PackedBatch
    start: int
    mask: Tensor
    logprobs: Tensor
    """[B, L] log π(y_t | x, y_<t) under the policy that sampled (at temperature 1)."""
    ref_logprobs: Tensor
    """[B, L] the same under the frozen SFT reference."""
    scores: Tensor
    """[B] what the reward source said (probabilities)."""
    rewards: Tensor
    """[B] the scores after `reward_transform`: the r(x, y) that is maximised."""

    @property
    def kl(self) -> Tensor:
        """[B, L] per-token k1 KL estimate log π − log π_ref (0 off the response)."""
        return (self.logprobs - self.ref_logprobs) * self.mask

    def rows(self, index: Tensor) -> PackedBatch:
        b = self.batch
        return PackedBatch(b.input_ids[index], b.attention_mask[index], b.response_mask[index])


def response_token_logprobs(model, batch: PackedBatch, start: int) -> Tensor:
    """[B, L] log-probs of the response tokens of a `pack_rollout` batch (gradients flow)."""
    return sequence_logprobs(model, batch)[0][:, start:]


# --- the base class ----------------------------------------------------------------------
@dataclass
class OnlineConfig(MethodConfig):
    """Fields of methods that learn from scored rollouts of the current policy."""

    iterations: int = 40
    """Iterations (rollout + updates) per pass over the training prompts."""
    batch_size: int = 64
    """Prompts per iteration (one response each): the rollout batch."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (log-probs and KL are at temperature 1)."""
    reward: Literal["proxy", "helpfulness", "gold"] = "proxy"
    """'proxy': Llama 2's combination of the helpfulness and safety reward models; 'helpfulness':
    the helpfulness RM alone; 'gold': the world's gold reward (oracle experiments, no RM labels spent)."""
    reward_transform: Literal["none", "logit_whiten"] = "logit_whiten"
    """'none': the probability itself; 'logit_whiten': its logit, whitened over the batch (Llama 2)."""

    def __post_init__(self):
        super().__post_init__()
        if self.iterations < 1:
            raise ValueError(f"iterations={self.iterations} must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.reward not in ("proxy", "helpfulness", "gold"):
            raise ValueError(f"reward={self.reward!r} must be one of proxy, helpfulness, gold")
        if self.reward_transform not in ("none", "logit_whiten"):
            raise ValueError(f"reward_transform={self.reward_transform!r} must be one of none, logit_whiten")


class OnlineRLMethod(AlignmentMethod):
    """Rollouts of the current policy, scored by a reward source; subclasses write `training_step`."""

    config_class = OnlineConfig
    feedback = "reward"

    @classmethod
    def feedback_of(cls, config: OnlineConfig) -> str:
        return "gold" if config.reward == "gold" else cls.feedback  # the oracle spends no reward-model labels

    def __init__(self, config: OnlineConfig, context):
        if config.reward == "gold" and context.gold_judge is None:
            raise ConfigError("reward=gold needs a world with a gold reward; use reward=proxy or reward=helpfulness")
        super().__init__(config, context)
        self.automatic_optimization = False
        self.max_grad_norm = config.optim.grad_clip
        self._rollouts = 0

    def datamodule(self) -> PromptDataModule:
        c, ctx = self.config, self.context
        return PromptDataModule(ctx.sample_train_prompts(c.iterations * c.batch_size, seed=1000 * ctx.seed + 1), c.batch_size, seed=ctx.seed)

    def reward_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Scores in [0, 1] of the configured reward source."""
        ctx, prompts, responses = self.context, list(prompts), list(responses)
        if self.config.reward == "gold":
            return np.asarray(ctx.gold_judge.score_batch(prompts, responses), dtype=np.float32)
        if self.config.reward == "helpfulness":
            rm = ctx.proxy.helpfulness
            return rm.probability(score_texts(rm, ctx.codec, prompts, responses)).numpy()
        return super().reward_scores(prompts, responses)

    @torch.no_grad()
    def generate_and_score(self, prompts: Sequence[str]) -> Rollout:
        """Sample one response per prompt from the current policy and score it (no gradients)."""
        c, ctx = self.config, self.context
        prompt_ids = ctx.codec.encode_prompts(list(prompts))
        out = sample(
            self.policy, prompt_ids, max_new_tokens=ctx.eval_config.max_new_tokens, eos_token_id=ctx.codec.eos_token_id,
            pad_token_id=ctx.codec.pad_token_id, temperature=c.temperature, batch_size=ctx.eval_config.batch_size,
            generator=seeded_generator(ctx.seed, self.name, "rollout", self._rollouts),
        )
        self._rollouts += 1
        self.budget.policy_samples += len(prompt_ids)
        texts = ctx.codec.decode_responses(out.response_ids)
        batch, start = pack_rollout(prompt_ids, out.response_ids, ctx.codec.pad_token_id)
        batch = batch.to(self.device)
        scores = torch.as_tensor(self.reward_scores(prompts, texts), dtype=torch.float32, device=self.device)
        return Rollout(
            prompts=list(prompts), responses=texts, batch=batch, start=start, mask=batch.response_mask[:, start:].float(),
            logprobs=response_token_logprobs(self.policy, batch, start),
            ref_logprobs=response_token_logprobs(ctx.reference, batch, start).to(self.device),
            scores=scores, rewards=transform_rewards(scores, c.reward_transform),
        )

    def optimizer_update(self, loss: Tensor, counts_as_step: bool) -> None:
        """One gradient update. Lightning counts a step per `counts_as_step` update (one per
        iteration); the others go through the strategy, with the same precision handling."""
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.max_grad_norm:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        if counts_as_step:
            optimizer.step()
        else:
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None, model=self)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # rows of prompt strings

    # --- resume: state that changes inside a fit and is not a parameter ---------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["online_rl"] = {"rollouts": self._rollouts}  # seeds the next rollout's sampling

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rollouts = checkpoint["online_rl"]["rollouts"]
