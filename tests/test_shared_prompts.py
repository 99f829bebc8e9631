"""Shared-prompt rows (`pack_shared_prompts`, `shared_prompt_logprobs`): a prompt's responses packed
into one row with a block attention mask score as they do one per row (`sequence_logprobs`), on a
Llama, a GPT-2 and models with sliding-window attention, also packed several prompts to a row (`pack_width`); a response never sees its
row's other responses or prompts; packed demonstrations (in rows twice as wide where they are too
long to share a row of max_length) give the fine-tuning loss and gradients of one per row; and a DPO
step over shared rows (and a CPL step, which reads per-token log-probs) gives the loss and
gradients of the step over one row per response; and the gradient of a position read once per
response does not depend on the number of threads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset

from alignbench.data import DemonstrationDataModule, PreferenceDataModule, preference_rows
from alignbench.logprobs import pack_sequences, pack_shared_prompts, select_positions, sequence_logprobs, shared_prompt_logprobs
from alignbench.methods.cpl import CPL, CPLConfig
from alignbench.methods.dpo import DPO, DPOConfig
from alignbench.models import build_tiny_policy
from alignbench.sft import response_nll
from tests.test_offline_objectives import REFUSAL, make_method, run_step

# Prompts of different lengths with 1 to 4 responses, one of them empty and one long enough to be cut.
PROMPTS = [[3, 4, 5], [6, 7], [8, 9, 10, 11, 12], [13]]
RESPONSES = [[[14, 15, 16], [17], [18, 19, 20, 21]], [[22, 23]], [[24], [], [25, 26, 27, 28, 29, 30, 31, 14, 15, 16], [17, 18]], [[19, 20, 21]]]
MAX_LENGTH = 9


def one_row_per_response(prompts, responses, max_length=MAX_LENGTH):
    flat_prompts = [p for p, rs in zip(prompts, responses) for _ in rs]
    return pack_sequences(flat_prompts, [r for rs in responses for r in rs], pad_token_id=0, max_length=max_length)


def sliding_window_model(kind: str):
    """A tiny model whose attention sees the last 3 positions (all layers, or Qwen2's and Gemma 2's
    mix of windowed and full layers): shorter than the rows here, so the window changes the scores."""
    import transformers

    size = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2,
                max_position_embeddings=64, sliding_window=3)
    config = {
        "mistral": lambda: transformers.MistralConfig(**size),
        "qwen2": lambda: transformers.Qwen2Config(**size, use_sliding_window=True, max_window_layers=1),
        "gemma2": lambda: transformers.Gemma2Config(**size, head_dim=8),
    }[kind]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.fixture(params=["llama", "gpt2", "mistral", "qwen2", "gemma2"])
def model(request, tiny_gpt2, codec):
    if request.param == "gpt2":
        return tiny_gpt2
    if request.param != "llama":
        return sliding_window_model(request.param)
    torch.manual_seed(0)
    return build_tiny_policy("world-tiny", codec.tokenizer, seed=1).eval()


@pytest.mark.parametrize("pack_width", [None, 12])
def test_shared_rows_score_each_response_as_its_own_row_does(model, pack_width):
    """One prompt per row, or packed (groups of 11, 4, 12 and 4 tokens -> rows [12], [11], [4, 4])."""
    unshared = one_row_per_response(PROMPTS, RESPONSES)
    shared = pack_shared_prompts(PROMPTS, RESPONSES, pad_token_id=0, max_length=MAX_LENGTH, pack_width=pack_width)
    assert shared.num_responses == unshared.input_ids.shape[0] == 9
    assert shared.input_ids.shape == ((4, 12) if pack_width is None else (3, 12))
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


def test_a_position_read_once_per_response_gets_the_same_gradient_with_any_number_of_threads():
    """A prompt's last position predicts the first token of each of its responses, so shared rows
    read it several times (`response_tokens`). Its gradient is the sum of its reads', added in the
    order they are listed (`select_positions`). Advanced indexing (`values[rows, columns]`) added
    them with atomic adds from two threads in whatever order the threads ran: the same reward model
    trained to other weights from one run to the next."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(8, 120, 128, generator=generator)
    positions = torch.randint(0, 8 * 120, (900,), generator=generator)  # most of them listed more than once
    upstream = torch.randn(900, 128, generator=generator)
    assert len(positions.unique()) < 700
    rows, columns = positions // 120, positions % 120
    assert torch.equal(select_positions(values, positions), values[rows, columns])

    expected = torch.zeros(8 * 120, 128)
    for read, position in enumerate(positions.tolist()):  # the reads of a position in listed order
        expected[position] += upstream[read]

    def gradient(threads: int) -> torch.Tensor:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            leaf = values.clone().requires_grad_(True)
            (select_positions(leaf, positions) * upstream).sum().backward()
            return leaf.grad.flatten(0, 1)
        finally:
            torch.set_num_threads(previous)

    assert torch.equal(gradient(1), expected)
    for _ in range(20):
        assert torch.equal(gradient(2), expected)


