"""Tests for alignbench.generation.sample."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from alignbench import generation
from alignbench.generation import SampleOutput, sample
from alignbench.logprobs import pack_sequences, sequence_logprobs

PAD = 0
# Different lengths in one batch, so left padding and the length sort are exercised.
PROMPTS = [[3, 4, 5], [6], [7, 8, 9, 10, 11], [12, 2], [20, 21, 22, 23], [30, 29, 28, 27, 26, 25, 24], [9, 9], [14]]
RARE = 31  # EOS for tests that do not care about stopping


def draw(model: GPT2LMHeadModel, prompts: list[list[int]], seed: int | None = None, **kwargs) -> SampleOutput:
    """`sample` with this file's pad id, EOS ``RARE`` unless given, and a generator seeded with ``seed``."""
    kwargs.setdefault("eos_token_id", RARE)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return sample(model, prompts, pad_token_id=PAD, generator=generator, **kwargs)


@pytest.fixture
def model(tiny_gpt2) -> GPT2LMHeadModel:
    return tiny_gpt2


def hf_greedy(
    model: GPT2LMHeadModel, prompt: list[int], max_new_tokens: int, eos_token_id: int | None
) -> list[int]:
    """Reference greedy continuation from transformers, one prompt at a time (no padding)."""
    input_ids = torch.tensor([prompt])
    output = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
        max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=PAD,
    )
    return output[0, len(prompt) :].tolist()


def first_token_probs(model: GPT2LMHeadModel, prompt: list[int], temperature: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double()
    return torch.softmax(logits / temperature, dim=-1)


def first_token_counts(output: SampleOutput, vocab_size: int) -> torch.Tensor:
    return torch.bincount(torch.tensor([r[0] for r in output.response_ids]), minlength=vocab_size).double()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected >= 5  # the usual validity condition; rare tokens are lumped below
    rest_observed, rest_expected = counts[~keep].sum(), expected[~keep].sum()
    statistic = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    if rest_expected > 0:
        statistic += (rest_observed - rest_expected) ** 2 / rest_expected
    return float(statistic)


def test_greedy_matches_hf_generate_including_eos(model: GPT2LMHeadModel) -> None:
    max_new = 12
    free_runs = [hf_greedy(model, p, max_new, eos_token_id=None) for p in PROMPTS]
    # An EOS that greedy decoding reaches after a few tokens in some rows but not in others.
    candidates = [
        t
        for t in range(1, 32)
        if any(t in run[2:] and t not in run[:2] for run in free_runs) and any(t not in run for run in free_runs)
    ]
    assert candidates, "fixture model gives no usable EOS; change its seed"
    eos = candidates[0]

    output = draw(model, PROMPTS, max_new_tokens=max_new, eos_token_id=eos, temperature=0, batch_size=8)
    expected = [hf_greedy(model, p, max_new, eos_token_id=eos) for p in PROMPTS]
    assert output.response_ids == expected
    assert output.finished == [run[-1] == eos for run in expected]
    assert any(output.finished) and not all(output.finished)
    assert all(len(r) == max_new for r, f in zip(output.response_ids, output.finished) if not f)

    # Batching and the length sort must not change anything.
    for batch_size in (1, 3):
        again = draw(model, PROMPTS, max_new_tokens=max_new, eos_token_id=eos, temperature=0, batch_size=batch_size)
        assert again.response_ids == expected


def test_num_samples_are_prompt_major(model: GPT2LMHeadModel) -> None:
    # Greedy samples of one prompt are identical, so the order shows directly.
    output = draw(model, PROMPTS, max_new_tokens=5, temperature=0, num_samples=3, batch_size=5)
    single = draw(model, PROMPTS, max_new_tokens=5, temperature=0)
    assert len(output.response_ids) == 3 * len(PROMPTS)
    assert output.response_ids == [r for r in single.response_ids for _ in range(3)]
    # With sampling, each sample starts from its own prompt's distribution: prompt-major blocks of
    # 200 samples from two prompts with very different most likely first tokens.
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11]]
    top = [int(first_token_probs(model, p).argmax()) for p in prompts]
    assert top[0] != top[1]
    sampled = draw(model, prompts, seed=0, max_new_tokens=1, num_samples=200)
    for i, p in enumerate(prompts):
        block = first_token_counts(SampleOutput(sampled.response_ids[200 * i : 200 * (i + 1)], [], []), 32)
        assert int(block.argmax()) == top[i]


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9)])
def test_logprobs_equal_sequence_logprobs(model: GPT2LMHeadModel, temperature: float, top_p: float) -> None:
    # EOS = a likely token, so rows finish at different steps and finished rows get dropped.
    eos = int(first_token_probs(model, PROMPTS[0]).argsort()[-2])
    output = draw(
        model, PROMPTS, seed=1, max_new_tokens=10, eos_token_id=eos, temperature=temperature, top_p=top_p,
        num_samples=4, batch_size=16,
    )
    assert any(output.finished) and not all(output.finished)
    for response, finished in zip(output.response_ids, output.finished):
        assert (eos in response) == finished and (not finished or response.index(eos) == len(response) - 1)
    prompts = [p for p in PROMPTS for _ in range(4)]
    _, expected = sequence_logprobs(model, pack_sequences(prompts, output.response_ids, pad_token_id=PAD))
    # Whatever temperature/top_p sampled them, logprobs are under the unscaled model.
    torch.testing.assert_close(torch.tensor(output.logprobs), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9), (1.5, 0.6), (0.0, 1.0)])
