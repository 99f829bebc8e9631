"""The offline objectives (IPO, SLiC-HF, SimPO, ORPO, KTO; DPO's label smoothing and soft labels)
against hand values, their fixed points and gradient directions; the offline bases' step (what
`loss` receives, the shared reward statistics, no reference where none is needed); the thumbs
labels and the unpaired data."""

from __future__ import annotations

import copy
import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignbench.annotator import AnnotatorConfig, SimulatedAnnotator, thumbs_records
from alignbench.data import PreferenceDataModule, UnpairedDataModule, mismatched_partners, preference_rows, unpaired_from_pairs
from alignbench.logprobs import pack_sequences, sequence_logprobs
from alignbench.methods.dpo import DPOConfig, DPO, dpo_loss
from alignbench.methods.ipo import IPO, IPOConfig, ipo_loss
from alignbench.methods.kto import KTO, KTOConfig, kto_loss
from alignbench.methods.orpo import ORPO, ORPOConfig, log1mexp, orpo_loss
from alignbench.methods.simpo import SimPO, SimPOConfig, simpo_loss
from alignbench.methods.slic import SLiC, SLiCConfig, slic_loss
from alignbench.models import build_tiny_policy, freeze
from alignbench.training import Budget

REFUSAL = "sorry i can not help with that"


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def leaf(*values: float) -> torch.Tensor:
    return torch.tensor(values, requires_grad=True)


# --- DPO: label smoothing and soft labels ---------------------------------------------------------


def test_dpo_without_label_smoothing_is_eq7_to_the_bit():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64) * 5 - 20 for _ in range(4))
    a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    loss, chosen, rejected, _ = dpo_loss(a, b, rc, rr, beta=0.1, label_smoothing=0.0)
    loss.backward()
    x, y = pc.clone().requires_grad_(), pr.clone().requires_grad_()  # eq. 7 as the seed wrote it
    eq7 = -F.logsigmoid(0.1 * (x - rc) - 0.1 * (y - rr)).mean()
    eq7.backward()
    assert torch.equal(loss, eq7) and torch.equal(a.grad, x.grad) and torch.equal(b.grad, y.grad)
    assert torch.equal(chosen, 0.1 * (pc - rc)) and torch.equal(rejected, 0.1 * (pr - rr))


def test_conservative_dpo_matches_hand_values_and_stops_at_one_minus_epsilon():
    # β = 1, h = 1: −0.9 log σ(1) − 0.1 log σ(−1)
    loss = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=1.0, label_smoothing=0.1).loss
    assert math.isclose(loss.item(), -0.9 * math.log(sigmoid(1)) - 0.1 * math.log(sigmoid(-1)), rel_tol=1e-6)
    # The gradient in h is σ(h) − (1 − ε): zero where σ(h) = 0.9, so a confident margin is not pushed further.
    h = torch.tensor([math.log(9.0)], requires_grad=True)
    dpo_loss(h, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=1.0, label_smoothing=0.1).loss.backward()
    assert abs(h.grad.item()) < 1e-6


def test_soft_labels_are_the_cross_entropy_with_the_labelers_probability():
    labels = torch.tensor([0.8, 0.5])
    loss = dpo_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-3.0, -1.0]), torch.zeros(2), torch.zeros(2), beta=0.5, labels=labels).loss
    # h = 0.5·2 = 1 and 0.5·(−2) = −1
    hand = (-0.8 * math.log(sigmoid(1)) - 0.2 * math.log(sigmoid(-1)) - 0.5 * math.log(sigmoid(-1)) - 0.5 * math.log(sigmoid(1))) / 2
    assert math.isclose(loss.item(), hand, rel_tol=1e-6)
    # ε on top of a soft label p: target (1 − ε) p + ε (1 − p)
    both = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.zeros(1), torch.zeros(1), beta=0.5, label_smoothing=0.1, labels=torch.tensor([0.8])).loss
    t = 0.9 * 0.8 + 0.1 * 0.2
    assert math.isclose(both.item(), -t * math.log(sigmoid(1)) - (1 - t) * math.log(sigmoid(-1)), rel_tol=1e-6)


