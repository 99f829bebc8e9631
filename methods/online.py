"""The online base: methods that learn from rollouts of the current policy scored by a reward
(PPO-RLHF, RLAIF, RL-CAI, GRPO, RLOO, REINFORCE++, online DPO).

One iteration samples G responses to each prompt of a batch with the shared sampling engine,
scores them with the configured reward source, and computes what every KL-regularised RL
objective needs (Ziegler et al. 2019, eq. 2; Ouyang et al. 2022, eq. 2):

    R(x, y) = r(x, y) − β · log π(y|x) / π_ref(y|x)

The KL goes either into the reward (`kl_penalty: reward`; the k1 estimator log π − log π_ref
of each sampled token, PPO and REINFORCE++) or into the loss (`kl_penalty: loss`; β times the
k3 estimator per token, GRPO, Shao et al. 2024, eq. 4).

The base owns the update loop: `ppo_epochs` passes of minibatches (whole prompt groups) over
the rollout, the clipped surrogate objective with ε_low / ε_high (DAPO's clip-higher, Yu et
al. 2025), the loss aggregation (token mean, sequence mean, or Dr. GRPO's constant normaliser,
Liu et al. 2025), DAPO's dynamic sampling (drop groups whose rewards are all equal), gradient
clipping and logging. A method supplies what differs: `prepare` (its advantages, per token,
and whatever its loss needs, computed once per rollout without gradients) and, where it has
more than the policy's loss (a critic, a DPO loss), `update_loss`.

Each Lightning `training_step` gets one batch of prompts and is one whole iteration
(rollout, then the updates), so the optimiser is stepped by hand (`automatic_optimization =
False`) and `trainer.max_steps` counts iterations: the LR schedule, the KL monitor (and
`max_kl`, read from each rollout's KL), periodic evaluation and logging all run per iteration.
"""

from __future__ import annotations

from collections import defaultdict
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
from alignbench.models import disable_dropout
from alignbench.reward import score_texts
from alignbench.seeding import seeded_generator
from alignbench.stages.ai_labeler import ai_judge
from alignbench.training import check_finite


# --- pure pieces -------------------------------------------------------------------------
def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of `x` over the positions where `mask` is 1 (any shape, same for both)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean) / std over the masked positions; 0 elsewhere."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


RewardTransform = Literal["none", "whiten", "logit_whiten"]


def transform_rewards(scores: Tensor, kind: RewardTransform, eps: float = 1e-6) -> Tensor:
    """Rewards [B] from a reward source's scores [B] in [0, 1].

    'whiten': (s − mean) / std over the batch. 'logit_whiten' (Llama 2, sec. 3.2.3): the logit
    of the probability, whitened over the batch, so that a reward model's saturated scores do
    not dwarf the KL penalty; only for probabilities that are never exactly 0 or 1 (gold's are:
    its 0s and 1s would clamp to ±13.8).
    """
    if kind == "none":
        return scores
    if kind == "whiten":
        return masked_whiten(scores, torch.ones_like(scores))
    logits = torch.logit(scores.clamp(eps, 1 - eps))
    return masked_whiten(logits, torch.ones_like(logits))


def normalize_rewards(rewards: Tensor, mode: Literal["group", "batch", "none"], eps: float = 1e-4) -> Tensor:
    """Rewards [P, G] (G samples of each of P prompts) normalised per group, over the batch, or not.

    'group' (GRPO, Shao et al. 2024, sec. 4.1.2): (r − mean_g) / (std_g + ε), std with Bessel's
    correction as in verl and TRL; a group whose rewards are all equal gets 0, not NaN.
    'batch': (r − mean) / (std + ε) over all P·G rewards. 'none': r as it is.
    """
    if mode == "none":
        return rewards
    if mode == "group":
        return (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True) + eps)
    return (rewards - rewards.mean()) / (rewards.std() + eps)


