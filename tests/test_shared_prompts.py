"""Shared-prompt rows (`pack_shared_prompts`, `shared_prompt_logprobs`): a prompt's responses packed
into one row with a block attention mask score as they do one per row (`sequence_logprobs`), on a
Llama and a GPT-2; a response never sees its row's other responses; and a DPO step over shared rows
(and a CPL step, which reads per-token log-probs) gives the loss and gradients of the step over one
row per response."""

from __future__ import annotations

import pytest
import torch

from alignbench.data import PreferenceDataModule, preference_rows
from alignbench.logprobs import pack_sequences, pack_shared_prompts, sequence_logprobs, shared_prompt_logprobs
from alignbench.methods.cpl import CPL, CPLConfig
from alignbench.methods.dpo import DPO, DPOConfig
from alignbench.models import build_tiny_policy
from tests.test_offline_objectives import REFUSAL, make_method, run_step

# Prompts of different lengths with 1 to 4 responses, one of them empty and one long enough to be cut.
PROMPTS = [[3, 4, 5], [6, 7], [8, 9, 10, 11, 12], [13]]
RESPONSES = [[[14, 15, 16], [17], [18, 19, 20, 21]], [[22, 23]], [[24], [], [25, 26, 27, 28, 29, 30, 31, 14, 15, 16], [17, 18]], [[19, 20, 21]]]
MAX_LENGTH = 9


def one_row_per_response(prompts, responses, max_length=MAX_LENGTH):
    flat_prompts = [p for p, rs in zip(prompts, responses) for _ in rs]
    return pack_sequences(flat_prompts, [r for rs in responses for r in rs], pad_token_id=0, max_length=max_length)


@pytest.fixture(params=["llama", "gpt2"])
def model(request, tiny_gpt2, codec):
    if request.param == "gpt2":
        return tiny_gpt2
    torch.manual_seed(0)
    return build_tiny_policy("world-tiny", codec.tokenizer, seed=1).eval()


def test_shared_rows_score_each_response_as_its_own_row_does(model):
    unshared = one_row_per_response(PROMPTS, RESPONSES)
    shared = pack_shared_prompts(PROMPTS, RESPONSES, pad_token_id=0, max_length=MAX_LENGTH)
    assert shared.num_responses == unshared.input_ids.shape[0] == 9
    assert shared.input_ids.numel() < unshared.input_ids.numel()
    expected_tokens, expected = sequence_logprobs(model, unshared)
    summed, lengths, per_token = shared_prompt_logprobs(model, shared, row_width=unshared.input_ids.shape[1])
    torch.testing.assert_close(summed, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(per_token, expected_tokens, atol=1e-5, rtol=0)  # token by token, in the one-row layout
    assert shared_prompt_logprobs(model, shared)[2] is None
    assert lengths.tolist() == unshared.response_mask.sum(-1).tolist() == [3, 1, 4, 2, 1, 0, 4, 2, 3]  # the long one cut to 9 - 5
    assert summed[5] == 0  # an empty response scores 0
    # and the gradients of any function of them agree
    weights = torch.linspace(-1, 1, 9)
    model.zero_grad()
    (sequence_logprobs(model, unshared)[1] * weights).sum().backward()
    one_row = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (shared_prompt_logprobs(model, shared)[0] * weights).sum().backward()
    for a, b in zip(one_row, (p.grad for p in model.parameters())):  # float32 sums in another order
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)


def test_a_response_never_sees_the_other_responses_of_its_row(model):
    before = shared_prompt_logprobs(model, pack_shared_prompts(PROMPTS, RESPONSES, pad_token_id=0))[0]
    changed = [list(rs) for rs in RESPONSES]
    changed[0][0] = [21, 20, 19, 18, 17]  # the first response of the first prompt: others follow it in the row
    after = shared_prompt_logprobs(model, pack_shared_prompts(PROMPTS, changed, pad_token_id=0))[0]
    assert not torch.isclose(after[0], before[0])
    torch.testing.assert_close(after[1:], before[1:], atol=1e-6, rtol=0)


def test_packing_errors_name_the_prompt():
    with pytest.raises(ValueError, match="prompt 1: empty prompt"):
        pack_shared_prompts([[1], []], [[[2]], [[3]]], pad_token_id=0)
    with pytest.raises(ValueError, match="prompt 0: prompt has 3 tokens, more than max_length=2"):
        pack_shared_prompts([[1, 2, 3]], [[[4]]], pad_token_id=0, max_length=2)


@pytest.mark.parametrize("method_class, config_class, precompute", [(DPO, DPOConfig, False), (DPO, DPOConfig, True), (CPL, CPLConfig, False)])
def test_a_step_over_shared_rows_equals_the_step_over_one_row_per_response(world, codec, method_class, config_class, precompute):
    """DPO (sums; the reference on the fly or precomputed) and CPL (per-token log-probs)."""
    prompts = [p for p in world.sample_prompts("train", 40, seed=3) if not world.is_harmful(p)][:6]
    # a ranking of 4 responses per prompt, 3 of its pairs: the prompt is shared by 4 responses
    pairs = lambda p: [(world.ideal_response(p), REFUSAL), (world.ideal_response(p), "no"), (REFUSAL, "maybe later")]  # noqa: E731
    rows = preference_rows([{"prompt": p, "chosen": c, "rejected": r} for p in prompts for c, r in pairs(p)])

    def step(share: bool):
        torch.manual_seed(0)
        policy, reference = (build_tiny_policy("world-tiny", codec.tokenizer, seed=s) for s in (1, 2))
        config = config_class(max_length=40, precompute_reference=precompute, share_prompts=share)
        method = make_method(method_class, config, codec, policy, reference, preferences=rows)
        data = PreferenceDataModule(rows, codec, batch_size=6, max_length=40, shuffle=False, share_prompts=share)
        method.on_data(data)
        batch = next(iter(data.train_dataloader()))
        assert (batch.shared is not None) == share
        loss, logged = run_step(method, batch)
        loss.backward()
        return loss, logged, [p.grad for p in policy.parameters()]

    loss, logged, grads = step(share=True)
    loss_unshared, logged_unshared, grads_unshared = step(share=False)
    assert abs(loss.item() - loss_unshared.item()) < 1e-5
    assert set(logged) == set(logged_unshared)
    for name in logged:
        assert abs(logged[name].item() - logged_unshared[name].item()) < 1e-5
    for a, b in zip(grads, grads_unshared):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