@pytest.mark.parametrize("value", [-0.1, 0.5, 0.7])
def test_dpo_label_smoothing_outside_its_range_is_refused(value):
    with pytest.raises(ValueError, match=rf"label_smoothing={value} must be in \[0, 0.5\)"):
        DPOConfig(label_smoothing=value)


# --- IPO ----------------------------------------------------------------------------------------


def test_ipo_loss_is_zero_at_the_target_margin_and_matches_hand_values():
    tau = 0.1  # target h = 1/(2τ) = 5
    loss, chosen, rejected, _ = ipo_loss(torch.tensor([-2.0]), torch.tensor([-9.0]), torch.tensor([-4.0]), torch.tensor([-6.0]), tau)
    assert loss.item() == 0.0  # h = (−2 + 4) − (−9 + 6) = 5
    assert torch.allclose(chosen, torch.tensor([0.2])) and torch.allclose(rejected, torch.tensor([-0.3]))
    # h = 0 and h = 7: ((0 − 5)² + (7 − 5)²) / 2 = 14.5
    loss = ipo_loss(torch.tensor([-3.0, -1.0]), torch.tensor([-3.0, -8.0]), torch.zeros(2), torch.zeros(2), tau).loss
    assert math.isclose(loss.item(), 14.5, rel_tol=1e-6)


def test_ipo_gradient_raises_chosen_below_the_target_and_pulls_back_above_it():
    chosen, rejected = leaf(-3.0, 0.0), leaf(-3.0, -8.0)  # h = 0 (below 5) and h = 8 (above 5)
    ipo_loss(chosen, rejected, torch.zeros(2), torch.zeros(2), tau=0.1).loss.backward()
    assert chosen.grad[0] < 0 < rejected.grad[0]  # descent raises log π(y_w), lowers log π(y_l)
    assert chosen.grad[1] > 0 > rejected.grad[1]  # past the target IPO regresses back: no runaway margin
    assert math.isclose(chosen.grad[0].item(), 2 * (0 - 5) / 2, rel_tol=1e-6)


def test_ipo_length_normalised_option_divides_by_the_response_lengths(codec, step_batch):
    policy, reference = tiny(codec, 0), tiny(codec, 1)
    with torch.no_grad():
        pol, ref = (sequence_logprobs(m, step_batch.responses, average=True)[1] for m in (policy, reference))
    loss, _ = run_step(make_method(IPO, IPOConfig(length_normalized=True, precompute_reference=False), codec, policy, reference), step_batch)
    c, r = step_batch.chosen, step_batch.rejected
    hand = ipo_loss(pol[c], pol[r], ref[c], ref[r], tau=0.1).loss
    assert torch.allclose(loss, hand, atol=1e-5)


# --- SLiC-HF ------------------------------------------------------------------------------------


def test_slic_loss_matches_hand_values():
    # pair 1: δ − (−2) + (−5) = 1 − 3 < 0 -> hinge 0; pair 2: 1 + 4 − 3 = 2
    loss, chosen, rejected, terms = slic_loss(torch.tensor([-2.0, -4.0]), torch.tensor([-5.0, -3.0]), delta=1.0, reg_weight=0.1)
    assert math.isclose(terms["calibration_loss"].item(), 1.0, rel_tol=1e-6)
    assert math.isclose(terms["sft_loss"].item(), 3.0, rel_tol=1e-6)
    assert math.isclose(loss.item(), 1.0 + 0.1 * 3.0, rel_tol=1e-6)
    assert torch.equal(chosen, torch.tensor([-2.0, -4.0])) and torch.equal(rejected, torch.tensor([-5.0, -3.0]))


def test_slic_gradient_raises_chosen_and_lowers_rejected_inside_the_margin_only():
    chosen, rejected = leaf(-4.0, -2.0), leaf(-3.0, -5.0)
    slic_loss(chosen, rejected, delta=1.0, reg_weight=0.1).loss.backward()
    assert torch.allclose(chosen.grad, torch.tensor([-0.5 - 0.05, -0.05]))  # hinge active on pair 1 only; λ/P on both
    assert torch.allclose(rejected.grad, torch.tensor([0.5, 0.0]))


# --- SimPO --------------------------------------------------------------------------------------


