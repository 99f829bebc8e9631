"""PPO-RLHF: GAE, the clipped losses, the KL controllers and reward shaping on hand-computed
numbers; the rollout layout against the shared log-prob helper; and PPO raising the reward
of a tiny bandit-like task through the method's own Lightning training step."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from alignbench.evaluation import EvalConfig
from alignbench.logprobs import pack_sequences, sequence_logprobs
from alignbench.methods.online import (
    AdaptiveKLController, FixedKLController, kl_penalised_rewards, pack_rollout, policy_loss, response_token_logprobs, transform_rewards,
)
from alignbench.methods.ppo import PPO, PPOConfig, gae, ppo_value_loss
from alignbench.models import TextCodec, build_tiny_policy, build_world_tokenizer, freeze
from alignbench.training import Budget, OptimConfig, TrainerConfig, make_trainer
from alignbench.world import AssistantWorld


def test_gae_matches_hand_computed_advantages_and_returns_and_ignores_padding():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.1, -0.5, 9.0]])  # row 1: 2 tokens, garbage on the padding
    values = torch.tensor([[0.5, 0.2, 0.4], [0.3, 0.6, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    # row 0: δ2 = 1 − 0.4; δ1 = 0.9·0.4 − 0.2; δ0 = 0.9·0.2 − 0.5; A_t = δ_t + 0.72·A_{t+1}
    a2 = 0.6
    a1 = 0.16 + 0.72 * a2
    a0 = -0.32 + 0.72 * a1
    # row 1 ends after token 1: δ1 = −0.5 − 0.6 (nothing after it), δ0 = 0.1 + 0.9·0.6 − 0.3
    b1 = -1.1
    b0 = 0.34 + 0.72 * b1
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, a2], [b0, b1, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.4], [b0 + 0.3, b1 + 0.6, 0.0]]))


def test_gae_with_gamma_and_lambda_one_is_the_reward_to_go_minus_the_value():
    rewards, values, mask = torch.tensor([[0.2, -0.1, 1.0]]), torch.tensor([[0.3, 0.1, -0.4]]), torch.ones(1, 3)
    advantages, returns = gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(returns, torch.tensor([[1.1, 0.9, 1.0]]))
    torch.testing.assert_close(advantages, returns - values)


def test_policy_loss_takes_the_pessimistic_branch_on_both_sides_of_the_clip():
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5]])
    old = torch.zeros(1, 4)
    logprobs = ratio.log().requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0, -2.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    loss, clip_frac = policy_loss(logprobs, old, advantages, mask, clip_low=0.2)
    # A > 0, ρ = 1.5: clipped at 1.2 -> −1.2; A > 0, ρ = 0.5: the unclipped −0.5 is larger;
    # A < 0, ρ = 0.5: clipped at 0.8 -> 1.6
    assert math.isclose(loss.item(), (-1.2 - 0.5 + 1.6) / 3, rel_tol=1e-6)
    assert math.isclose(clip_frac.item(), 2 / 3, rel_tol=1e-6)
    loss.backward()
    # no gradient through the clipped tokens or the padding; −A·ρ/3 on the unclipped one
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -0.5 / 3, 0.0, 0.0]]))


def test_value_loss_takes_the_larger_of_the_clipped_and_unclipped_errors():
    old = torch.zeros(1, 4)
    values = torch.tensor([[0.5, -0.5, 0.1, 3.0]])
    returns = torch.tensor([[1.0, 0.1, 0.3, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss = ppo_value_loss(values, old, returns, mask, clip=0.2)
    # token 0: clipped V = 0.2, (0.2 − 1)² = 0.64 > 0.25; token 1: unclipped 0.36 > (−0.2 − 0.1)² = 0.09;
    # token 2: within the clip, 0.04 either way; token 3 is padding
    assert math.isclose(loss.item(), 0.5 * (0.64 + 0.36 + 0.04) / 3, rel_tol=1e-6)


def test_adaptive_kl_controller_follows_ziegler_update_rule():
    controller = AdaptiveKLController(0.1, target=1.0, horizon=100)
    controller.update(1.5, n_steps=10)  # error 0.5 clipped to 0.2: β · (1 + 0.2 · 10/100)
    assert math.isclose(controller.value, 0.1 * 1.02)
    controller.update(0.9, n_steps=10)  # error −0.1
    assert math.isclose(controller.value, 0.1 * 1.02 * 0.99)
    controller.update(0.0, n_steps=50)  # error −1 clipped to −0.2
    assert math.isclose(controller.value, 0.1 * 1.02 * 0.99 * 0.9)
    fixed = FixedKLController(0.05)
    fixed.update(10.0, n_steps=1000)
    assert fixed.value == 0.05


def test_reward_transform_whitens_the_logit_of_the_probability():
    p = torch.sigmoid(torch.tensor([0.0, 1.0, -1.0]))
    s = math.sqrt(2 / 3)  # population std of (0, 1, −1)
    torch.testing.assert_close(transform_rewards(p, "logit_whiten"), torch.tensor([0.0, 1 / s, -1 / s]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(transform_rewards(p, "none"), p)
    saturated = transform_rewards(torch.tensor([0.0, 1.0, 0.5]), "logit_whiten")
    assert torch.isfinite(saturated).all() and saturated[1] > saturated[2] > saturated[0]


def test_reward_goes_on_the_last_token_and_the_kl_penalty_on_every_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, -0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = kl_penalised_rewards(torch.tensor([1.0, 2.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.25, 0.25 + 2.0, 0.0]]))


def test_rollout_layout_scores_each_response_token_like_the_shared_helper(tiny_gpt2):
    prompts, responses = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9]]
    batch, start = pack_rollout(prompts, responses, pad_token_id=0)
    assert start == 3 and batch.input_ids.tolist() == [[1, 2, 3, 5, 6, 0], [0, 0, 4, 7, 8, 9]]
    per_token = response_token_logprobs(tiny_gpt2, batch, start)  # [B, L], column t = token t
    reference, _ = sequence_logprobs(tiny_gpt2, pack_sequences(prompts, responses, pad_token_id=0))
    for row, (p, r) in enumerate(zip(prompts, responses)):
        torch.testing.assert_close(per_token[row, : len(r)], reference[row, len(p) : len(p) + len(r)], atol=1e-5, rtol=1e-5)
    assert per_token[0, 2] == 0


def test_config_rejects_bad_values_naming_the_key():
    with pytest.raises(ValueError, match="clip_range=0"):
        PPOConfig(clip_range=0)
    with pytest.raises(ValueError, match="minibatch_size=128 must be <= batch_size=64"):
        PPOConfig(minibatch_size=128)
    with pytest.raises(ValueError, match="lam=1.5"):
        PPOConfig(lam=1.5)
    with pytest.raises(ValueError, match="reward='human'"):
        PPOConfig(reward="human")


def _bandit_context(word: str, max_new_tokens: int = 8):
    """What PPO uses of a RunContext, for a world-tiny policy (random init, no SFT) whose
    gold reward is 1 when `word` appears in the response."""
    world = AssistantWorld()
    codec = TextCodec(build_world_tokenizer(world.vocabulary()))
    policy = build_tiny_policy("world-tiny", codec.tokenizer, seed=0)
    judge = SimpleNamespace(score_batch=lambda prompts, responses: [float(word in y.split()) for y in responses])
    return SimpleNamespace(
        seed=0, codec=codec, world=world, reference=freeze(copy.deepcopy(policy)), gold_judge=judge, budget=Budget(),
        reward_model_labels=1000, eval_config=EvalConfig(max_new_tokens=max_new_tokens, batch_size=256),
        load_policy=lambda trainable=True: copy.deepcopy(policy).train(),
        sample_train_prompts=lambda n, seed: world.sample_prompts("train", n, seed=seed),
        harmful_of=world.is_harmful,
    )


def test_ppo_raises_the_reward_of_a_bandit_task():
    torch.manual_seed(0)
    context = _bandit_context("apple")
    config = PPOConfig(
        iterations=15, batch_size=32, minibatch_size=16, reward="gold", reward_transform="none", value_init="policy",
        init_kl_coef=0.01, optim=OptimConfig(lr=3e-3, warmup_ratio=0.0, schedule="constant", grad_clip=1.0), value_lr=1e-2,
    )
    module = PPO(config, context)
    assert context.budget.human_labels == 0  # the gold oracle spends no reward-model labels
    before_params = [p.detach().clone() for p in module.policy.parameters()]
    probe = context.sample_train_prompts(256, seed=99)
    before = module.generate_and_score(probe).scores.mean().item()

    def fit(datamodule, epochs):  # as the runner's Fitter builds the trainer: no Lightning clipping under manual optimisation
        assert not module.automatic_optimization
        trainer = make_trainer(TrainerConfig(progress_bar=False), max_steps=len(datamodule.train_dataloader()) * epochs, max_epochs=epochs, grad_clip=0.0)
        trainer.fit(module, datamodule=datamodule)
        module.fitted_steps = trainer.global_step
        module.learning_rates = [group["lr"] for group in trainer.optimizers[0].param_groups]

    module.train_policy(fit)
    after = module.generate_and_score(probe).scores.mean().item()
    assert module.fitted_steps == config.iterations  # one Lightning step per PPO iteration
    assert module.learning_rates == [3e-3, 1e-2]  # policy, value function
    assert module.max_grad_norm == 1.0  # the method clips its own updates
    assert any(not torch.equal(a, b) for a, b in zip(before_params, module.policy.parameters()))
    assert before < 0.1 and after > 0.5, (before, after)
    assert context.budget.policy_samples == config.iterations * config.batch_size + 2 * len(probe)
