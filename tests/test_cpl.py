"""CPL and CPL-KL: the objective and the score against hand values, the method's step, its configs,
and a tiny fit."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from alignbench.config import describe
from alignbench.data import PreferenceDataModule, preference_rows
from alignbench.logprobs import PackedBatch, pack_sequences, sequence_logprobs
from alignbench.methods.cpl import CPL, CPLKL, CPLConfig, CPLKLConfig, cpl_loss, cpl_score
from alignbench.methods.dpo import dpo_loss
from alignbench.models import build_tiny_policy
from alignbench.sft import response_nll
from alignbench.training import Budget, OptimConfig

REFUSAL = "sorry i can not help with that"


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# --- the objective and the score -----------------------------------------------------------------


def test_unbiased_cpl_loss_is_log2_at_equal_scores():
    s = torch.tensor([-3.0, 0.7, 12.0])
    loss, chosen, rejected, _ = cpl_loss(s, s.clone(), bias=1.0)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    assert torch.equal(chosen, s) and torch.equal(rejected, s)  # the scores are CPL's implicit rewards


def test_cpl_loss_matches_hand_values_with_the_conservative_bias():
    # λ = 0.5: logits λS⁻ − S⁺ = (−1 + 1, −0.5 + 2, −1.5 − 0.5) = (0, 1.5, −2)
    chosen, rejected = torch.tensor([-1.0, -2.0, 0.5]), torch.tensor([-2.0, -1.0, -3.0])
    loss, chosen_rewards, rejected_rewards, _ = cpl_loss(chosen, rejected, bias=0.5)
    assert math.isclose(loss.item(), (math.log(2) + softplus(1.5) + softplus(-2.0)) / 3, rel_tol=1e-6)
    assert torch.equal(chosen_rewards, chosen) and torch.equal(rejected_rewards, rejected)  # unbiased: S⁺ > S⁻ in 2 of 3
    # The bias is conservative: equal negative scores (log-probs are < 0) still cost more than log 2,
    # so the loss keeps raising the chosen likelihood itself, not only the gap.
    equal = cpl_loss(torch.tensor([-2.0]), torch.tensor([-2.0]), bias=0.5).loss
    assert math.isclose(equal.item(), softplus(1.0), rel_tol=1e-6)


def test_gradient_raises_chosen_and_lowers_rejected_log_probs():
    alpha, bias = 0.1, 0.5
    chosen = torch.tensor([-3.0], requires_grad=True)
    rejected = torch.tensor([-3.0], requires_grad=True)
    loss = cpl_loss(alpha * chosen, alpha * rejected, bias).loss
    loss.backward()
    sigma = 1 / (1 + math.exp(-0.15))  # σ(λαlogπ⁻ − αlogπ⁺) = σ(−0.15 + 0.3)
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descent raises log π(y⁺), lowers log π(y⁻)
    assert math.isclose(chosen.grad.item(), -alpha * sigma, rel_tol=1e-6)
    assert math.isclose(rejected.grad.item(), bias * alpha * sigma, rel_tol=1e-6)  # λ times weaker push down


def test_score_discounts_each_response_from_its_own_first_token():
    # Row 0: prompt at column 0, response at 1..3, padding at 4. Row 1: prompt at 0..1, response at 2..4.
    token_logps = torch.tensor([[0.0, -1.0, -2.0, -4.0, 0.0], [0.0, 0.0, -1.0, -1.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    score = cpl_score(token_logps, mask, alpha=2.0, gamma=0.5)
    assert torch.allclose(score, torch.tensor([2 * (-1 - 1 - 1), 2 * (-1 - 0.5 - 0.25)]))  # [-6, -3.5]
    score.sum().backward()
    assert torch.allclose(token_logps.grad, torch.tensor([[0, 2, 1, 0.5, 0], [0, 0, 2, 1, 0.5]]))
    assert torch.allclose(cpl_score(token_logps, mask, alpha=2.0), torch.tensor([-14.0, -6.0]))  # γ = 1: α Σ


def test_undiscounted_score_is_alpha_times_the_summed_log_probs(tiny_gpt2):
    batch = pack_sequences([[1, 2], [3], [4, 5, 6]], [[7, 8, 9], [10], [11, 12]], pad_token_id=0)
    per_token, summed = sequence_logprobs(tiny_gpt2, batch)
    assert torch.allclose(cpl_score(per_token, batch.response_mask, alpha=0.1), 0.1 * summed, atol=1e-6)


# --- the method's step --------------------------------------------------------------------------


def pairs(world, prompts):
    return preference_rows([{"prompt": p, "chosen": world.ideal_response(p), "rejected": REFUSAL} for p in prompts])


def make_method(cls, config, codec, policy, reference=None, preferences=None):
    """A method on a stand-in run context: the policy, the reference, the pairs and a budget."""
    context = SimpleNamespace(
        load_policy=lambda trainable: policy, reference=reference, budget=Budget(), codec=codec, preferences=preferences, seed=0,
    )
    return cls(config, context)


@pytest.fixture(scope="module")
def step_batch(world, codec):
    prompts = [p for p in world.sample_prompts("train", 40, seed=3) if not world.is_harmful(p)][:6]
    return next(iter(PreferenceDataModule(pairs(world, prompts), codec, batch_size=6, max_length=40, shuffle=False).train_dataloader()))


def run_step(method, batch):
    logged = {}
    method.log_terms = lambda metrics, batch_size: logged.update(metrics)
    return method.training_step(batch, 0), logged


def test_cpl_kl_step_scores_against_the_reference_and_is_dpo_without_bias(codec, step_batch):
    policy = build_tiny_policy("world-tiny", codec.tokenizer, seed=0)
    ref_a = build_tiny_policy("world-tiny", codec.tokenizer, seed=1).eval()
    ref_b = build_tiny_policy("world-tiny", codec.tokenizer, seed=2).eval()
    config = CPLKLConfig(alpha=0.3, bias=1.0)
    with torch.no_grad():
        pol = sequence_logprobs(policy, step_batch.responses)[1]
        lp_a, lp_b = (sequence_logprobs(r, step_batch.responses)[1] for r in (ref_a, ref_b))
    c, r = step_batch.chosen, step_batch.rejected
    loss_a, logged_a = run_step(make_method(CPLKL, config, codec, policy, ref_a), step_batch)
    loss_b, logged_b = run_step(make_method(CPLKL, config, codec, policy, ref_b), step_batch)
    # Changing the reference moves each score by exactly α · (change of the reference's log-prob), negated.
    shift = logged_b["rewards_chosen"] - logged_a["rewards_chosen"]
    assert torch.allclose(shift, -config.alpha * (lp_b[c] - lp_a[c]).mean(), atol=1e-5)
    assert torch.allclose(logged_a["rewards_chosen"], config.alpha * (pol[c] - lp_a[c]).mean(), atol=1e-5)
    # λ = 1, γ = 1 and one step per response: CPL-KL is DPO with β = α.
    dpo = dpo_loss(pol[c], pol[r], lp_a[c], lp_a[r], beta=config.alpha).loss
    assert torch.allclose(loss_a, dpo, atol=1e-6)
    # With the reference equal to the policy every score is 0 and the loss log 2 whatever λ.
    loss_same, _ = run_step(make_method(CPLKL, CPLKLConfig(), codec, policy, copy.deepcopy(policy).eval()), step_batch)
    assert math.isclose(loss_same.item(), math.log(2), rel_tol=1e-6)


def test_cpl_step_logs_its_terms_and_uses_no_reference(codec, step_batch):
    policy = build_tiny_policy("world-tiny", codec.tokenizer, seed=0)
    method = make_method(CPL, CPLConfig(), codec, policy, reference=None)
    loss, logged = run_step(method, step_batch)
    assert set(logged) == {"loss", "cpl_loss", "bc_loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy"}
    with torch.no_grad():
        pol = sequence_logprobs(policy, step_batch.responses)[1]
    hand = torch.nn.functional.softplus(0.5 * 0.1 * pol[step_batch.rejected] - 0.1 * pol[step_batch.chosen]).mean()
    assert torch.allclose(loss, hand, atol=1e-6) and torch.allclose(logged["cpl_loss"], hand, atol=1e-6)
    assert method.budget.train_tokens == int(step_batch.responses.attention_mask.sum())
    assert not CPL.needs_reference and CPLKL.needs_reference and CPL.needs_token_logprobs
    scores = 0.1 * pol
    margin = scores[step_batch.chosen] - scores[step_batch.rejected]
    assert torch.allclose(logged["margin"], margin.mean(), atol=1e-6)
    assert torch.equal(logged["accuracy"], (margin > 0).float().mean())


def test_bc_term_is_the_per_token_nll_of_the_chosen_responses(codec, step_batch):
    policy = build_tiny_policy("world-tiny", codec.tokenizer, seed=0)
    r, c = step_batch.responses, step_batch.chosen
    with torch.no_grad():  # SFT's loss on the chosen side of the pairs
        nll = response_nll(policy, PackedBatch(r.input_ids[c], r.attention_mask[c], r.response_mask[c]))[0]
    warm, logged = run_step(make_method(CPL, CPLConfig(bc_steps=10), codec, policy), step_batch)  # step 0 < bc_steps
    assert torch.allclose(warm, nll, atol=1e-6) and torch.allclose(logged["bc_loss"], nll, atol=1e-6)
    mixed, logged = run_step(make_method(CPL, CPLConfig(bc_weight=0.5), codec, policy), step_batch)
    assert torch.allclose(mixed, logged["cpl_loss"] + 0.5 * nll, atol=1e-6)


# --- configs ------------------------------------------------------------------------------------


def test_defaults_follow_the_paper_and_the_authors_configs():
    cpl, kl = CPLConfig(), CPLKLConfig()
    assert (cpl.alpha, cpl.bias, cpl.gamma, cpl.bc_weight, cpl.bc_steps, cpl.optim.lr) == (0.1, 0.5, 1.0, 0.0, 0, 1e-4)
    assert (kl.alpha, kl.bias, kl.gamma) == (0.2, 0.75, 1.0)
    for cls, prefix in ((CPLConfig, "cpl"), (CPLKLConfig, "cpl_kl")):
        undocumented = [key for key, _, _, doc in describe(cls, prefix=prefix) if not doc]
        assert not undocumented, undocumented


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": 0.0}, r"alpha=0.0 must be a positive number"),
        ({"bias": 0.0}, r"bias=0.0 must be in \(0, 1\]"),
        ({"bias": 1.5}, r"bias=1.5 must be in \(0, 1\]"),
        ({"gamma": -0.1}, r"gamma=-0.1 must be in \(0, 1\]"),
        ({"bc_weight": -1.0}, r"bc_weight=-1.0 must be >= 0"),
        ({"bc_steps": -5}, r"bc_steps=-5 must be >= 0"),
        ({"epochs": 0}, r"epochs=0 must be >= 1"),
    ],
)
def test_bad_configs_name_the_key_the_value_and_the_accepted_range(kwargs, message):
    for cls in (CPLConfig, CPLKLConfig):
        with pytest.raises(ValueError, match=message):
            cls(**kwargs)


# --- a tiny fit ---------------------------------------------------------------------------------


def test_cpl_fit_on_a_tiny_model_learns_the_preference_and_generalises(world, codec):
    """Chosen = the ideal answer, rejected = a refusal: trained by Lightning with the paper's α and λ,
    held-out ideal answers gain likelihood and refusals lose it, the loss falls, the parameters moved."""
    torch.manual_seed(0)
    policy = build_tiny_policy("world-tiny", codec.tokenizer, seed=0)
    before = [p.detach().clone() for p in policy.parameters()]
    train = pairs(world, [p for p in world.sample_prompts("train", 300, seed=1) if not world.is_harmful(p)])
    held_out = PreferenceDataModule(
        pairs(world, [p for p in world.sample_prompts("test", 100, seed=1) if not world.is_harmful(p)]), codec, 64, 40, shuffle=False
    )

    def held_out_logprobs():  # [P] chosen, [P] rejected summed log-probs of the held-out pairs
        with torch.no_grad():
            batches = list(held_out.train_dataloader())
            lp = [sequence_logprobs(policy, b.responses)[1] for b in batches]
            return torch.cat([x[b.chosen] for x, b in zip(lp, batches)]), torch.cat([x[b.rejected] for x, b in zip(lp, batches)])

    config = CPLConfig(batch_size=16, max_length=40, epochs=2, kl_every=0, optim=OptimConfig(lr=3e-3, warmup_ratio=0.0))
    method = make_method(CPL, config, codec, policy, preferences=train)
    chosen_0, rejected_0 = held_out_logprobs()
    history = []
    log_terms = method.log_terms  # record every step's terms, and still log them through Lightning
    method.log_terms = lambda metrics, batch_size: (history.append({k: v.item() for k, v in metrics.items()}), log_terms(metrics, batch_size))
    data = method.datamodule()
    trainer = L.Trainer(max_steps=len(data.train_dataloader()) * config.epochs, max_epochs=config.epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", log_every_n_steps=1)  # statistics reach Lightning on logging steps
    trainer.fit(method, datamodule=data)
    chosen_1, rejected_1 = held_out_logprobs()
    # Scored without a reference, the short ideal answers outrank the 8-token refusal from the start, so what
    # is learned is read off the change: held-out ideal answers gained likelihood, refusals lost it.
    assert ((chosen_1 - chosen_0) - (rejected_1 - rejected_0) > 0).float().mean() > 0.95
    assert (chosen_1 > chosen_0).float().mean() > 0.95 and (rejected_1 < rejected_0).float().mean() > 0.95
    assert history[-1]["bc_loss"] < history[0]["bc_loss"]  # λ < 1 keeps raising the chosen likelihood itself
    assert sum(h["cpl_loss"] for h in history[-5:]) / 5 < 0.5 * history[0]["cpl_loss"]
    assert {"train/loss", "train/cpl_loss", "train/bc_loss", "train/margin", "train/accuracy"} <= set(trainer.callback_metrics)
    assert method.budget.human_labels == data.num_pairs
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