def test_sampling_logprobs_are_those_of_the_sampled_distribution(model: GPT2LMHeadModel, temperature: float, top_p: float) -> None:
    eos = int(first_token_probs(model, PROMPTS[0]).argsort()[-2])
    output = draw(
        model, PROMPTS, seed=2, max_new_tokens=10, eos_token_id=eos, temperature=temperature, top_p=top_p,
        num_samples=4, batch_size=16,
    )
    prompts = [p for p in PROMPTS for _ in range(4)]
    _, expected = sequence_logprobs(model, pack_sequences(prompts, output.response_ids, pad_token_id=PAD), temperature=temperature, top_p=top_p)
    # Every sampled token lies in the nucleus it was drawn from, scored as the full forward scores it.
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(torch.tensor(output.sampling_logprobs), expected, atol=1e-4, rtol=0)
    if temperature == 1.0 and top_p == 1.0:
        assert output.sampling_logprobs == output.logprobs
    if temperature == 0.0:  # greedy: a point mass
        assert output.sampling_logprobs == [0.0] * len(prompts)


def test_same_seed_same_samples(model: GPT2LMHeadModel) -> None:
    def run(seed: int) -> SampleOutput:
        return draw(model, PROMPTS, seed=seed, max_new_tokens=8, eos_token_id=1, num_samples=2, batch_size=4)

    assert run(7) == run(7)
    assert run(7).response_ids != run(8).response_ids


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampling_matches_next_token_distribution(model: GPT2LMHeadModel, temperature: float) -> None:
    prompt = [3, 4, 5]
    output = draw(model, [prompt], seed=0, max_new_tokens=1, temperature=temperature, num_samples=4000, batch_size=1000)
    counts = first_token_counts(output, 32)
    # 31 degrees of freedom at most: the 0.1% critical value is about 61.
    assert chi_square(counts, first_token_probs(model, prompt, temperature)) < 61
    # ...and the wrong temperature is clearly rejected, so the check has power.
    assert chi_square(counts, first_token_probs(model, prompt, 3.0 - temperature)) > 100