def kl_penalised_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards [B, L]: −β·kl_t on every response token, plus the sequence reward
    scores [B] on the last one (EOS). kl, mask: [B, L] (k1 = log π − log π_ref per token)."""
    rewards = -kl_coef * kl * mask
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
    return rewards.index_put((torch.arange(len(scores), device=mask.device), last), scores, accumulate=True)


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(π‖π_ref) (Schulman 2020, "Approximating KL divergence";
    GRPO eq. 4): with ρ = π_ref(y_t)/π(y_t), k3 = ρ − log ρ − 1 ≥ 0, unbiased for the KL
    of the token's distribution when y_t ~ π. Shapes [B, L]; gradients flow through `logprobs`."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


Aggregation = Literal["token_mean", "sequence_mean", "constant"]


def aggregate_loss(per_token: Tensor, mask: Tensor, aggregation: Aggregation, max_tokens: int) -> Tensor:
    """One loss from per-token losses [B, L] (mask [B, L]).

    'token_mean': Σ_i Σ_t ℓ_it / Σ_i |y_i| (PPO, DAPO eq. 8); 'sequence_mean': (1/B) Σ_i (1/|y_i|)
    Σ_t ℓ_it (GRPO eq. 3), which favours short responses' tokens; 'constant': (1/B) Σ_i Σ_t ℓ_it
    / max_tokens (Dr. GRPO, Liu et al. 2025, eq. 3), no length normalisation at all.
    """
    if aggregation == "token_mean":
        return masked_mean(per_token, mask)
    per_sequence = (per_token * mask).sum(dim=1)
    if aggregation == "sequence_mean":
        return (per_sequence / mask.sum(dim=1).clamp(min=1)).mean()
    return per_sequence.sum() / (per_token.shape[0] * max_tokens)


def clipped_surrogate(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip_low: float, clip_high: float) -> tuple[Tensor, Tensor]:
    """Per-token clipped surrogate loss (Schulman et al. 2017, eq. 7) with DAPO's asymmetric clip
    (Yu et al. 2025, eq. 10): ρ_t = π(y_t)/π_old(y_t), ℓ_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε_low,
    1 + ε_high)). All [B, L]. Returns ℓ and where the clipped term was the larger (no gradient there)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_low: float,
                clip_high: float | None = None, aggregation: Aggregation = "token_mean", max_tokens: int = 1) -> tuple[Tensor, Tensor]:
    """The clipped surrogate, aggregated (`aggregate_loss`), and the share of clipped tokens."""
    per_token, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, clip_low, clip_low if clip_high is None else clip_high)
    return aggregate_loss(per_token, mask, aggregation, max_tokens), masked_mean(clipped, mask).detach()


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
    """P prompts × G sampled responses (N = P·G rows, prompt-major: row p·G + g is sample g of
    prompt p), laid out by `pack_rollout`; every [N, L] tensor is indexed by response token
    (column t = token t), with `mask` 1 on response tokens (EOS included)."""

    prompts: list[str]
    """[N] the prompt of each row."""
    responses: list[str]
    batch: PackedBatch
    start: int
    mask: Tensor
    logprobs: Tensor
    """[N, L] log π(y_t | x, y_<t) under the policy that sampled (at temperature 1)."""
    ref_logprobs: Tensor
    """[N, L] the same under the frozen reference."""
    scores: Tensor
    """[N] what the reward source said (in [0, 1])."""
    rewards: Tensor
    """[N] the scores after the reward transform and normalisation: the r(x, y) that is maximised."""
    group_size: int = 1
    """G: samples per prompt."""

    @property
    def kl(self) -> Tensor:
        """[N, L] per-token k1 KL estimate log π − log π_ref (0 off the response)."""
        return (self.logprobs - self.ref_logprobs) * self.mask

    def rows(self, index: Tensor) -> PackedBatch:
        b = self.batch
        return PackedBatch(b.input_ids[index], b.attention_mask[index], b.response_mask[index])

    def grouped(self, x: Tensor) -> Tensor:
        """[N, ...] -> [P, G, ...]."""
        return x.view(-1, self.group_size, *x.shape[1:])