def test_simpo_with_zero_margin_is_the_length_normalised_contrast():
    m_w, m_l = torch.tensor([-0.5, -1.2]), torch.tensor([-0.9, -0.4])
    loss = simpo_loss(m_w, m_l, beta=2.0, gamma=0.0).loss
    assert torch.allclose(loss, -F.logsigmoid(2.0 * m_w - 2.0 * m_l).mean())
    assert math.isclose(simpo_loss(m_w[:1], m_w[:1], beta=2.0, gamma=0.0).loss.item(), math.log(2), rel_tol=1e-6)


def test_simpo_matches_hand_values_with_the_target_margin():
    # β = 2, γ = 1: logit 2·(−0.5) − 2·(−1.5) − 1 = 1
    loss, chosen, rejected, _ = simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.5]), beta=2.0, gamma=1.0)
    assert math.isclose(loss.item(), math.log1p(math.exp(-1.0)), rel_tol=1e-6)
    assert torch.allclose(chosen, torch.tensor([-1.0])) and torch.allclose(rejected, torch.tensor([-3.0]))
    assert SimPOConfig().gamma == 1.0  # the authors' β = 2, γ/β = 0.5


def test_simpo_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = leaf(-1.0), leaf(-1.0)
    simpo_loss(chosen, rejected, beta=2.0, gamma=1.0).loss.backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()
    assert math.isclose(chosen.grad.item(), -2.0 * sigmoid(1.0), rel_tol=1e-6)  # −β σ(γ) at equal rewards


def test_simpo_step_uses_mean_log_probs_and_no_reference(codec, step_batch):
    policy = tiny(codec, 0)
    method = make_method(SimPO, SimPOConfig(), codec, policy, reference=None)
    loss, logged = run_step(method, step_batch)
    with torch.no_grad():
        mean = sequence_logprobs(policy, step_batch.responses, average=True)[1]
    c, r = step_batch.chosen, step_batch.rejected
    assert torch.allclose(loss, -F.logsigmoid(2.0 * mean[c] - 2.0 * mean[r] - 1.0).mean(), atol=1e-6)
    assert torch.allclose(logged["rewards_chosen"], 2.0 * mean[c].mean(), atol=1e-6)
    assert set(logged) == {"loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy"}


def test_offline_methods_train_without_dropout_so_the_policy_starts_at_its_reference(codec, step_batch):
    """A policy with dropout (here the Llama's attention dropout; a hub GPT-2's nn.Dropout alike)
    against its own frozen copy: with dropout off, as by default, the first step's log-ratios are 0
    and the loss is log 2; with `disable_dropout: false` the policy's dropout noise enters them."""
    def policy_with_dropout():
        policy = tiny(codec, 0)
        for module in policy.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.5
        return policy.train()

    reference = freeze(copy.deepcopy(tiny(codec, 0)))
    torch.manual_seed(0)
    default = make_method(DPO, DPOConfig(precompute_reference=False), codec, policy_with_dropout(), reference)
    assert default.policy.training and all(m.attention_dropout == 0.0 for m in default.policy.modules() if hasattr(m, "attention_dropout"))
    loss, logged = run_step(default, step_batch)
    assert abs(loss.item() - math.log(2)) < 1e-6 and abs(logged["margin"].item()) < 1e-5
    kept = make_method(DPO, DPOConfig(precompute_reference=False, disable_dropout=False), codec, policy_with_dropout(), reference)
    assert abs(run_step(kept, step_batch)[0].item() - math.log(2)) > 1e-3


# --- ORPO ---------------------------------------------------------------------------------------