def test_top_p(model: GPT2LMHeadModel) -> None:
    prompt = [3, 4, 5]
    probs = first_token_probs(model, prompt)
    tiny = draw(model, [prompt], seed=0, max_new_tokens=1, top_p=1e-3, num_samples=500)
    assert {r[0] for r in tiny.response_ids} == {int(probs.argmax())}

    # top_p = 0.6 keeps the smallest top set reaching 0.6, sampled in proportion to its probabilities.
    sorted_probs, order = probs.sort(descending=True)
    nucleus = order[: int((sorted_probs.cumsum(0) < 0.6).sum()) + 1]
    assert len(nucleus) >= 2
    output = draw(model, [prompt], seed=0, max_new_tokens=1, top_p=0.6, num_samples=3000, batch_size=1000)
    counts = first_token_counts(output, 32)
    assert counts.sum() == counts[nucleus].sum()
    renormalised = torch.zeros_like(probs)
    renormalised[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert chi_square(counts, renormalised) < 16  # 0.1% critical value for up to 3 degrees of freedom


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_is_restored(model: GPT2LMHeadModel, training: bool) -> None:
    modes: list[bool] = []
    model.transformer.h[0].register_forward_hook(lambda module, args, output: modes.append(module.training))
    model.train(training)
    draw(model, PROMPTS[:2], max_new_tokens=3, progress="sampling")
    assert modes and not any(modes)
    assert model.training == training and model.transformer.h[0].training == training


def test_invalid_arguments(model: GPT2LMHeadModel) -> None:
    with pytest.raises(ValueError):
        draw(model, [[]], max_new_tokens=3)
    with pytest.raises(ValueError):
        draw(model, PROMPTS, max_new_tokens=3, top_p=0.0)
    with pytest.raises(ValueError):
        draw(model, PROMPTS, max_new_tokens=3, temperature=-1.0)
    with pytest.raises(ValueError):
        draw(model, PROMPTS, max_new_tokens=0)
    assert draw(model, [], max_new_tokens=3) == SampleOutput([], [], [])


# --- the direct Llama decoder (alignbench.generation._LlamaDecoder) ----------------------------


def build_tiny_llama(**overrides):
    """A seeded 2-layer Llama over 32 token ids (the world models' architecture), built without a download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{
        "vocab_size": 32, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "initializer_range": 0.3, "tie_word_embeddings": True,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": PAD, **overrides,
    })
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama():
    return build_tiny_llama()


def through_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `sample` decode with the model's own forward and a DynamicCache."""
    monkeypatch.setattr(generation._LlamaDecoder, "of", classmethod(lambda cls, *args: None))


def test_llama_decoder_is_used_only_where_it_mirrors_the_forward(tiny_llama, tiny_gpt2) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    assert generation._LlamaDecoder.of(tiny_llama, 8) is not None
    assert generation._LlamaDecoder.of(tiny_gpt2, 8) is None
    grouped = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    assert generation._LlamaDecoder.of(grouped, 8) is None
    handle = tiny_llama.model.layers[0].mlp.register_forward_hook(lambda *args: None)
    assert generation._LlamaDecoder.of(tiny_llama, 8) is None  # a hook would not run
    handle.remove()
    # A replaced projection (as LoRA or quantisation do) is not an nn.Linear: its forward differs.
    q_proj = tiny_llama.model.layers[1].self_attn.q_proj
    tiny_llama.model.layers[1].self_attn.q_proj = torch.nn.Sequential(q_proj)
    assert generation._LlamaDecoder.of(tiny_llama, 8) is None


def assert_samples_like_the_transformers_forward(model, monkeypatch, temperature: float = 1.0, top_p: float = 1.0) -> None:
    # EOS = a likely token, so rows finish at different steps and finished rows get dropped.
    eos = int(first_token_probs(model, PROMPTS[0]).argsort()[-2])
    kwargs = {"seed": 5, "max_new_tokens": 12, "eos_token_id": eos, "num_samples": 3, "batch_size": 10, "temperature": temperature, "top_p": top_p}
    assert generation._LlamaDecoder.of(model, 8) is not None
    direct = draw(model, PROMPTS, **kwargs)
    with monkeypatch.context() as patch:
        through_transformers(patch)
        reference = draw(model, PROMPTS, **kwargs)
    assert any(direct.finished) and not all(direct.finished)
    assert direct.response_ids == reference.response_ids
    assert direct.finished == reference.finished
    # The logits differ in the last bits only (matmuls and attention sum in another order).
    torch.testing.assert_close(torch.tensor(direct.logprobs), torch.tensor(reference.logprobs), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(direct.sampling_logprobs), torch.tensor(reference.sampling_logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_llama_decoder_samples_like_the_transformers_forward(tiny_llama, monkeypatch, temperature: float, top_p: float) -> None:
    assert_samples_like_the_transformers_forward(tiny_llama, monkeypatch, temperature, top_p)


@pytest.mark.parametrize(
    "overrides",
    [
        {"attention_bias": True, "mlp_bias": True},  # biases, stacked with the q/k/v weights
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},  # a static rope scaling
        {"head_dim": 8, "num_attention_heads": 4, "num_key_value_heads": 4},  # a wider attention minimum (400 / 8 positions)
    ],
)
def test_llama_decoder_variants_sample_like_the_transformers_forward(monkeypatch, overrides) -> None:
    model = build_tiny_llama(**overrides)
    for module in model.modules():  # non-zero biases, so a misplaced one shows
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias, std=0.3)
    assert_samples_like_the_transformers_forward(model, monkeypatch)


def test_llama_decoder_without_stacked_weights_samples_alike(tiny_llama, monkeypatch) -> None:
    # Above _STACKED_WEIGHTS_MAX_BYTES the q/k/v projections stay three matmuls.
    monkeypatch.setattr(generation, "_STACKED_WEIGHTS_MAX_BYTES", 0)
    assert len(generation._LlamaDecoder.of(tiny_llama, 8).layers[0].qkv) == 3
    assert_samples_like_the_transformers_forward(tiny_llama, monkeypatch, 0.7, 0.9)


def test_llama_decoder_is_not_used_with_length_dependent_rope() -> None:
    dynamic = build_tiny_llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert generation._LlamaDecoder.of(dynamic, 8) is None


def test_llama_decoder_greedy_matches_hf_generate_and_scores_like_sequence_logprobs(tiny_llama) -> None:
    output = draw(tiny_llama, PROMPTS, max_new_tokens=10, temperature=0, batch_size=8)
    assert output.response_ids == [hf_greedy(tiny_llama, p, 10, eos_token_id=RARE) for p in PROMPTS]
    sampled = draw(tiny_llama, PROMPTS, seed=2, max_new_tokens=10, num_samples=2)
    prompts = [p for p in PROMPTS for _ in range(2)]
    _, expected = sequence_logprobs(tiny_llama, pack_sequences(prompts, sampled.response_ids, pad_token_id=PAD))
    torch.testing.assert_close(torch.tensor(sampled.logprobs), expected, atol=1e-4, rtol=0)


def test_model_trains_after_sampling(tiny_llama) -> None:
    # Sampling runs in inference mode; the model must still train afterwards.
    draw(tiny_llama.train(), PROMPTS, seed=0, max_new_tokens=4)
    _, logprobs = sequence_logprobs(tiny_llama, pack_sequences(PROMPTS[:2], [[3, 4], [5]], pad_token_id=PAD))
    logprobs.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tiny_llama.parameters() if p.requires_grad)