def response_token_logprobs(model, batch: PackedBatch, start: int) -> Tensor:
    """[B, L] log-probs of the response tokens of a `pack_rollout` batch (gradients flow)."""
    return sequence_logprobs(model, batch)[0][:, start:]


# --- the base class ----------------------------------------------------------------------
REWARD_SOURCES = ("proxy", "helpfulness", "gold", "judge")
SOURCE_TRANSFORM: dict[str, RewardTransform] = {"proxy": "logit_whiten", "helpfulness": "logit_whiten", "gold": "whiten", "judge": "none"}
"""Each reward source's own transform (`reward_transform: null`): a reward model's probability
through logit-and-whiten (Llama 2); gold, which is exactly 0 or 1 on half of the samples, plainly
whitened; the AI labeler's expected rating as it is (Lee et al. 2023, d-RLAIF)."""


@dataclass
class OnlineConfig(MethodConfig):
    """Fields of methods that learn from scored rollouts of the current policy."""

    iterations: int = 40
    """Iterations (rollout + updates) per pass over the training prompts."""
    batch_size: int = 64
    """Prompts per iteration; each gets `samples_per_prompt` responses."""
    samples_per_prompt: int = 1
    """G: responses sampled per prompt (a group; GRPO and RLOO compare the samples of a group)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (log-probs and KL are at temperature 1)."""
    reward: Literal["proxy", "helpfulness", "gold", "judge"] = "proxy"
    """'proxy': Llama 2's combination of the helpfulness and safety reward models; 'helpfulness':
    the helpfulness RM alone; 'gold': the world's verifier (RL from verifiable rewards, no RM labels
    spent); 'judge': the AI labeler's expected rating of each rollout (d-RLAIF, one AI label each)."""
    reward_transform: Literal["none", "whiten", "logit_whiten"] | None = None
    """How scores become rewards: 'none', 'whiten' over the batch, or 'logit_whiten' (Llama 2).
    null: the reward source's own (proxy, helpfulness: logit_whiten; gold: whiten; judge: none)."""
    reward_normalization: Literal["group", "batch", "none"] = "none"
    """After the transform: normalise rewards per group (GRPO), over the batch, or not (Dr. GRPO)."""
    minibatch_size: int = 32
    """Rollouts (responses) per gradient update, whole groups (a multiple of samples_per_prompt)."""
    ppo_epochs: int = 4
    """Passes of minibatch updates over each rollout batch."""
    clip_range: float = 0.2
    """ε_low of the clipped surrogate objective (and ε_high unless that is set)."""
    clip_range_high: float | None = None
    """ε_high (DAPO's clip-higher: 0.28 with ε_low 0.2); null: the same as clip_range."""
    loss_aggregation: Literal["token_mean", "sequence_mean", "constant"] = "token_mean"
    """'token_mean' over the minibatch's tokens; 'sequence_mean' per response, then over responses
    (GRPO); 'constant': token sums / (responses · eval.max_new_tokens) (Dr. GRPO)."""
    dynamic_sampling: bool = False
    """DAPO: train only on groups whose rewards are not all equal (they carry no group signal)."""
    kl_penalty: Literal["reward", "loss"] = "reward"
    """Where the KL to the reference goes: 'reward' (k1 per token, subtracted from the reward) or
    'loss' (β·k3 per token added to the policy's loss, as GRPO)."""
    kl_controller: Literal["fixed", "adaptive"] = "fixed"
    """'fixed' β (InstructGPT, Stiennon 2020) or 'adaptive' towards kl_target (Ziegler 2019)."""
    init_kl_coef: float = 0.1
    """β, or its starting value when adaptive (the rewards are whitened logits by default, std 1)."""
    kl_target: float = 1.0
    """Adaptive: the sequence KL (nats) that β steers towards."""
    kl_horizon: int = 128
    """Adaptive: samples over which β may change by a factor of about e^0.2 (at most ±0.2 ·
    batch_size / kl_horizon per iteration: ±10% at the default 64). Ziegler et al. used 10,000 in
    runs of millions of samples; it must be small beside a run's length: in 60 iterations of 64
    samples, 2,000 moved β at most 1.5x and the KL ended 50% over its target, 128 ended within 11%."""
    kl_every: int = 0
    """Online methods measure KL on every rollout batch (`train/kl`, and `max_kl` reads it), so
    the separate sampled estimate is off."""

    def __post_init__(self):
        super().__post_init__()
        for key in ("iterations", "samples_per_prompt", "minibatch_size", "ppo_epochs", "kl_horizon"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        choices = {"reward": REWARD_SOURCES, "reward_transform": (None, "none", "whiten", "logit_whiten"),
                   "reward_normalization": ("group", "batch", "none"), "loss_aggregation": ("token_mean", "sequence_mean", "constant"),
                   "kl_penalty": ("reward", "loss"), "kl_controller": ("fixed", "adaptive")}
        for key, accepted in choices.items():
            if getattr(self, key) not in accepted:
                raise ValueError(f"{key}={getattr(self, key)!r} must be one of {', '.join(map(str, accepted))}")
        if self.minibatch_size > self.batch_size * self.samples_per_prompt:
            raise ValueError(f"minibatch_size={self.minibatch_size} must be <= batch_size={self.batch_size} × samples_per_prompt={self.samples_per_prompt}")
        if self.minibatch_size % self.samples_per_prompt:
            raise ValueError(f"minibatch_size={self.minibatch_size} must be a multiple of samples_per_prompt={self.samples_per_prompt} (minibatches hold whole groups)")
        if self.samples_per_prompt < 2 and (self.reward_normalization == "group" or self.dynamic_sampling):
            raise ValueError(f"samples_per_prompt={self.samples_per_prompt}: reward_normalization=group and dynamic_sampling compare the samples of a prompt; use samples_per_prompt >= 2")
        for key in ("clip_range", "kl_target"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}={getattr(self, key)} must be > 0")
        if self.clip_range_high is not None and not self.clip_range_high > 0:
            raise ValueError(f"clip_range_high={self.clip_range_high} must be > 0, or null for clip_range")
        if self.init_kl_coef < 0:
            raise ValueError(f"init_kl_coef={self.init_kl_coef} must be >= 0")
        if self.max_kl is not None and self.kl_every == 0 and self.temperature != 1.0:
            # log π − log π_ref averaged over samples drawn at T ≠ 1 is not the KL of anything sampled.
            raise ValueError(f"max_kl={self.max_kl} with temperature={self.temperature}: the rollouts' KL is only a KL at "
                             "temperature 1; set kl_every > 0 (a separate estimate at the evaluation temperature) or remove max_kl")

    @property
    def transform(self) -> RewardTransform:
        return self.reward_transform if self.reward_transform is not None else SOURCE_TRANSFORM[self.reward]


class OnlineRLMethod(AlignmentMethod):
    """Rollouts of the current policy, scored by a reward source, and the shared update loop;
    subclasses write `prepare` (their advantages) and, if they have more than the policy's
    clipped surrogate, `update_loss`."""

    config_class = OnlineConfig
    family = "online RL"
    feedback = "reward"
    rollout_kl: float | None = None
    """The sequence KL of the latest rollout batch; the runner's KL monitor holds it to `max_kl`."""

    @classmethod
    def feedback_of(cls, config: OnlineConfig) -> str:
        # The oracle spends no reward-model labels; the judge neither (its AI labels are counted as spent).
        return {"gold": "gold", "judge": "none"}.get(config.reward, cls.feedback)

    def __init__(self, config: OnlineConfig, context):
        if config.reward == "gold" and context.gold_judge is None:
            raise ConfigError("reward=gold needs a world with a gold reward; use reward=proxy or reward=helpfulness")
        judge = None
        if config.reward == "judge":
            if context.stages is None:
                raise ConfigError("reward=judge loads the AI labeler through the run's stages; run it with `alignbench run`")
            judge = ai_judge(context.stages)
        super().__init__(config, context)
        disable_dropout(self.policy)  # the sampled, the scored (π_old) and the updated policy are one function
        self.judge = judge
        self.automatic_optimization = False
        self.max_grad_norm = config.optim.grad_clip
        self._rollouts = 0
        if config.kl_controller == "adaptive":
            self.kl_controller = AdaptiveKLController(config.init_kl_coef, config.kl_target, config.kl_horizon)
        else:
            self.kl_controller = FixedKLController(config.init_kl_coef)

    def datamodule(self) -> PromptDataModule:
        c, ctx = self.config, self.context
        return PromptDataModule(ctx.sample_train_prompts(c.iterations * c.batch_size, seed=1000 * ctx.seed + 1), c.batch_size, seed=ctx.seed)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.judge is not None:
            self.judge.model.to(self.device)

    def reward_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Scores in [0, 1] of the configured reward source."""
        ctx, prompts, responses = self.context, list(prompts), list(responses)
        if self.config.reward == "gold":
            return np.asarray(ctx.gold_judge.score_batch(prompts, responses), dtype=np.float32)
        if self.config.reward == "judge":
            self.budget.ai_labels += len(prompts)  # one rating per rollout
            return self.judge.score_batch(prompts, responses).astype(np.float32)
        if self.config.reward == "helpfulness":
            rm = ctx.proxy.helpfulness
            return rm.probability(score_texts(rm, ctx.codec, prompts, responses, max_length=ctx.proxy.max_length)).numpy()
        return super().reward_scores(prompts, responses)

    @torch.no_grad()
    def generate_and_score(self, prompts: Sequence[str]) -> Rollout:
        """Sample `samples_per_prompt` responses per prompt from the current policy and score them (no gradients)."""
        c, ctx, g = self.config, self.context, self.config.samples_per_prompt
        prompt_ids = ctx.codec.encode_prompts(list(prompts))
        out = sample(
            self.policy, prompt_ids, max_new_tokens=ctx.eval_config.max_new_tokens, eos_token_id=ctx.codec.eos_token_id,
            pad_token_id=ctx.codec.pad_token_id, temperature=c.temperature, batch_size=ctx.eval_config.batch_size,
            generator=seeded_generator(ctx.seed, self.name, "rollout", self._rollouts), num_samples=g,
        )
        self._rollouts += 1
        prompts = [p for p in prompts for _ in range(g)]
        prompt_ids = [p for p in prompt_ids for _ in range(g)]
        self.budget.policy_samples += len(prompt_ids)
        texts = ctx.codec.decode_responses(out.response_ids)
        batch, start = pack_rollout(prompt_ids, out.response_ids, ctx.codec.pad_token_id)
        batch = batch.to(self.device)
        scores = torch.as_tensor(self.reward_scores(prompts, texts), dtype=torch.float32, device=self.device)
        rewards = transform_rewards(scores, c.transform)
        if c.reward_normalization != "none":
            rewards = normalize_rewards(rewards.view(-1, g), c.reward_normalization).reshape(-1)
        return Rollout(
            prompts=prompts, responses=texts, batch=batch, start=start, mask=batch.response_mask[:, start:].float(),
            logprobs=response_token_logprobs(self.policy, batch, start),
            ref_logprobs=response_token_logprobs(ctx.reference, batch, start).to(self.device),
            scores=scores, rewards=rewards, group_size=g,
        )

    # --- what a method supplies ---------------------------------------------------------
    def prepare(self, rollout: Rollout, kl_coef: float) -> dict[str, Tensor]:
        """Per-row tensors ([N, ...]) the updates read, computed once per rollout without gradients:
        at least 'advantages' [N, L] for the clipped surrogate. `kl_coef` is β when the KL goes in
        the reward, else 0."""
        raise NotImplementedError

    def train_groups(self, rollout: Rollout) -> Tensor:
        """[P] bool: the groups the updates use (all, or DAPO's dynamic sampling: not all equal)."""
        rewards = rollout.grouped(rollout.scores)
        if self.config.dynamic_sampling:
            return (rewards != rewards[:, :1]).any(dim=1)
        return torch.ones(len(rewards), dtype=torch.bool, device=rewards.device)

    def update_loss(self, batch: PackedBatch, rollout: Rollout, idx: Tensor, prepared: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one minibatch (rows `idx` of the rollout): the clipped surrogate on the
        method's advantages, plus β·k3 per token when the KL goes in the loss."""
        c = self.config
        logprobs = response_token_logprobs(self.policy, batch, rollout.start)
        per_token, clipped = clipped_surrogate(logprobs, rollout.logprobs[idx], prepared["advantages"][idx], c.clip_range,
                                               c.clip_range if c.clip_range_high is None else c.clip_range_high)
        m, terms = rollout.mask[idx], {}
        if c.kl_penalty == "loss":
            kl = k3_kl(logprobs, rollout.ref_logprobs[idx])
            per_token = per_token + self.kl_controller.value * kl
            terms["kl_loss"] = masked_mean(kl, m).detach()
        loss = aggregate_loss(per_token, m, c.loss_aggregation, self.context.eval_config.max_new_tokens)
        return loss, {"policy_loss": loss.detach(), "clip_frac": masked_mean(clipped, m).detach(), **terms}

    # --- the loop ------------------------------------------------------------------------
    def training_step(self, rows: list[dict], batch_idx: int):
        c = self.config
        rollout = self.generate_and_score([row["prompt"] for row in rows])
        mask, n, g = rollout.mask, len(rollout.prompts), rollout.group_size
        kl_coef = self.kl_controller.value
        with torch.no_grad():
            prepared = self.prepare(rollout, kl_coef if c.kl_penalty == "reward" else 0.0)
        groups = self.train_groups(rollout).nonzero().squeeze(1)
        offsets = torch.arange(g, device=mask.device)

        stats = defaultdict(list)
        minibatches = [(groups[order][:, None] * g + offsets).reshape(-1) for _ in range(c.ppo_epochs)
                       for order in torch.randperm(len(groups), device=mask.device).split(c.minibatch_size // g)] if len(groups) else []
        for i, idx in enumerate(minibatches):
            batch = rollout.rows(idx)
            loss, terms = self.update_loss(batch, rollout, idx, prepared)
            check_finite(loss, self.global_step)
            self.optimizer_update(loss, counts_as_step=i == len(minibatches) - 1)
            self.budget.train_tokens += int(batch.attention_mask.sum())
            for key, value in (("loss", loss), *terms.items()):
                stats[key].append(value.detach())
        if not minibatches:  # every group dropped: a step without gradients, which AdamW skips, so Lightning still counts the iteration
            optimizer = self.optimizers()
            optimizer.zero_grad()
            optimizer.step()
        self.lr_schedulers().step()

        sequence_kl = rollout.kl.sum(dim=1).mean()
        self.kl_controller.update(float(sequence_kl), n)
        self.rollout_kl = float(sequence_kl)
        metrics = {key: torch.stack(values).mean() for key, values in stats.items()}
        metrics.update({
            "reward": rollout.scores.mean(), "kl": sequence_kl, "kl_coef": torch.tensor(kl_coef),
            # −log π_old of the sampled tokens: an unbiased estimate of the per-token entropy at temperature 1
            "entropy": masked_mean(-rollout.logprobs, mask), "response_length": mask.sum(dim=1).mean(),
        })
        if g > 1:
            metrics["trained_groups"] = torch.tensor(float(len(groups)))
        self.log_terms(metrics, batch_size=n)

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
        checkpoint["online_rl"] = {"rollouts": self._rollouts, "kl_coef": self.kl_controller.value}  # seeds the next rollout's sampling

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["online_rl"]
        self._rollouts = state["rollouts"]
        self.kl_controller.value = state.get("kl_coef", self.kl_controller.value)