def test_log1mexp_is_exact_and_has_finite_gradients_near_zero():
    x = torch.tensor([-1e-4, -0.3, -0.7, -5.0, -40.0, 0.0], requires_grad=True)
    y = log1mexp(x)
    for xi, yi in zip(x.tolist()[:5], y.tolist()[:5]):
        assert math.isclose(yi, math.log1p(-math.exp(xi)) if xi < -0.7 else math.log(-math.expm1(xi)), rel_tol=1e-5, abs_tol=1e-12)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_orpo_loss_matches_hand_values():
    # log P = −0.5 and −1.0: log odds = log P − log(1 − P)
    lo = lambda m: m - math.log(1 - math.exp(m))  # noqa: E731
    loss, chosen, rejected, terms = orpo_loss(torch.tensor([-0.5]), torch.tensor([-1.0]), torch.tensor(0.5), lam=0.1)
    ratio = lo(-0.5) - lo(-1.0)
    assert math.isclose(terms["log_odds_ratio"].item(), ratio, rel_tol=1e-5)
    assert math.isclose(terms["or_loss"].item(), -math.log(sigmoid(ratio)), rel_tol=1e-5)
    assert math.isclose(loss.item(), 0.5 + 0.1 * -math.log(sigmoid(ratio)), rel_tol=1e-5)
    assert torch.allclose(chosen, torch.tensor([-0.05])) and torch.allclose(rejected, torch.tensor([-0.1]))
    # Equal likelihoods: odds ratio 1, L_OR = log 2
    assert math.isclose(orpo_loss(torch.tensor([-0.7]), torch.tensor([-0.7]), torch.tensor(0.0), lam=1.0).loss.item(), math.log(2), rel_tol=1e-6)


def test_orpo_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = leaf(-1.0), leaf(-1.0)
    orpo_loss(chosen, rejected, torch.tensor(0.0), lam=0.1).loss.backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()
    # d log odds / dm = 1 / (1 − e^m); at equal odds the OR term's gradient is −λ σ(0) / (1 − e^m)
    assert math.isclose(chosen.grad.item(), -0.1 * 0.5 / (1 - math.exp(-1.0)), rel_tol=1e-5)


def test_orpo_step_adds_the_chosen_per_token_nll(codec, step_batch):
    policy = tiny(codec, 0)
    loss, logged = run_step(make_method(ORPO, ORPOConfig(), codec, policy, reference=None), step_batch)
    with torch.no_grad():
        per_token, summed = sequence_logprobs(policy, step_batch.responses)
    mask, c = step_batch.responses.response_mask, step_batch.chosen
    assert torch.allclose(logged["sft_loss"], -per_token[c].sum() / mask[c].sum(), atol=1e-6)
    assert torch.allclose(loss, logged["sft_loss"] + 0.1 * logged["or_loss"], atol=1e-6)


# --- KTO ----------------------------------------------------------------------------------------


def kto(logratios, desirable, mismatched_logratios, **kw):
    """KTO on log-ratios: the reference's log-probs are 0."""
    lr, mm = torch.as_tensor(logratios, dtype=torch.float32), torch.as_tensor(mismatched_logratios, dtype=torch.float32)
    return kto_loss(lr, torch.zeros_like(lr), torch.as_tensor(desirable), mm, torch.zeros_like(mm), **kw)


def test_kto_desirable_and_undesirable_terms_mirror():
    # r − z₀ = +d for a desirable response costs what r − z₀ = −d costs an undesirable one.
    for d in (-3.0, 0.0, 2.5, 10.0):
        up = kto([1.0 + d], [True], [1.0], beta=0.1).loss
        down = kto([1.0 - d], [False], [1.0], beta=0.1).loss
        assert torch.allclose(up, down)
        assert math.isclose(up.item(), 1 - sigmoid(0.1 * d), rel_tol=1e-6)


def test_kto_matches_hand_values_and_its_reference_point_is_the_clamped_mismatched_log_ratio():
    # z₀ = mean(2, 4) = 3; desirable r = 5 -> λ_D (1 − σ(0.2)); undesirable r = 1 -> λ_U (1 − σ(0.2))
    loss, d, u, terms = kto([5.0, 1.0], [True, False], [2.0, 4.0], beta=0.1, desirable_weight=1.0, undesirable_weight=2.0)
    assert math.isclose(terms["reference_point"].item(), 3.0, rel_tol=1e-6)
    assert math.isclose(loss.item(), (1 * (1 - sigmoid(0.2)) + 2 * (1 - sigmoid(0.2))) / 2, rel_tol=1e-6)
    assert torch.allclose(d, torch.tensor([0.5])) and torch.allclose(u, torch.tensor([0.1]))
    # A negative KL estimate is clamped at 0.
    assert kto([0.0], [True], [-3.0, -1.0], beta=0.1).terms["reference_point"].item() == 0.0


