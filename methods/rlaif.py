"""RLAIF (Lee et al. 2023): reinforcement learning from AI feedback.

The AI labeler (alignbench.stages.ai_labeler: a language model queried through `LMJudge`)
labels the same sampled pairs that the human annotators labelled. Its labels are soft — the
judge's probability that one response is better by the world's general rule, averaged over
both presentation orders (position bias cancels) — and a reward model is
trained on them with the cross-entropy against those probabilities. PPO then optimises that
reward model's score minus the KL penalty to the SFT policy, exactly as PPO-RLHF does.

    rlaif         AI labels → reward model → PPO
    rlhf_one_rm   human labels of the same n pairs → reward model → PPO: RLAIF's control at
                  equal label count (hard labels, one reward model, no margin)
    rlaif_direct  direct RLAIF (d-RLAIF): no reward model; the labeler rates each rollout
                  (0..10) and the expected rating, scaled to [0, 1], is the reward

Budgets: AI labels count in `budget/ai_labels` (for d-RLAIF, one per rollout rated), human
labels in `budget/human_labels`; `rm/optimised_accuracy` is the held-out accuracy against gold
of the reward model this run optimises (`rm/*` otherwise describe the shared reward models,
which give every run's `eval/proxy_reward`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

from alignbench.config import ConfigError
from alignbench.methods.ppo import PPO, PPOConfig
from alignbench.reward import ProxyReward
from alignbench.stages.pair_reward_model import pair_reward_model


@dataclass
class RLAIFConfig(PPOConfig):
    """PPO on a reward model trained on the first `n_labels` shared pairs, labelled by the AI labeler."""

    n_labels: int = 4000
    """Label budget: the first n of the pairs the human annotators labelled (0: all of them)."""

    def __post_init__(self):
        super().__post_init__()
        if self.n_labels < 0:
            raise ValueError(f"n_labels={self.n_labels} must be >= 0 (0: every labelled pair)")
        if self.reward != "proxy":
            raise ValueError(f"reward={self.reward!r}: this method trains its own reward model; keep reward=proxy")


class RLAIF(PPO):
    name = "rlaif"
    config_class = RLAIFConfig
    labeler: ClassVar[Literal["ai", "human"]] = "ai"

    def __init__(self, config: RLAIFConfig, context):
        if context.stages is None:
            raise ConfigError(f"{self.name} builds a reward model through the run's stages; run it with `alignbench run`")
        reward_model, summary = pair_reward_model(context.stages, self.labeler, config.n_labels)
        # This run's reward is its own reward model; the shared human RMs stay the evaluation's proxy.
        own = dataclasses.replace(context, proxy=ProxyReward(context.codec, reward_model, max_length=context.config.reward_model.max_length), reward_model_labels=0)
        super().__init__(config, own)
        if self.labeler == "ai":
            self.budget.ai_labels += summary["labels"]
        else:
            self.budget.human_labels += summary["labels"]
        if "rm/accuracy" in summary:  # rm/* stay the shared RMs' (the evaluation's proxy); this run's own:
            context.rm_metrics["rm/optimised_accuracy"] = summary["rm/accuracy"]


class RLHFOneRM(RLAIF):
    name = "rlhf_one_rm"
    labeler = "human"


@dataclass
class RLAIFDirectConfig(PPOConfig):
    """PPO whose reward is the AI labeler's rating of each rollout (no reward model): the online
    base's `reward: judge` source, with the value function started from the policy."""

    reward: Literal["proxy", "helpfulness", "gold", "judge"] = "judge"
    """The AI labeler's expected rating (0..10, scaled to [0, 1]), used as it is (Lee et al.)."""
    value_init: Literal["reward_model", "policy"] = "policy"
    """There is no reward model to start the value function from: a copy of the policy's backbone."""

    def __post_init__(self):
        super().__post_init__()
        if self.reward != "judge":
            raise ValueError(f"reward={self.reward!r}: rlaif_direct is PPO on the AI labeler's rating; keep reward=judge (or run ppo with reward={self.reward})")
        if self.value_init != "policy":
            raise ValueError("rlaif_direct has no reward model to initialise the value function from; keep value_init=policy")


class RLAIFDirect(PPO):
    name = "rlaif_direct"
    config_class = RLAIFDirectConfig
