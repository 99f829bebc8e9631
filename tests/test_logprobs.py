"""Tests for alignbench.logprobs: packing, position ids and response scoring."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2LMHeadModel

from alignbench.logprobs import (
    PackedBatch,
    pack_sequences,
    position_ids_from_mask,
    sampling_logprobs,
    sequence_logprobs,
    token_logprobs,
)

PAD = 0
PROMPTS = [[3, 4, 5], [6], [7, 8, 9, 10, 11], [12, 2]]
RESPONSES = [[13, 14], [15, 16, 17, 18, 1], [19], []]


@pytest.fixture
def model(tiny_gpt2) -> GPT2LMHeadModel:
    return tiny_gpt2


def manual_response_logprobs(model: GPT2LMHeadModel, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Log-probabilities of the response tokens, running the row alone without padding."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    # Response token k sits at position len(prompt) + k and is predicted from the position before.
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(response))
    return logp[positions, torch.tensor(response, dtype=torch.long)]


def test_pack_right_padding_layout() -> None:
    batch = pack_sequences([[5, 6], [7]], [[8], [9, 10, 1]], pad_token_id=PAD)
    assert batch.input_ids.tolist() == [[5, 6, 8, 0], [7, 9, 10, 1]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch.response_mask.dtype == torch.bool
    assert batch.response_mask.tolist() == [[False, False, True, False], [False, True, True, True]]


def test_pack_left_padding_layout() -> None:
    batch = pack_sequences([[5, 6], [7]], [[8], [9, 10, 1]], pad_token_id=PAD, padding_side="left")
    assert batch.input_ids.tolist() == [[0, 5, 6, 8], [7, 9, 10, 1]]
    assert batch.attention_mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert batch.response_mask.tolist() == [[False, False, False, True], [False, True, True, True]]


def test_pack_truncation_drops_end_of_response() -> None:
    batch = pack_sequences([[5, 6], [7]], [[8, 9, 10], [11]], pad_token_id=PAD, max_length=3)
    assert batch.input_ids.tolist() == [[5, 6, 8], [7, 11, 0]]
    assert batch.response_mask.tolist() == [[False, False, True], [False, True, False]]
    # A prompt exactly max_length long keeps no response token but is not an error.
    batch = pack_sequences([[5, 6, 7]], [[8]], pad_token_id=PAD, max_length=3)
    assert batch.input_ids.tolist() == [[5, 6, 7]] and not batch.response_mask.any()


def test_pack_errors() -> None:
    with pytest.raises(ValueError, match="row 1"):
        pack_sequences([[5], [6, 7, 8, 9]], [[1], [1]], pad_token_id=PAD, max_length=3)
    with pytest.raises(ValueError, match="row 0"):
        pack_sequences([[]], [[1]], pad_token_id=PAD)
    with pytest.raises(ValueError):
        pack_sequences([[5]], [[1], [2]], pad_token_id=PAD)
    with pytest.raises(ValueError):
        pack_sequences([[5]], [[1]], pad_token_id=PAD, padding_side="middle")


def test_position_ids_from_mask() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]]


def test_token_logprobs_matches_log_softmax_and_is_stable() -> None:
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    input_ids = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    result = token_logprobs(logits, input_ids)
    assert result.shape == (2, 4)
    torch.testing.assert_close(result, expected)
    # Logits far outside exp's range still give finite, correctly shifted values.
    huge = token_logprobs(logits * 1e4, input_ids)
    assert torch.isfinite(huge).all() and (huge <= 0).all()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_sequence_logprobs_matches_rows_run_alone(model: GPT2LMHeadModel, padding_side: str) -> None:
    batch = pack_sequences(PROMPTS, RESPONSES, pad_token_id=PAD, padding_side=padding_side)
    per_token, per_sequence = sequence_logprobs(model, batch)
    assert per_token.shape == batch.input_ids.shape and per_token.dtype == torch.float32
    assert per_sequence.shape == (len(PROMPTS),) and per_sequence.dtype == torch.float32
    assert (per_token[~batch.response_mask] == 0).all()
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        expected = manual_response_logprobs(model, prompt, response)
        got = per_token[row][batch.response_mask[row]]
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(per_sequence[row].double(), expected.sum(), atol=1e-5, rtol=0)


def test_sampling_logprobs_hand_values() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = (probs.log() + 2.0).expand(4, 4)  # row i scores token i; any shift gives the same distribution
    targets = torch.arange(4)
    # T = 1, top_p = 1: the model's own distribution.
    torch.testing.assert_close(sampling_logprobs(logits, targets), probs.log())
    # top_p = 0.7: tokens 0 and 1 (0.5 < 0.7 before token 1, 0.8 >= 0.7 before token 2), renormalised.
    expected = torch.tensor([math.log(0.5 / 0.8), math.log(0.3 / 0.8), -math.inf, -math.inf])
    torch.testing.assert_close(sampling_logprobs(logits, targets, top_p=0.7), expected)
    # T = 2: probabilities proportional to sqrt(p).
    tempered = probs.sqrt() / probs.sqrt().sum()
    torch.testing.assert_close(sampling_logprobs(logits, targets, temperature=2.0), tempered.log())
    # T = 2 and top_p = 0.5: sqrt weights 0.383, 0.297, ... -> tokens 0 and 1 (0.383 < 0.5, 0.680 >= 0.5).
    kept = tempered[:2] / tempered[:2].sum()
    torch.testing.assert_close(
        sampling_logprobs(logits, targets, temperature=2.0, top_p=0.5), torch.cat([kept.log(), torch.tensor([-math.inf, -math.inf])])
    )
    # T = 0: greedy, a point mass on the argmax.
    torch.testing.assert_close(sampling_logprobs(logits, targets, temperature=0.0), torch.tensor([0.0, -math.inf, -math.inf, -math.inf]))
    # Batched shapes [B, T, V] -> [B, T].
    assert sampling_logprobs(logits[0].expand(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), 0.5, 0.9).shape == (2, 3)


def test_sequence_logprobs_average(model: GPT2LMHeadModel) -> None:
    batch = pack_sequences(PROMPTS, RESPONSES, pad_token_id=PAD)
    _, total = sequence_logprobs(model, batch)
    _, mean = sequence_logprobs(model, batch, average=True)
    counts = torch.tensor([len(r) for r in RESPONSES], dtype=torch.float32)
    nonempty = counts > 0
    torch.testing.assert_close(mean[nonempty], total[nonempty] / counts[nonempty])
    assert mean[~nonempty].tolist() == [0.0]


def test_sequence_logprobs_gradients_flow(model: GPT2LMHeadModel) -> None:
    batch = pack_sequences(PROMPTS, RESPONSES, pad_token_id=PAD, padding_side="left")
    _, per_sequence = sequence_logprobs(model, batch)
    per_sequence.sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_sequence_logprobs_low_precision_model_returns_float32(model: GPT2LMHeadModel) -> None:
    batch = pack_sequences(PROMPTS, RESPONSES, pad_token_id=PAD)
    _, reference = sequence_logprobs(model, batch)
    per_token, per_sequence = sequence_logprobs(model.to(torch.bfloat16), batch)
    assert per_token.dtype == per_sequence.dtype == torch.float32
    torch.testing.assert_close(per_sequence, reference, atol=0.5, rtol=0.05)


def test_concat_scores_like_separate_batches(model: GPT2LMHeadModel) -> None:
    # Different widths and padding sides: concat pads the narrower one, scores must not change.
    first = pack_sequences(PROMPTS[:2], RESPONSES[:2], pad_token_id=PAD, padding_side="left")
    second = pack_sequences(PROMPTS[2:], RESPONSES[2:], pad_token_id=PAD)
    both = PackedBatch.concat([first, second]).to("cpu")
    assert both.input_ids.shape == (4, max(first.input_ids.shape[1], second.input_ids.shape[1]))
    assert both.response_mask.dtype == torch.bool
    _, together = sequence_logprobs(model, both)
    separate = torch.cat([sequence_logprobs(model, first)[1], sequence_logprobs(model, second)[1]])
    torch.testing.assert_close(together, separate, atol=1e-5, rtol=0)
