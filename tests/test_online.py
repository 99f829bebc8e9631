"""The online family on hand-computed numbers: group advantages (GRPO, Dr. GRPO), the RLOO
baseline, REINFORCE++'s batch-whitened returns, the k3 KL estimator against an exact KL, the
loss aggregations, clip-higher, online DPO's pairs; and each method raising the reward of a
bandit task (reward 1 when one word appears) through its own Lightning training step."""

import math
from types import SimpleNamespace

import pytest
import torch

from alignbench.methods.grpo import GRPO, GRPOConfig, group_advantages
from alignbench.methods.online import (
    aggregate_loss, clipped_surrogate, k3_kl, normalize_rewards, policy_loss, transform_rewards,
)
from alignbench.methods.online_dpo import OnlineDPO, OnlineDPOConfig, pair_logps
from alignbench.methods.reinforce_pp import ReinforcePP, ReinforcePPConfig, reinforce_pp_advantages
from alignbench.methods.rloo import RLOO, RLOOConfig, leave_one_out_advantages
from alignbench.training import OptimConfig, TrainerConfig, make_trainer
from tests.test_ppo import _bandit_context


def test_group_normalisation_and_grpo_advantages_match_hand_values_and_an_all_equal_group_gets_zero():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.6]])
    normalised = normalize_rewards(rewards, "group")
    s = math.sqrt(1 / 3)  # Bessel std of (1, 0, 0, 1): sqrt(4 · 0.25 / 3)
    s3 = math.sqrt((3 * 0.15**2 + 0.45**2) / 3)  # of (0, 0, 0, 0.6), mean 0.15
    expected = torch.tensor([[0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], [0.0] * 4, [-0.15 / s3] * 3 + [0.45 / s3]])
    torch.testing.assert_close(normalised, expected, atol=1e-3, rtol=1e-3)  # ε = 1e-4 in the denominator
    assert torch.isfinite(normalised).all() and (normalised[1] == 0).all()
    torch.testing.assert_close(group_advantages(normalised), normalised, atol=1e-6, rtol=0)  # already centred
    # Dr. GRPO: no std, only the group mean removed
    torch.testing.assert_close(group_advantages(normalize_rewards(rewards, "none")),
                               torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.15, -0.15, -0.15, 0.45]]))
    batch = normalize_rewards(rewards, "batch")
    assert abs(batch.mean().item()) < 1e-6 and abs(batch.std().item() - 1) < 1e-3


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [3.0, 3.0, 3.0]])
    # 1 − (2 + 6)/2, 2 − (1 + 6)/2, 6 − (1 + 2)/2
    torch.testing.assert_close(leave_one_out_advantages(rewards), torch.tensor([[-3.0, -1.5, 4.5], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(leave_one_out_advantages(rewards), 3 / 2 * (rewards - rewards.mean(dim=1, keepdim=True)))


def test_reinforce_pp_returns_to_go_are_whitened_over_the_whole_batch():
    rewards = torch.tensor([[0.0, -0.1, 1.0], [-0.2, 2.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    returns = torch.tensor([0.9, 0.9, 1.0, 1.8, 2.0])  # reward to go (γ = 1), row 1's padding ignored
    std = returns.std(unbiased=False)
    expected = torch.zeros(2, 3)
    expected[mask.bool()] = (returns - returns.mean()) / std
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, gamma=1.0), expected, atol=1e-5, rtol=1e-5)


def test_k3_is_an_unbiased_estimate_of_the_kl_of_a_small_discrete_policy():
    policy = torch.tensor([0.5, 0.3, 0.15, 0.05])
    reference = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = (policy * (policy / reference).log()).sum().item()
    draws = torch.multinomial(policy, 400_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimates = k3_kl(policy.log()[draws], reference.log()[draws])
    assert (estimates >= 0).all()
    assert abs(estimates.mean().item() - exact) < 3 * estimates.std().item() / math.sqrt(len(draws))  # within 3 standard errors
    assert abs(estimates.mean().item() - exact) / exact < 0.01
    # exact expectation over the distribution: E_π[k3] = KL(π‖π_ref)
    assert math.isclose((policy * k3_kl(policy.log(), reference.log())).sum().item(), exact, rel_tol=1e-5)


def test_loss_aggregations_token_mean_sequence_mean_and_dr_grpo_constant():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert math.isclose(aggregate_loss(per_token, mask, "token_mean", 10).item(), (1 + 2 + 3 + 4) / 4)
    assert math.isclose(aggregate_loss(per_token, mask, "sequence_mean", 10).item(), (6 / 3 + 4 / 1) / 2)
    assert math.isclose(aggregate_loss(per_token, mask, "constant", 10).item(), (6 + 4) / (2 * 10))


def test_clip_higher_clips_the_ratio_asymmetrically():
    ratio = torch.tensor([[1.25, 1.25, 0.75, 0.75]])
    logprobs, old = ratio.log(), torch.zeros(1, 4)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    # symmetric ε = 0.2: 1.25 is clipped to 1.2 (A > 0) and 0.75 to 0.8 (A < 0)
    loss, clipped = clipped_surrogate(logprobs, old, advantages, 0.2, 0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -1.2, 0.8, 0.8]]))
    assert clipped.tolist() == [[1.0, 1.0, 1.0, 1.0]]
    # ε_low 0.2, ε_high 0.28: the upper clip no longer binds at 1.25; the lower one still does at 0.75
    loss, clipped = clipped_surrogate(logprobs, old, advantages, 0.2, 0.28)
    torch.testing.assert_close(loss, torch.tensor([[-1.25, -1.25, 0.8, 0.8]]))
    assert clipped.tolist() == [[0.0, 0.0, 1.0, 1.0]]
    mean, frac = policy_loss(logprobs, old, advantages, torch.ones(1, 4), 0.2, 0.28)
    assert math.isclose(mean.item(), (-2.5 + 1.6) / 4, rel_tol=1e-6) and math.isclose(frac.item(), 0.5)


def test_plain_whitening_keeps_gold_steps_proportional():
    gold = torch.tensor([0.0, 0.5, 0.9, 1.0])
    whitened = transform_rewards(gold, "whiten")
    # a step from 0.9 to 1.0 weighs a quarter of one from 0.5 to 0.9, as in the gold reward itself
    assert math.isclose(((whitened[3] - whitened[2]) / (whitened[2] - whitened[1])).item(), 0.25, rel_tol=1e-5)
    logit = transform_rewards(gold, "logit_whiten")
    assert ((logit[3] - logit[2]) / (logit[2] - logit[1])).item() > 5  # what ppo_oracle used to optimise


def test_online_dpo_orders_each_pair_by_the_reward():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, 0.0], [-3.0, 0.0], [-1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    chosen, rejected = pair_logps(logprobs, mask, torch.tensor([True, False]))
    torch.testing.assert_close(chosen, torch.tensor([-3.0, -2.0]))
    torch.testing.assert_close(rejected, torch.tensor([-0.5, -3.0]))


def test_configs_reject_bad_values_naming_the_key():
    with pytest.raises(ValueError, match="loss_aggregation='seq'"):
        GRPOConfig(loss_aggregation="seq")
    with pytest.raises(ValueError, match="samples_per_prompt=1"):
        GRPOConfig(samples_per_prompt=1)
    with pytest.raises(ValueError, match="minibatch_size=30 must be a multiple of samples_per_prompt=4"):
        GRPOConfig(minibatch_size=30)
    with pytest.raises(ValueError, match="samples_per_prompt=1"):
        RLOOConfig(samples_per_prompt=1)
    with pytest.raises(ValueError, match="kl_penalty='loss'"):
        ReinforcePPConfig(kl_penalty="loss")
    with pytest.raises(ValueError, match="samples_per_prompt=3"):
        OnlineDPOConfig(samples_per_prompt=3, minibatch_size=60)
    with pytest.raises(ValueError, match="max_kl=0.5 with temperature=0.7"):
        GRPOConfig(max_kl=0.5, temperature=0.7)
    with pytest.raises(ValueError, match="reward='verifier'"):
        RLOOConfig(reward="verifier")


def _fit_bandit(method_cls, config):
    """Train `method_cls` on the bandit (reward 1 when 'apple' appears); reward before, after."""
    torch.manual_seed(0)
    context = _bandit_context("apple")
    module = method_cls(config, context)
    assert context.budget.human_labels == 0  # the verifier spends no reward-model labels
    probe = context.sample_train_prompts(128, seed=99)
    before = module.generate_and_score(probe).scores.mean().item()

    def fit(datamodule, epochs):
        trainer = make_trainer(TrainerConfig(progress_bar=False), max_steps=len(datamodule.train_dataloader()) * epochs, max_epochs=epochs, grad_clip=0.0)
        trainer.fit(module, datamodule=datamodule)
        module.fitted_steps = trainer.global_step

    module.train_policy(fit)
    after = module.generate_and_score(probe).scores.mean().item()
    assert module.fitted_steps == config.iterations  # one Lightning step per iteration
    g = config.samples_per_prompt
    assert context.budget.policy_samples == config.iterations * config.batch_size * g + 2 * len(probe) * g
    return before, after


OPTIM = OptimConfig(lr=3e-3, warmup_ratio=0.0, schedule="constant", grad_clip=1.0)


@pytest.mark.parametrize("method_cls, config", [
    (GRPO, GRPOConfig(iterations=15, batch_size=8, samples_per_prompt=4, minibatch_size=16, reward="gold", init_kl_coef=0.0, optim=OPTIM)),
    # Dr. GRPO's updates are smaller (no std division, token sums over a constant 8): a larger step
    (GRPO, GRPOConfig(iterations=15, batch_size=8, samples_per_prompt=4, minibatch_size=16, reward="gold", init_kl_coef=0.0, ppo_epochs=4,
                      optim=OptimConfig(lr=1e-2, warmup_ratio=0.0, schedule="constant", grad_clip=1.0),
                      reward_normalization="none", loss_aggregation="constant", clip_range_high=0.28, dynamic_sampling=True)),
    (RLOO, RLOOConfig(iterations=15, batch_size=8, samples_per_prompt=4, minibatch_size=16, reward="gold", init_kl_coef=0.0, optim=OPTIM)),
    (ReinforcePP, ReinforcePPConfig(iterations=15, batch_size=32, minibatch_size=16, reward="gold", init_kl_coef=0.01, ppo_epochs=4, optim=OPTIM)),
    (OnlineDPO, OnlineDPOConfig(iterations=15, batch_size=16, minibatch_size=8, ppo_epochs=2, reward="gold", beta=0.1, optim=OPTIM)),
], ids=["grpo", "dr_grpo_dapo", "rloo", "reinforce_pp", "online_dpo"])
def test_each_online_method_raises_the_reward_of_a_bandit_task(method_cls, config):
    before, after = _fit_bandit(method_cls, config)
    assert before < 0.1 and after > 0.5, (before, after)


def test_online_methods_train_without_dropout_so_the_rollouts_log_probs_are_the_updates():
    """A policy with dropout (a Llama's attention dropout, a GPT-2's nn.Dropout modules) is sampled,
    scored as π_old and updated as one function: the online base switches its dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from alignbench.methods.online import response_token_logprobs
    from alignbench.models import disable_dropout

    context = _bandit_context("apple")
    with_dropout = context.load_policy()
    for module in with_dropout.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    context.load_policy = lambda trainable=True: with_dropout.train()
    module = GRPO(GRPOConfig(iterations=1, batch_size=4, samples_per_prompt=2, minibatch_size=8, reward="gold"), context)
    assert module.policy.training and all(m.attention_dropout == 0.0 for m in module.policy.modules() if hasattr(m, "attention_dropout"))
    rollout = module.generate_and_score(context.sample_train_prompts(4, seed=1))
    assert torch.equal(response_token_logprobs(module.policy, rollout.batch, rollout.start), rollout.logprobs)  # ratio exactly 1 at the first update

    from alignbench.methods.ppo import PPO, PPOConfig
    from alignbench.models import RewardModel

    helpfulness = RewardModel.from_policy(_bandit_context("apple").load_policy())
    for module in helpfulness.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    context.proxy = SimpleNamespace(helpfulness=helpfulness)  # PPO's value model starts from a copy of it
    ppo = PPO(PPOConfig(iterations=1, batch_size=4, minibatch_size=4, reward="gold", value_init="reward_model"), context)
    assert ppo.value_model.training and all(m.attention_dropout == 0.0 for m in ppo.value_model.modules() if hasattr(m, "attention_dropout"))

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)).train()
    ids = torch.randint(0, 32, (2, 8))
    assert not torch.equal(gpt2(ids).logits, gpt2(ids).logits)  # dropout draws new masks
    disable_dropout(gpt2)
    assert gpt2.training and torch.equal(gpt2(ids).logits, gpt2.eval()(ids).logits)
