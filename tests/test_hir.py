"""HIR: the contrastive loss on hand values and both relabelers."""

import math

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