@pytest.mark.parametrize("pack_width", [None, 16])
def test_a_response_never_sees_the_other_responses_of_its_row(model, pack_width):
    """Nor, packed, the other prompts of its row."""
    before = shared_prompt_logprobs(model, pack_shared_prompts(PROMPTS, RESPONSES, pad_token_id=0, pack_width=pack_width))[0]
    changed = [list(rs) for rs in RESPONSES]
    changed[0][0] = [21, 20, 19, 18, 17]  # the first response of the first prompt: others follow it in the row
    packed = pack_shared_prompts(PROMPTS, changed, pad_token_id=0, pack_width=pack_width)
    if pack_width is not None:  # the first prompt (11 tokens) shares its row with the second (4)
        assert packed.input_ids.shape[0] < len(PROMPTS) and packed.group.max() == 1
    after = shared_prompt_logprobs(model, packed)[0]
    assert not torch.isclose(after[0], before[0])
    torch.testing.assert_close(after[1:], before[1:], atol=1e-6, rtol=0)


def assert_packed_trains_as_padded(codec, batch) -> None:
    """The fine-tuning loss (`response_nll`), its token count and its gradients on a batch's packed
    layout equal those on its padded one (a row per demonstration)."""
    torch.manual_seed(0)
    policy = build_tiny_policy("world-tiny", codec.tokenizer, seed=1)
    results = []
    for layout in (batch.batch, batch.packed):
        policy.zero_grad()
        loss, n_tokens = response_nll(policy, layout)
        loss.backward()
        results.append((loss.detach(), int(n_tokens), [p.grad.clone() for p in policy.parameters()]))
    (padded_loss, padded_tokens, padded_grads), (packed_loss, packed_tokens, packed_grads) = results
    assert packed_tokens == padded_tokens == int(batch.batch.response_mask.sum())
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-6, rtol=0)
    for a, b in zip(padded_grads, packed_grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_packed_demonstrations_give_the_loss_and_gradients_of_one_per_row(world, codec):
    """The fine-tuning loss (`response_nll`) on `DemonstrationDataModule(pack=True)` batches."""
    prompts = world.sample_prompts("train", 48, seed=5)
    rng = np.random.default_rng(0)
    data = DemonstrationDataModule(Dataset.from_dict({"prompt": prompts, "response": [world.demonstrate(x, rng) for x in prompts]}), codec, 16, 48, pack=True)
    batch = next(iter(data.train_dataloader()))
    assert batch.scored is batch.packed and batch.size == 16
    assert batch.packed.input_ids.numel() < batch.batch.input_ids.numel() and batch.packed.input_ids.shape[1] <= 48
    assert_packed_trains_as_padded(codec, batch)
    unpacked = DemonstrationDataModule(data.dataset, codec, 16, 48)
    assert next(iter(unpacked.train_dataloader())).packed is None


@pytest.mark.parametrize("architecture, likelihood", [("llama", "none"), ("llama", "sum"), ("llama", "mean"), ("gpt2", "mean"), ("sequence_classification", "none"),
                                                      ("gemma2", "mean")])
def test_a_reward_model_scores_shared_packed_rows_as_one_row_per_response(tiny_gpt2, codec, tmp_path, architecture, likelihood):
    """`RewardModel.score_shared` against `forward` (each response's final state, its likelihood
    term; an empty response scored at its prompt's end), and the gradients of the ranking loss."""
    from transformers import AutoModelForSequenceClassification

    from alignbench.models import RewardModel
    from alignbench.reward import ranking_loss

    torch.manual_seed(0)
    if architecture == "gpt2":
        model = RewardModel.from_policy(tiny_gpt2, likelihood=likelihood)
    elif architecture == "llama":
        model = RewardModel.from_policy(build_tiny_policy("world-tiny", codec.tokenizer, seed=1), likelihood=likelihood)
    elif architecture == "gemma2":  # windowed and full layers: a mask per layer type
        model = RewardModel.from_policy(sliding_window_model("gemma2"), likelihood=likelihood)
    else:
        build_tiny_policy("world-tiny", codec.tokenizer, seed=1).save_pretrained(tmp_path / "policy")
        model = RewardModel.from_sequence_classifier(AutoModelForSequenceClassification.from_pretrained(tmp_path / "policy", num_labels=1))
    torch.nn.init.normal_(model.head.weight)  # a scalar head initialised at zero would score everything alike
    if likelihood != "none":
        model.likelihood_weight.data.fill_(0.5)
    model.eval()
    unshared = one_row_per_response(PROMPTS, RESPONSES)
    shared = pack_shared_prompts(PROMPTS, RESPONSES, pad_token_id=0, max_length=MAX_LENGTH, pack_width=12)
    row, end = shared.ends[5].tolist()  # the empty response: its prompt's last token
    assert shared.input_ids[row, end] == PROMPTS[2][-1] and shared.owner[row, end] == -1
    chosen, rejected = torch.tensor([0, 2, 4, 6, 7]), torch.tensor([1, 0, 5, 5, 4])
    group, num_groups = torch.tensor([0, 0, 2, 2, 2]), 4
    scores, grads = [], []
    for score in (lambda: model(unshared.input_ids, unshared.attention_mask, unshared.response_mask), lambda: model.score_shared(shared)):
        model.zero_grad()
        rewards = score()
        ranking_loss(rewards[chosen], rewards[rejected], group, num_groups)[0].backward()
        scores.append(rewards.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(scores[1], scores[0], atol=1e-5, rtol=0)
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)


def test_groups_are_packed_only_where_that_saves_tokens():
    """Three 12-token groups would fill 2 rows of 24 (48 tokens) against 3 rows of 12 (36): a row
    each. Three 3-token groups beside a 24-token one pack into its second row (48 against 96).
    Eight groups of 14 and 22 tokens keep a row each at width 24 and pack into 3 rows of 48."""
    even = pack_shared_prompts([[1] * 6] * 3, [[[2] * 6]] * 3, pad_token_id=0, pack_width=24)
    assert even.input_ids.shape == (3, 12) and even.group.max() == 0
    mixed = pack_shared_prompts([[1] * 20, [1] * 2, [1] * 2, [1] * 2], [[[2] * 4], [[2]], [[2]], [[2]]], pad_token_id=0, pack_width=24)
    assert mixed.input_ids.shape == (2, 24) and mixed.num_responses == 4
    # Groups of 14 and 22 tokens cannot share a row of 24; of several widths the first that packs.
    long = ([[1] * 10] * 6 + [[1] * 18] * 2, [[[2] * 4]] * 8)
    assert pack_shared_prompts(*long, pad_token_id=0, pack_width=24).input_ids.shape == (8, 22)
    assert pack_shared_prompts(*long, pad_token_id=0, pack_width=(24, 48)).input_ids.shape == (3, 44)


def test_demonstrations_too_long_to_share_a_row_pack_into_rows_twice_as_wide(codec):
    """Requests of 14 to 22 tokens (as the AI labeler's, 22-55 of 64) cannot share a row of
    max_length 24, but pack into rows of 48; the loss and gradients are those of one per row."""
    prompts = [("please list the numbers " * n).strip() for n in (2, 4, 2, 2, 4, 2, 2, 2)]
    data = DemonstrationDataModule(Dataset.from_dict({"prompt": prompts, "response": ["one two three"] * 8}), codec, 8, 24, pack=True)
    batch = next(iter(data.train_dataloader()))
    sizes = batch.batch.attention_mask.sum(1)
    assert 24 < 2 * sizes.min() and sizes.max() <= 24  # no two share a row of 24
    assert batch.scored is batch.packed and 24 < batch.packed.input_ids.shape[1] <= 48
    assert batch.packed.input_ids.numel() < batch.batch.input_ids.numel()
    assert_packed_trains_as_padded(codec, batch)


def test_demonstrations_that_do_not_pack_keep_the_padded_layout(codec):
    """Sequences near max_length would fill as many rows as padding does: no packed layout then."""
    prompt = "please list the numbers " * 4
    data = DemonstrationDataModule(Dataset.from_dict({"prompt": [prompt] * 8, "response": ["one two three"] * 8}), codec, 8, 32, pack=True)
    batch = next(iter(data.train_dataloader()))
    assert batch.batch.input_ids.shape[1] > 16 and batch.packed is None and batch.scored is batch.batch


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


@pytest.mark.parametrize("likelihood", ["none", "mean"])
def test_scores_of_responses_sharing_prompts_equal_each_response_scored_alone(world, codec, likelihood):
    """`score_texts` scores the samples of a prompt with the prompt once (shared-prompt rows) where
    prompts repeat; every score equals that of its (prompt, response) scored alone in a row of its
    own, duplicates and a response cut at max_length included, whatever the batches."""
    from alignbench.models import RewardModel
    from alignbench.reward import score_texts

    torch.manual_seed(0)
    model = RewardModel.from_policy(build_tiny_policy("world-tiny", codec.tokenizer, seed=1), likelihood=likelihood)
    torch.nn.init.normal_(model.head.weight)
    if likelihood != "none":
        model.likelihood_weight.data.fill_(0.5)
    rng = np.random.default_rng(0)
    texts = world.sample_prompts("test", 5, seed=2)
    prompts = [p for p in texts for _ in range(4)]
    responses = [world.demonstrate(p, rng) for p in prompts]
    prompts += [texts[0], texts[1]]
    responses += [responses[0], "apple " * 200]  # a repeat, and a response longer than max_length
    together = score_texts(model, codec, prompts, responses, max_length=32, batch_size=3)
    alone = torch.stack([score_texts(model, codec, [p], [y], max_length=32)[0] for p, y in zip(prompts, responses)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert together[-2] == together[0]
