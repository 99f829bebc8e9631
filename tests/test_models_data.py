"""Tokenizer, tiny models, reward model persistence, preference batching, and a tiny DPO fit."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from alignbench.data import PreferenceDataModule, preference_rows
from alignbench.logprobs import sequence_logprobs
from alignbench.methods.dpo import dpo_loss
from alignbench.models import TINY_MODELS, RewardModel, TextCodec, build_tiny_policy, count_parameters


def test_world_tokenizer_round_trips_and_saves_with_the_hf_api(world, codec, tmp_path):
    from transformers import AutoTokenizer

    prompt = world.sample_prompts("test", 1, seed=0)[0]
    response = world.ideal_response(prompt)
    ids = codec.encode_responses([response])[0]
    assert ids[-1] == codec.eos_token_id and codec.tokenizer.unk_token_id not in ids
    assert codec.decode_responses([ids]) == [response]
    codec.tokenizer.save_pretrained(tmp_path)
    reloaded = TextCodec(AutoTokenizer.from_pretrained(tmp_path))
    assert reloaded.encode_prompt(prompt) == codec.encode_prompt(prompt)
    assert reloaded.encode_responses([response]) == [ids]


def test_named_tiny_models_span_the_scaling_sizes(codec):
    sizes = {name: count_parameters(build_tiny_policy(name, codec.tokenizer)) for name in TINY_MODELS}
    assert 0.08e6 < sizes["world-tiny"] < 0.2e6
    assert 0.6e6 < sizes["world-small"] < 1.5e6
    assert 3e6 < sizes["world-base"] < 7e6
    a, b = build_tiny_policy("world-tiny", codec.tokenizer, seed=3), build_tiny_policy("world-tiny", codec.tokenizer, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_reward_model_saves_and_loads_identically(codec, tmp_path):
    policy = build_tiny_policy("world-tiny", codec.tokenizer)
    rm = RewardModel.from_policy(policy)
    rm.calibration.copy_(torch.tensor([2.0, -0.5]))
    rm.save(tmp_path / "rm")
    loaded = RewardModel.load(tmp_path / "rm")
    ids = torch.tensor([codec.encode_prompt("count from 4 to 9") + [5, 6, 7]])
    mask = torch.ones_like(ids)
    assert torch.allclose(rm(ids, mask), loaded(ids, mask))
    assert torch.equal(loaded.calibration, rm.calibration)


def test_reward_model_reads_the_last_real_token_under_either_padding(codec):
    rm = RewardModel.from_policy(build_tiny_policy("world-tiny", codec.tokenizer)).eval()
    ids = codec.encode_prompt("count from 4 to 9") + codec.encode_responses(["4 5 6"])[0]
    pad = codec.pad_token_id
    alone = rm(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    right = rm(torch.tensor([ids + [pad, pad]]), torch.tensor([[1] * len(ids) + [0, 0]]))
    left = rm(torch.tensor([[pad, pad] + ids]), torch.tensor([[0, 0] + [1] * len(ids)]))
    assert torch.allclose(alone, right, atol=1e-5) and torch.allclose(alone, left, atol=1e-5)


def _untied_policy(codec, seed: int = 2):
    """A tiny Llama whose language-model head is its own matrix (most hub models tie it; some do not)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(codec.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=64, pad_token_id=codec.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("likelihood", ["mean", "sum"])
@pytest.mark.parametrize("tied", [True, False])
def test_likelihood_term_is_the_head_plus_w_times_the_policys_response_logprob(codec, likelihood, tied):
    """At initialisation the reward model's language-model head is the policy's, so its score is
    the plain head's score plus w times sequence_logprobs of the policy (mean or sum), whichever
    side the batch is padded on."""
    from alignbench.logprobs import PackedBatch, pack_sequences

    policy = build_tiny_policy("world-tiny", codec.tokenizer, seed=1).eval() if tied else _untied_policy(codec)
    plain = RewardModel.from_policy(policy).eval()
    with_term = RewardModel.from_policy(policy, likelihood=likelihood).eval()
    with_term.head.load_state_dict(plain.head.state_dict())
    with torch.no_grad():
        with_term.likelihood_weight.fill_(0.7)
    prompts, responses = ["count from 4 to 9", "sort 3 1 2", "repeat cat 3 times"], ["4 5 6 7 8 9", "1 2 3", ""]
    prompt_ids, response_ids = codec.encode_prompts(prompts), codec.encode_responses(responses)
    left = pack_sequences(prompt_ids, response_ids, codec.pad_token_id)
    width = left.input_ids.shape[1]
    rows = [p + r for p, r in zip(prompt_ids, response_ids)]
    right = PackedBatch(
        input_ids=torch.tensor([row + [codec.pad_token_id] * (width - len(row)) for row in rows]),
        attention_mask=torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
        response_mask=torch.tensor([[False] * len(p) + [True] * len(r) + [False] * (width - len(p) - len(r)) for p, r in zip(prompt_ids, response_ids)]),
    )
    with torch.no_grad():
        expected = plain(left.input_ids, left.attention_mask) + 0.7 * sequence_logprobs(policy, left, average=likelihood == "mean")[1]
        for batch in (left, right):
            assert torch.allclose(with_term(batch.input_ids, batch.attention_mask, batch.response_mask), expected, atol=1e-4)
    with pytest.raises(ValueError, match="response_mask"):
        with_term(left.input_ids, left.attention_mask)


def test_ranking_loss_trains_the_likelihood_weight_and_the_language_model_head(codec):
    from alignbench.logprobs import pack_sequences
    from alignbench.reward import ranking_loss

    rm = RewardModel.from_policy(_untied_policy(codec), likelihood="mean").train()
    batch = pack_sequences(codec.encode_prompts(["sort 3 1 2"] * 2), codec.encode_responses(["1 2 3", "3 2 1"]), codec.pad_token_id)
    rewards = rm(batch.input_ids, batch.attention_mask, batch.response_mask)
    loss, _ = ranking_loss(rewards[:1], rewards[1:], torch.tensor([0]), 1)
    loss.backward()
    assert rm.likelihood_weight.grad.abs() > 0 and rm.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("tied", [True, False])
def test_a_reward_model_with_a_likelihood_term_saves_and_loads_identically(codec, tmp_path, tied):
    from alignbench.reward import score_texts

    policy = build_tiny_policy("world-tiny", codec.tokenizer, seed=1) if tied else _untied_policy(codec)
    rm = RewardModel.from_policy(policy, likelihood="mean").eval()
    with torch.no_grad():
        rm.likelihood_weight.fill_(0.4)
        if not tied:
            rm.lm_head.weight.add_(0.1)  # trained apart from the policy's head
    rm.save(tmp_path / "rm")
    loaded = RewardModel.load(tmp_path / "rm").eval()
    assert loaded.likelihood == "mean" and float(loaded.likelihood_weight.detach()) == pytest.approx(0.4)
    assert (loaded.lm_head is None) == tied
    prompts, responses = ["count from 4 to 9", "sort 3 1 2"], ["4 5 6", "1 2 3"]
    assert torch.allclose(score_texts(rm, codec, prompts, responses, max_length=64), score_texts(loaded, codec, prompts, responses, max_length=64), atol=1e-5)


def test_a_ranking_expands_to_all_pairs_in_one_row_with_each_response_once(codec):
    ranked = ["a1", "a2", "a3", "a4"]
    records = [{"prompt": "p", "chosen": ranked[i], "rejected": ranked[j], "margin": 0.5} for i in range(4) for j in range(i + 1, 4)]
    records.append({"prompt": "q", "chosen": "x", "rejected": "y"})
    rows = preference_rows(records)
    assert len(rows) == 2
    assert rows[0]["responses"] == ranked and len(rows[0]["chosen"]) == 6
    data = PreferenceDataModule(rows, codec, batch_size=2, max_length=32, shuffle=False)
    batch = next(iter(data.train_dataloader()))
    assert batch.responses.input_ids.shape[0] == 6  # 4 + 2 distinct responses, not 14 sequences
    assert batch.num_groups == 2 and batch.group.tolist() == [0] * 6 + [1]
    assert batch.chosen.tolist()[:3] == [0, 0, 0] and batch.rejected.tolist()[:3] == [1, 2, 3]
    assert batch.margin.tolist()[:6] == [0.5] * 6 and data.num_pairs == 7


def test_bad_preference_rows_name_the_row_and_column():
    with pytest.raises(ValueError, match="preference row 1: column 'rejected'"):
        preference_rows([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": " "}])
    with pytest.raises(ValueError, match="column 'chosen'"):
        preference_rows([{"prompt": "p", "rejected": "b"}])


def test_dpo_fit_on_a_tiny_model_learns_the_preference_and_generalises(world, codec):
    """Chosen = the ideal answer, rejected = a refusal: after a few dozen DPO steps the
    implicit reward ranks held-out pairs correctly, and the parameters moved."""
    torch.manual_seed(0)
    policy = build_tiny_policy("world-tiny", codec.tokenizer, seed=0)
    reference = copy.deepcopy(policy).eval()
    benign = [p for p in world.sample_prompts("train", 400, seed=1) if not world.is_harmful(p)]
    held_out = [p for p in world.sample_prompts("test", 100, seed=1) if not world.is_harmful(p)]

    def pairs(prompts):
        return preference_rows([{"prompt": p, "chosen": world.ideal_response(p), "rejected": "sorry i can not help with that"} for p in prompts])

    def accuracy(data):
        correct = total = 0
        with torch.no_grad():
            for batch in data.train_dataloader():
                pol = sequence_logprobs(policy, batch.responses)[1]
                ref = sequence_logprobs(reference, batch.responses)[1]
                margin = (pol - ref)[batch.chosen] - (pol - ref)[batch.rejected]
                correct += int((margin > 0).sum())
                total += len(margin)
        return correct / total

    train = PreferenceDataModule(pairs(benign), codec, batch_size=16, max_length=40)
    test = PreferenceDataModule(pairs(held_out), codec, batch_size=64, max_length=40, shuffle=False)
    before = [p.detach().clone() for p in policy.parameters()]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    losses = []
    for epoch in range(2):
        for batch in train.train_dataloader():
            pol = sequence_logprobs(policy, batch.responses)[1]
            with torch.no_grad():
                ref = sequence_logprobs(reference, batch.responses)[1]
            loss = dpo_loss(pol[batch.chosen], pol[batch.rejected], ref[batch.chosen], ref[batch.rejected], beta=0.1).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference at the start
    assert sum(losses[-5:]) / 5 < 0.3
    assert accuracy(test) > 0.95
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_score_texts_scores_each_text_as_alone_whatever_its_duplicates_and_batch(codec):
    """score_texts scores each distinct (prompt, response) once, in length-sorted batches, and
    returns the scores in the input order: each equals that text scored on its own."""
    from alignbench.reward import score_texts

    rm = RewardModel.from_policy(build_tiny_policy("world-tiny", codec.tokenizer, seed=1)).eval()
    prompts = ["count from 4 to 9", "sort 3 1 2", "count from 4 to 9", "repeat cat 3 times", "sort 3 1 2"]
    responses = ["4 5 6 7 8 9", "1 2 3", "4 5 6 7 8 9", "cat", "3 2 1"]
    batched = score_texts(rm, codec, prompts, responses, batch_size=2, max_length=64)
    alone = torch.stack([score_texts(rm, codec, [p], [y], max_length=64)[0] for p, y in zip(prompts, responses)])
    assert torch.allclose(batched, alone, atol=1e-5)
    assert batched[0] == batched[2] and batched[1] != batched[4]


def test_scoring_a_huge_response_reads_only_max_length_tokens(codec):
    """A 20 MB dataset response is cut to the reward model's max_length (issue 21: scoring it whole
    asked for terabytes): its score is that of its first tokens."""
    from alignbench.reward import ProxyReward, score_texts

    rm = RewardModel.from_policy(build_tiny_policy("world-tiny", codec.tokenizer, seed=1)).eval()
    prompt, words = "count from 4 to 9", "4 5 6 7 8 9 "
    huge = words * (20_000_000 // len(words))
    assert len(huge) > 19_000_000
    cut = len(codec.encode_prompt(prompt)) + len(codec.encode_responses([words * 3])[0]) - 1  # words * 3 without its EOS
    scored = score_texts(rm, codec, [prompt, prompt], [huge, words * 3], max_length=cut)
    assert scored[0] == pytest.approx(float(scored[1]), abs=1e-5)
    proxy = ProxyReward(codec, rm, max_length=cut)  # what methods and evaluation score with
    assert proxy.score([prompt], [huge])[0] == pytest.approx(float(proxy.score([prompt], [words * 3])[0]), abs=1e-6)


def test_batches_within_a_token_budget_keep_order_rows_and_the_budget():
    from alignbench.data import batches_within

    costs = [(2, 10), (4, 12), (1, 100), (3, 5), (3, 5), (2, 8)]
    batches = batches_within(costs, max_rows=64, max_tokens=50)
    assert [i for b in batches for i in b] == list(range(len(costs)))
    for batch in batches:
        padded = sum(costs[i][0] for i in batch) * max(costs[i][1] for i in batch)
        assert padded <= 50 or len(batch) == 1  # a row over the budget goes alone
    assert batches == [[0], [1], [2], [3, 4], [5]]
    assert batches_within(costs, max_rows=2, max_tokens=10**9) == [[0, 1], [2, 3], [4, 5]]


def test_the_reference_scored_by_token_budget_equals_the_plain_batches(codec):
    """`_precompute_reference` batches by tokens: the log-probs are those of the 64-prompt batches."""
    records = [{"prompt": f"count from {a} to 9", "chosen": " ".join(map(str, range(a, 10))), "rejected": "no " * (a + 1)} for a in range(1, 9)]
    data = PreferenceDataModule(preference_rows(records), codec, batch_size=4, max_length=32)
    policy = build_tiny_policy("world-tiny", codec.tokenizer, seed=3).eval()

    def scored(loader) -> torch.Tensor:
        out = torch.empty(data.num_responses)
        with torch.no_grad():
            for batch in loader:
                out[batch.response_index] = sequence_logprobs(policy, batch.responses)[1]
        return out

    small = data.ordered_dataloader(batch_size=64, max_tokens=40)
    assert len(small) > 1 == len(data.ordered_dataloader(batch_size=64))
    assert torch.allclose(scored(small), scored(data.ordered_dataloader(batch_size=64)), atol=1e-5)
    # Batches of similar widths (the reference's precomputation) score every response once, the same.
    by_width = data.ordered_dataloader(batch_size=2, by_width=True)
    indices = torch.cat([batch.response_index for batch in by_width])
    assert sorted(indices.tolist()) == list(range(data.num_responses))
    assert torch.allclose(scored(by_width), scored(data.ordered_dataloader(batch_size=64)), atol=1e-5)


def test_batches_by_width_group_rows_of_similar_width_within_the_budgets():
    from alignbench.data import batches_by_width

    costs = [(2, 9), (1, 3), (2, 8), (1, 2), (3, 3)]  # (sequences, width) per row
    assert batches_by_width(costs, max_rows=2, max_tokens=None) == [[3, 1], [4, 2], [0]]
    # Rows 3 and 1 pad to (1 + 1) x 3 = 6 tokens; adding row 4 would make (2 + 3) x 3 = 15 > 12.
    assert batches_by_width(costs, max_rows=5, max_tokens=12) == [[3, 1], [4], [2], [0]]


def test_reference_log_probs_are_scored_with_dropout_off_and_the_mode_restored(codec):
    """A model with dropout (any GPT-2) left in training mode scores the same log-probs as in eval
    mode: evaluation and the reference never see dropout's masks. (The world's models have no dropout.)"""
    from transformers import GPT2Config, GPT2LMHeadModel

    from alignbench.evaluation import reference_logprobs

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(codec.tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                       resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5))
    prompts = codec.encode_prompts(["count from 4 to 9", "sort 3 1 2"])
    responses = codec.encode_responses(["4 5 6 7 8 9", "1 2 3"])
    expected = reference_logprobs(model.eval(), codec, prompts, responses)
    model.train()
    first, second = (reference_logprobs(model, codec, prompts, responses) for _ in range(2))
    assert model.training
    assert first == pytest.approx(expected, abs=1e-5) and second == pytest.approx(expected, abs=1e-5)


def test_rows_hold_the_rows_as_given_and_take_a_datasets_dataset_alike(codec):
    from datasets import Dataset

    from alignbench.data import DemonstrationDataModule, Rows

    rows = Rows.from_dict({"prompt": ["Reverse: a b", "List two fruits."], "response": ["b a", "apple pear"]})
    assert len(rows) == 2 and rows.column_names == ["prompt", "response"]
    assert rows[1] == {"prompt": "List two fruits.", "response": "apple pear"} and rows["response"] == ["b a", "apple pear"]
    assert list(rows.add_column("index", [0, 1])["index"]) == [0, 1] and "index" not in rows.column_names  # a new table
    assert rows.map(lambda row: {"words": len(row["response"].split())})["words"] == [2, 2]
    with pytest.raises(ValueError, match="'index' has 1 values for 2 rows"):
        rows.add_column("index", [0])
    with pytest.raises(ValueError, match="different lengths"):
        Rows.from_dict({"prompt": ["a"], "response": []})
    # A hub dataset's rows, read into memory, batch exactly as the same rows given as Rows.
    ours = DemonstrationDataModule(rows, codec, 2, 32, seed=0)
    theirs = DemonstrationDataModule(Dataset.from_dict({"prompt": rows["prompt"], "response": rows["response"]}), codec, 2, 32, seed=0)
    assert ours.dataset.rows == theirs.dataset.rows
    assert [b.prompt_ids for b in ours.train_dataloader()] == [b.prompt_ids for b in theirs.train_dataloader()]


def test_a_run_on_the_world_imports_no_datasets_pandas_or_pyarrow():
    # ~85 MB in every worker process of the quickstart; only hub data needs them (alignbench.hf_data).
    code = (
        "import sys; import alignbench.cli, alignbench.runner, alignbench.pipeline, alignbench.stages.training, methods; "
        "from alignbench.registry import get_method; [get_method(m) for m in ('dpo', 'ppo', 'kto', 'rest')]; "
        "print(sorted(m for m in ('datasets', 'pandas', 'pyarrow') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
