"""PPO-RLHF (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022).

The policy maximises the reward model's score minus a KL penalty to the SFT policy
(InstructGPT eq. 2), optionally plus the SFT likelihood of demonstrations (PPO-ptx):

    objective(φ) = E_(x,y)~π_φ [ r(x, y) − β log π_φ(y|x) / π_SFT(y|x) ] + γ_ptx E_demo [ log π_φ(y|x) ]

Each iteration samples one response per prompt (`OnlineRLMethod.generate_and_score`),
turns the sequence reward into per-token rewards (−β·KL on every token, r on the last),
estimates advantages with GAE (Schulman et al. 2016) under a learned value function, and
takes `ppo_epochs` passes of minibatch updates on the clipped surrogate objective
(Schulman et al. 2017) and the clipped value loss. β is fixed or adapted towards a
target KL (Ziegler 2019). InstructGPT initialises the value function from the reward
model: here a copy of the helpfulness RM reads a value at every token through its head.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Iterator, Literal

import numpy as np
import torch
from torch import Tensor

from alignbench.logprobs import PackedBatch, pack_sequences, position_ids_from_mask
from alignbench.methods.online import OnlineConfig, OnlineRLMethod, Rollout, kl_penalised_rewards, masked_mean, masked_whiten
from alignbench.models import RewardModel, disable_dropout
from alignbench.log import log
from alignbench.sft import response_nll
from alignbench.training import OptimConfig, adamw_with_schedule


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eqs. 11–16).

    rewards, values, mask: [B, L], token t of each response in column t, mask 1 on response
    tokens. δ_t = r_t + γ V_{t+1} − V_t (V = 0 after the last token), A_t = δ_t + γλ A_{t+1}.
    Returns advantages and returns A_t + V_t, both [B, L] and 0 off the mask.
    """
    mask = mask.float()
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_mask = mask[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        running = delta + gamma * lam * running * next_mask
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float) -> Tensor:
    """Clipped value loss (OpenAI baselines' PPO2, as in Ziegler 2019's code): all inputs [B, L],
    ½ · mean over masked tokens of max((V − R)², (V_old + clip(V − V_old, ±c) − R)²)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def token_values(value_model: RewardModel, batch: PackedBatch, start: int) -> Tensor:
    """[B, L] V(x, y_<t): the value head read at the position that predicts response token t."""
    hidden = value_model.backbone(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids_from_mask(batch.attention_mask)
    ).last_hidden_state
    return value_model.head(hidden[:, start - 1 : -1]).squeeze(-1).float()


@dataclass
class PPOConfig(OnlineConfig):
    """PPO-RLHF with a value function, GAE and a KL penalty to the SFT policy."""

    value_clip: float = 0.2
    """How far a value may move from its rollout-time value before its loss is clipped."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount (1: the episode is one response)."""
    lam: float = 0.95
    """GAE λ."""
    whiten_advantages: bool = True
    """Normalise advantages over each rollout batch."""
    value_init: Literal["reward_model", "policy"] = "reward_model"
    """The value function: a copy of the helpfulness RM (InstructGPT), or a copy of the
    policy's backbone with a fresh scalar head."""
    value_lr: float = 1e-3
    """Learning rate of the value function (same schedule as the policy's)."""
    ptx_coef: float = 0.0
    """γ_ptx: weight of the SFT loss on the world's demonstrations mixed into every update (PPO-ptx)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_ratio=0.0, schedule="constant"))
    """Optimiser of the policy (on the quickstart, 3e-4 over-optimises the proxy: KL 1.6, win rate 0.52)."""

    def __post_init__(self):
        super().__post_init__()
        for key in ("value_clip", "value_lr"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}={getattr(self, key)} must be > 0")
        for key in ("vf_coef", "ptx_coef"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 0")
        for key in ("gamma", "lam"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"{key}={getattr(self, key)} must be in [0, 1]")
        if self.value_init not in ("reward_model", "policy"):
            raise ValueError(f"value_init={self.value_init!r} must be one of reward_model, policy")


class PPO(OnlineRLMethod):
    name = "ppo"
    config_class = PPOConfig

    def __init__(self, config: PPOConfig, context):
        super().__init__(config, context)
        if config.value_init == "reward_model":
            self.value_model = copy.deepcopy(context.proxy.helpfulness)
        else:
            self.value_model = RewardModel.from_policy(self.policy)
        self.value_model.train().requires_grad_(True)
        disable_dropout(self.value_model)  # the rollout's values and each update's are one function (value clipping compares them)
        if config.reward in ("gold", "judge") and config.value_init == "reward_model":
            self.budget.human_labels += context.reward_model_labels  # without the RM as reward, the value function still is one
        self._demonstrations: Iterator[PackedBatch] | None = None
        self._demonstration_batches_used = 0  # where a resumed run picks the demonstrations up
        if config.ptx_coef > 0:
            if context.world is None:
                log("ppo.ptx_coef > 0 needs demonstrations from the built-in world; this run has none, so PPO-ptx is off")
            else:
                self._demonstrations = self._demonstration_batches()

    def configure_optimizers(self):
        # The value function gets its own learning rate: it starts far from the returns it must fit.
        config = adamw_with_schedule(self.policy.parameters(), self.config.optim, self.trainer.max_steps)
        optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
        optimizer.add_param_group({"params": list(self.value_model.parameters()), "lr": self.config.value_lr})
        config["lr_scheduler"]["scheduler"] = type(scheduler)(optimizer, scheduler.lr_lambdas[0])
        return config

    def _demonstration_batches(self) -> Iterator[PackedBatch]:
        """Endless minibatches of the world's (noisy) demonstrations on fresh training prompts."""
        c, ctx = self.config, self.context
        rng = np.random.default_rng(ctx.seed)
        prompts = ctx.sample_train_prompts(c.iterations * c.batch_size, seed=1000 * ctx.seed + 2)
        prompt_ids = ctx.codec.encode_prompts(prompts)
        response_ids = ctx.codec.encode_responses([ctx.world.demonstrate(p, rng) for p in prompts])
        while True:
            for s in range(0, len(prompts), c.minibatch_size):
                yield pack_sequences(prompt_ids[s : s + c.minibatch_size], response_ids[s : s + c.minibatch_size], ctx.codec.pad_token_id, max_length=c.max_length)

    def ptx_loss(self) -> Tensor:
        """Mean NLL per response token of the next demonstration minibatch."""
        batch = next(self._demonstrations).to(self.device)
        self._demonstration_batches_used += 1
        self.budget.train_tokens += int(batch.attention_mask.sum())
        return response_nll(self.policy, batch)[0]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ppo"] = {"demonstration_batches": self._demonstration_batches_used}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self._demonstrations is not None:  # the endless demonstration stream, advanced to where it was
            self._demonstrations = self._demonstration_batches()
            for _ in range(checkpoint["ppo"]["demonstration_batches"]):
                next(self._demonstrations)
            self._demonstration_batches_used = checkpoint["ppo"]["demonstration_batches"]

    def prepare(self, rollout: Rollout, kl_coef: float) -> dict[str, Tensor]:
        """Values at rollout time, then GAE on the per-token rewards (−β·k1 on every token, r on EOS)."""
        c, mask = self.config, rollout.mask
        old_values = token_values(self.value_model, rollout.batch, rollout.start) * mask
        rewards = kl_penalised_rewards(rollout.rewards, rollout.kl, mask, kl_coef)
        advantages, returns = gae(rewards, old_values, mask, c.gamma, c.lam)
        if c.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        return {"advantages": advantages, "returns": returns, "old_values": old_values}

    def update_loss(self, batch: PackedBatch, rollout: Rollout, idx: Tensor, prepared: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The clipped surrogate plus the clipped value loss (and PPO-ptx's SFT loss)."""
        c = self.config
        loss, terms = super().update_loss(batch, rollout, idx, prepared)
        values = token_values(self.value_model, batch, rollout.start)
        value_loss = ppo_value_loss(values, prepared["old_values"][idx], prepared["returns"][idx], rollout.mask[idx], c.value_clip)
        loss = loss + c.vf_coef * value_loss
        terms["value_loss"] = value_loss.detach()
        if self._demonstrations is not None:
            ptx = self.ptx_loss()
            loss = loss + c.ptx_coef * ptx
            terms["ptx_loss"] = ptx.detach()
        return loss, terms
