"""HIR: the contrastive loss on hand values and both relabelers."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from alignbench.methods.hir import hir_contrastive_loss
from alignbench.relabel import ScoreConditionedRelabeler, WorldRelabeler
from alignbench.world import AssistantWorld


def test_contrastive_loss_on_a_2x2_example_equals_the_hand_value():
    # logits[i, j] = mean log pi(o_i | p_j); each output should prefer its own instruction
    logits = torch.tensor([[-1.0, -3.0], [-2.0, -0.5]])
    row0 = -math.log(math.exp(-1.0) / (math.exp(-1.0) + math.exp(-3.0)))
    row1 = -math.log(math.exp(-0.5) / (math.exp(-2.0) + math.exp(-0.5)))
    assert math.isclose(hir_contrastive_loss(logits).item(), (row0 + row1) / 2, rel_tol=1e-6)
    # label smoothing eps over 2 classes: target (1 - eps/2) on the own instruction, eps/2 on the other
    eps = 0.2
    smoothed = 0.0
    for i, row in enumerate(logits.tolist()):
        logz = math.log(sum(math.exp(v) for v in row))
        smoothed += -sum(((1 - eps + eps / 2) if j == i else eps / 2) * (v - logz) for j, v in enumerate(row))
    assert math.isclose(hir_contrastive_loss(logits, eps).item(), smoothed / 2, rel_tol=1e-6)


def test_contrastive_gradient_raises_the_own_instruction_likelihood():
    logits = torch.zeros(2, 2, requires_grad=True)
    hir_contrastive_loss(logits).backward()
    assert (logits.grad.diagonal() < 0).all() and (logits.grad - torch.diag(logits.grad.diagonal()) >= 0).all()


def test_world_relabeler_turns_list_3_answered_with_2_into_list_2():
    world = AssistantWorld()
    relabeler = WorldRelabeler(world)
    [new] = relabeler.relabel(["list 3 fruits"], ["apple pear"])
    assert new == "list 2 fruits"
    assert world.gold(new, "apple pear").helpfulness == 1.0
    assert relabeler.relabel(["list 3 fruits"], ["apple idiot pear"]) == [None]  # never trains on insults
    assert relabeler.evaluation_prompt("list 3 fruits") == "list 3 fruits"


def test_score_conditioned_relabeler_picks_the_phrase_by_the_threshold():
    scores = {"good answer": 0.9, "edge": 0.5, "bad answer": 0.2}
    relabeler = ScoreConditionedRelabeler(lambda ps, ys: [scores[y] for y in ys], threshold=0.5)
    out = relabeler.relabel(["q1", "q2", "q3"], ["good answer", "edge", "bad answer"])
    assert out == ["good : q1", "good : q2", "bad : q3"]
    assert relabeler.evaluation_prompt("q1") == "good : q1"


@pytest.mark.parametrize("n_pairs", [9, 11])  # groups of 4, 4 and one left alone; of 4, 4 and 3
def test_the_contrastive_term_over_shared_prompt_rows_equals_a_row_per_instruction_and_response(world, codec, n_pairs):
    """HIR scores its B x B likelihoods with each instruction once, followed by its group's responses;
    the loss and its gradients are those of a row per (instruction, response), the computation it
    replaced (written out here), up to float rounding."""
    from alignbench.logprobs import pack_sequences, sequence_logprobs
    from alignbench.methods.hir import HIR, HIRConfig
    from alignbench.models import build_tiny_policy

    rng = np.random.default_rng(0)
    texts = world.sample_prompts("train", n_pairs, seed=3)
    prompts = [codec.encode_prompt(p) for p in texts]
    responses = [codec.encode_responses([world.demonstrate(p, rng)])[0] for p in texts]
    config = HIRConfig(contrastive_size=4, label_smoothing=0.1)

    def one_row_per_pair(policy):
        losses = []
        for start in range(0, n_pairs - 1, config.contrastive_size):
            p, o = prompts[start : start + config.contrastive_size], responses[start : start + config.contrastive_size]
            if len(p) < 2:
                break
            b = len(p)
            cross = pack_sequences([p[j] for i in range(b) for j in range(b)], [o[i] for i in range(b) for _ in range(b)], codec.pad_token_id)
            losses.append(hir_contrastive_loss(sequence_logprobs(policy, cross, average=True)[1].view(b, b), config.label_smoothing))
        return torch.stack(losses).mean()

    policy = build_tiny_policy("world-tiny", codec.tokenizer, seed=0)
    method = SimpleNamespace(config=config, context=SimpleNamespace(codec=codec), policy=policy, device=torch.device("cpu"))
    shared = HIR._contrastive(method, SimpleNamespace(prompt_ids=prompts, response_ids=responses))
    shared.backward()
    shared_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    expected = one_row_per_pair(policy)
    expected.backward()
    assert abs(shared.item() - expected.item()) < 1e-5
    for got, want in zip(shared_grads, (p.grad for p in policy.parameters())):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_in_score_mode_the_policy_is_asked_with_the_positive_phrase_and_its_kl_is_against_the_reference_on_the_instruction(world, codec, monkeypatch):
    """Evaluation (`respond`) and the KL monitor (`train/kl`, `max_kl`) ask HIR's policy "good : x",
    and take the reference's log-probs of its answers to x: the KL of the policy as deployed."""
    import alignbench.evaluation as evaluation
    import alignbench.methods.base as base
    from alignbench.evaluation import EvalConfig
    from alignbench.methods.hir import HIR, HIRConfig
    from alignbench.models import build_tiny_policy
    from alignbench.runner import KLMonitor
    from alignbench.training import Budget

    policy = build_tiny_policy("world-tiny", codec.tokenizer, seed=0)
    context = SimpleNamespace(load_policy=lambda trainable: policy, reference=policy, codec=codec, budget=Budget(), world=world,
                              gold_judge=SimpleNamespace(score_batch=lambda ps, ys: [1.0] * len(ys)), eval_config=EvalConfig(),
                              train_prompts=["list 3 fruits", "sort 7 2 5"], seed=0)
    module = HIR(HIRConfig(relabeler="score"), context)
    calls = []
    fake = lambda model, reference, codec, prompts, config, generator, desc=False, reference_prompts=None: calls.append((list(prompts), list(reference_prompts))) or SimpleNamespace(kl=[0.0])  # noqa: E731
    monkeypatch.setattr(base, "sample_policy", fake)
    monkeypatch.setattr(evaluation, "sample_policy", fake)  # the monitor's (imported where it runs)
    module.respond(["list 3 fruits"], torch.Generator())
    KLMonitor(context, every=1, n_prompts=2, max_kl=None).estimate(module, step=1)
    assert calls == [(["good : list 3 fruits"], ["list 3 fruits"]), (["good : list 3 fruits", "good : sort 7 2 5"], ["list 3 fruits", "sort 7 2 5"])]