def test_kto_gradient_raises_desirable_lowers_undesirable_and_never_flows_into_the_reference_point():
    logps, mismatched = leaf(-3.0, -3.0), leaf(-1.0, -2.0)
    kto_loss(logps, torch.full((2,), -3.0), torch.tensor([True, False]), mismatched, torch.full((2,), -3.0), beta=0.1).loss.backward()
    assert logps.grad[0] < 0 < logps.grad[1]
    assert mismatched.grad is None or torch.equal(mismatched.grad, torch.zeros(2))
    # z₀ = 1.5: σ'(β(0 − 1.5)) · β / B
    s = sigmoid(-0.15)
    assert math.isclose(logps.grad[0].item(), -0.1 * s * (1 - s) / 2, rel_tol=1e-5)


def test_kto_step_scores_mismatched_pairs_and_logs_the_shared_statistics(codec, world):
    policy, reference = tiny(codec, 0), tiny(codec, 1)
    prompts = [p for p in world.sample_prompts("train", 40, seed=3) if not world.is_harmful(p)][:5]
    records = [{"prompt": p, "response": world.ideal_response(p), "desirable": True} for p in prompts]
    records += [{"prompt": p, "response": REFUSAL, "desirable": False} for p in prompts]
    data = UnpairedDataModule(records, codec, batch_size=10, max_length=40, shuffle=False)
    batch = next(iter(data.train_dataloader()))
    assert torch.equal(batch.desirable, torch.tensor([True] * 5 + [False] * 5))
    # Record i's prompt is scored with the response of its partner, another record.
    partners = mismatched_partners(10, seed=0)
    assert sorted(partners) == list(range(10)) and all(j != i for i, j in enumerate(partners))
    expected = pack_sequences([codec.encode_prompt(r["prompt"]) for r in records],
                              [codec.encode_responses([records[j]["response"]])[0] for j in partners], codec.pad_token_id, max_length=40)
    assert torch.equal(batch.mismatched.input_ids, expected.input_ids)
    assert torch.equal(next(iter(data.train_dataloader())).mismatched.input_ids, expected.input_ids)  # fixed across epochs
    method = make_method(KTO, KTOConfig(beta=0.1, precompute_reference=False), codec, policy, reference)
    loss, logged = run_step(method, batch)
    # Precomputing the reference's log-probs (of the responses and of the mismatched pairs) changes nothing.
    precomputed = make_method(KTO, KTOConfig(beta=0.1, precompute_reference=True), codec, policy, reference)
    precomputed.on_data(data)
    assert set(precomputed._reference_cache) == {"responses", "mismatched"}
    loss_precomputed, logged_precomputed = run_step(precomputed, batch)
    assert torch.allclose(loss_precomputed, loss, atol=1e-6)
    assert torch.allclose(logged_precomputed["reference_point"], logged["reference_point"], atol=1e-6)
    with torch.no_grad():
        lr = sequence_logprobs(policy, batch.responses)[1] - sequence_logprobs(reference, batch.responses)[1]
        z0 = (sequence_logprobs(policy, batch.mismatched)[1] - sequence_logprobs(reference, batch.mismatched)[1]).mean().clamp(min=0)
    hand = kto_loss(lr, torch.zeros(10), batch.desirable, z0.reshape(1), torch.zeros(1), beta=0.1).loss
    assert torch.allclose(loss, hand, atol=1e-5) and torch.allclose(logged["reference_point"], z0, atol=1e-5)
    d, u = 0.1 * lr[:5], 0.1 * lr[5:]
    assert torch.allclose(logged["margin"], d.mean() - u.mean(), atol=1e-6)
    assert torch.equal(logged["accuracy"], (d[:, None] > u[None, :]).float().mean())


# --- thumbs labels and unpaired data ------------------------------------------------------------


def test_thumbs_follow_the_gold_utility_with_the_annotators_noise(world):
    prompts = [p for p in world.sample_prompts("train", 200, seed=5) if not world.is_harmful(p)][:100]
    annotator = SimulatedAnnotator(world, AnnotatorConfig(temperature=0.1, flip_rate=0.1))
    prompt, ideal = prompts[0], world.ideal_response(prompts[0])
    assert math.isclose(annotator.prob_thumbs_up(prompt, ideal), 0.9 * sigmoid(5.0) + 0.1 * (1 - sigmoid(5.0)), rel_tol=1e-9)  # u = 1
    records = thumbs_records(annotator, [(p, [world.ideal_response(p), REFUSAL]) for p in prompts], np.random.default_rng(0))
    assert [r["response"] for r in records[:2]] == [world.ideal_response(prompts[0]), REFUSAL]  # in order, one label each
    ideal_up = np.mean([r["desirable"] for r in records[0::2]])
    refusal_up = np.mean([r["desirable"] for r in records[1::2]])
    assert ideal_up > 0.8 and refusal_up < 0.2  # a refusal of a benign prompt is unhelpful
    again = thumbs_records(annotator, [(p, [world.ideal_response(p), REFUSAL]) for p in prompts], np.random.default_rng(0))
    assert again == records


def test_kto_examples_from_pairs_give_chosen_desirable_and_rejected_undesirable():
    rows = preference_rows([
        {"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "c"},
        {"prompt": "q", "chosen": "d", "rejected": "e"},
    ])
    records = unpaired_from_pairs(rows)
    assert [(r["prompt"], r["response"], r["desirable"]) for r in records] == [
        ("p", "a", True), ("p", "b", False), ("p", "a", True), ("p", "c", False), ("q", "d", True), ("q", "e", False)]


def test_kto_counts_one_label_per_thumb_or_per_pair(world, codec):
    prompts = [p for p in world.sample_prompts("train", 60, seed=7) if not world.is_harmful(p)][:8]
    prefs = preference_rows([{"prompt": p, "chosen": world.ideal_response(p), "rejected": r} for p in prompts for r in (REFUSAL, "no")])
    run_config = SimpleNamespace(labels=SimpleNamespace(annotator=AnnotatorConfig(), source="annotator", seed=0))
    for examples, labels in (("thumbs", 8 * 3), ("pairs", 8 * 2)):
        method = make_method(KTO, KTOConfig(examples=examples, precompute_reference=False), codec, tiny(codec, 0), preferences=prefs, world=world, run_config=run_config)
        data = method.datamodule()
        assert method.budget.human_labels == labels
        assert data.num_responses == (8 * 3 if examples == "thumbs" else 8 * 4)


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (IPOConfig, {"tau": 0.0}, r"tau=0.0 must be a positive number"),
        (SLiCConfig, {"delta": -1.0}, r"delta=-1.0 must be a positive number"),
        (SLiCConfig, {"reg_weight": -0.1}, r"reg_weight=-0.1 must be >= 0"),
        (SimPOConfig, {"beta": 0.0}, r"beta=0.0 must be a positive number"),
        (SimPOConfig, {"gamma_beta_ratio": -0.5}, r"gamma_beta_ratio=-0.5 must be >= 0"),
        (ORPOConfig, {"lam": 0.0}, r"lam=0.0 must be a positive number"),
        (KTOConfig, {"undesirable_weight": 0.0}, r"undesirable_weight=0.0 must be a positive number"),
        (KTOConfig, {"examples": "ratings"}, r"examples='ratings' is not known; expected 'thumbs' or 'pairs'"),
        (KTOConfig, {"thumbs_threshold": 1.5}, r"thumbs_threshold=1.5 must be a gold utility in \[0, 1\]"),
    ],
)
def test_bad_configs_name_the_key_the_value_and_what_is_accepted(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_defaults_follow_the_papers_and_the_authors_code_except_where_the_world_needs_otherwise():
    assert (IPOConfig().tau, IPOConfig().length_normalized) == (0.1, False)
    assert (SLiCConfig().delta, SLiCConfig().reg_weight) == (10.0, 0.1)  # HALOs: delta 1, too small a margin on the world
    assert (SimPOConfig().beta, SimPOConfig().gamma_beta_ratio) == (2.0, 0.5)
    assert ORPOConfig().lam == 0.1
    k = KTOConfig()
    assert (k.beta, k.desirable_weight, k.undesirable_weight, k.examples) == (1.0, 1.0, 1.0, "thumbs")  # the paper: beta 0.1
    assert (DPOConfig().label_smoothing, DPOConfig().soft_labels) == (0.0, True)
    assert not SimPO.needs_reference and not ORPO.needs_reference and not SLiC.needs_reference
    assert IPO.needs_reference and KTO.needs_reference and DPO.needs_reference


# --- a tiny fit -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, config_class", [(IPO, IPOConfig), (SLiC, SLiCConfig), (SimPO, SimPOConfig), (ORPO, ORPOConfig), (KTO, KTOConfig)])
def test_tiny_fit_learns_the_preference_and_generalises(world, codec, cls, config_class):
    """Chosen = the ideal answer, rejected = a refusal of a benign prompt (for KTO: desirable and
    undesirable): trained by Lightning from a tiny model, held-out ideal answers gain likelihood
    relative to refusals, and the objective's own train/margin grows."""
    import copy

    import lightning as L

    from alignbench.training import OptimConfig

    torch.manual_seed(0)
    policy = tiny(codec, 0)
    reference = copy.deepcopy(policy).eval()
    before = [p.detach().clone() for p in policy.parameters()]
    train_prompts = [p for p in world.sample_prompts("train", 300, seed=1) if not world.is_harmful(p)]
    prefs = preference_rows([{"prompt": p, "chosen": world.ideal_response(p), "rejected": REFUSAL} for p in train_prompts])
    held_out = PreferenceDataModule(
        preference_rows([{"prompt": p, "chosen": world.ideal_response(p), "rejected": REFUSAL}
                         for p in world.sample_prompts("test", 100, seed=1) if not world.is_harmful(p)]), codec, 64, 40, shuffle=False)

    def held_out_margin():  # [P] summed log π(chosen) − log π(rejected) of the held-out pairs
        with torch.no_grad():
            batches = list(held_out.train_dataloader())
            lp = [sequence_logprobs(policy, b.responses)[1] for b in batches]
            return torch.cat([x[b.chosen] - x[b.rejected] for x, b in zip(lp, batches)])

    config = config_class(batch_size=32 if cls is KTO else 16, max_length=40, epochs=2, kl_every=0, optim=OptimConfig(lr=3e-3, warmup_ratio=0.0))
    run_config = SimpleNamespace(labels=SimpleNamespace(annotator=AnnotatorConfig(), source="annotator", seed=0))
    method = make_method(cls, dataclasses.replace(config, examples="pairs") if cls is KTO else config, codec, policy, reference,
                         preferences=prefs, world=world, run_config=run_config)
    margin_0 = held_out_margin()
    history = []
    log_terms = method.log_terms
    method.log_terms = lambda metrics, batch_size: (history.append({k: v.item() for k, v in metrics.items()}), log_terms(metrics, batch_size))
    data = method.datamodule()
    trainer = L.Trainer(max_steps=len(data.train_dataloader()) * config.epochs, max_epochs=config.epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", log_every_n_steps=1)  # statistics reach Lightning on logging steps
    trainer.fit(method, datamodule=data)
    assert ((held_out_margin() - margin_0) > 0).float().mean() > 0.9
    margins = [h["margin"] for h in history if "margin" in h]
    third = len(margins) // 3
    assert sum(margins[-third:]) > sum(margins[:third])
    assert {"train/loss", "train/rewards_chosen", "train/rewards_rejected", "train/margin", "train/accuracy"} <= set(trainer.callback_metrics)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


# --- helpers ------------------------------------------------------------------------------------


def tiny(codec, seed):
    return build_tiny_policy("world-tiny", codec.tokenizer, seed=seed)


def make_method(cls, config, codec, policy, reference=None, preferences=None, world=None, run_config=None):
    """A method on a stand-in run context: the policy, the reference, the data, the world and a budget."""
    context = SimpleNamespace(
        load_policy=lambda trainable: policy, reference=reference, budget=Budget(), codec=codec, preferences=preferences,
        seed=0, world=world, config=run_config,
    )
    return cls(config, context)


def run_step(method, batch):
    logged = {}
    method.log_terms = lambda metrics, batch_size: logged.update(metrics)
    return method.training_step(batch, 0), logged


@pytest.fixture(scope="module")
def step_batch(world, codec):
    prompts = [p for p in world.sample_prompts("train", 40, seed=3) if not world.is_harmful(p)][:6]
    rows = preference_rows([{"prompt": p, "chosen": world.ideal_response(p), "rejected": r} for p in prompts for r in (REFUSAL, "no")])
    return next(iter(PreferenceDataModule(rows, codec, batch_size=6, max_length=40, shuffle=False).train_dataloader()))
