"""The LM judge (Lee et al. 2023's recipe) on a tiny HF model saved and reloaded locally,
and the simulated annotators' human / AI profiles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignbench.annotator import SimulatedAnnotator, annotator_profile
from alignbench.judges import LMJudge, next_token_logprobs
from alignbench.models import TextCodec, build_tiny_policy, build_world_tokenizer, load_pretrained_policy, load_tokenizer
from alignbench.world import JUDGMENT_ANSWERS, JUDGMENT_REQUEST, RATING_ANSWERS, RATING_REQUEST, AssistantWorld

PROMPTS = ["list 3 fruits", "sort 7 2 5", "explain how to steal a car", "count from 4 to 9"]
A = ["apple pear plum", "2 5 7", "sorry i can not help with that", "4 5 6 7 8 9"]
B = ["apple car", "7 5 2", "step one find the car step two steal it", "4 5 6"]


@pytest.fixture(scope="module")
def saved_judge_model(tmp_path_factory):
    """A tiny Llama-style model and its chat-template tokenizer, saved to disk and loaded back by path."""
    directory = tmp_path_factory.mktemp("judge-model")
    tokenizer = build_world_tokenizer(AssistantWorld().vocabulary())
    torch.manual_seed(0)
    model = build_tiny_policy("world-tiny", tokenizer, seed=3)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return load_pretrained_policy(str(directory)).eval(), TextCodec(load_tokenizer(str(directory)))


def make_judge(saved, **kwargs) -> LMJudge:
    model, codec = saved
    options = dict(comparison_template=JUDGMENT_REQUEST, answer_words=JUDGMENT_ANSWERS, rating_template=RATING_REQUEST, rating_words=RATING_ANSWERS)
    options.update(kwargs)
    return LMJudge(model, codec, ["do not help with harmful requests", "never insult the user"], **options)


@pytest.mark.parametrize("sampling", ["all", "random"])
def test_order_averaged_preferences_of_both_orders_sum_to_one(saved_judge_model, sampling):
    judge = make_judge(saved_judge_model, principle_sampling=sampling)
    forward, backward = judge.prefer_batch(PROMPTS, A, B), judge.prefer_batch(PROMPTS, B, A)
    np.testing.assert_allclose(forward + backward, 1.0, atol=1e-9)
    assert math.isclose(judge.prefer(PROMPTS[0], A[0], B[0]) + judge.prefer(PROMPTS[0], B[0], A[0]), 1.0, abs_tol=1e-9)
    # a response against itself is a coin flip, whatever the model's position bias
    np.testing.assert_allclose(judge.prefer_batch(PROMPTS, A, A), 0.5, atol=1e-9)


def test_one_order_preference_is_the_softmax_of_the_two_answer_logprobs(saved_judge_model):
    judge = make_judge(saved_judge_model)
    model, codec = saved_judge_model
    rule = judge.principles[0]
    request = JUDGMENT_REQUEST.format(rule=rule, prompt=PROMPTS[0], a=A[0], b=B[0])
    ids = torch.tensor([codec.encode_prompt(request)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    a_id, b_id = (codec.tokenizer.convert_tokens_to_ids(w) for w in JUDGMENT_ANSWERS)
    hand = math.exp(logits[a_id]) / (math.exp(logits[a_id]) + math.exp(logits[b_id]))
    assert math.isclose(judge.first_preferred([PROMPTS[0]], [A[0]], [B[0]], [rule])[0], hand, rel_tol=1e-5)
    # batched with left padding: the same numbers as one request at a time
    together = next_token_logprobs(model, codec, [request, "list 3 fruits"], [a_id, b_id])
    alone = next_token_logprobs(model, codec, [request], [a_id, b_id])
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-5)


def test_rating_words_outside_the_vocabulary_fail_only_when_a_rating_is_asked_for(saved_judge_model):
    """RLAIF's labeler only compares, so a tokenizer without the rating numbers must not stop it;
    direct scoring then names the word it cannot represent."""
    judge = make_judge(saved_judge_model, rating_words=["0", "5", "elevenish"])
    np.testing.assert_allclose(judge.prefer_batch(PROMPTS, A, B) + judge.prefer_batch(PROMPTS, B, A), 1.0, atol=1e-9)
    with pytest.raises(ValueError, match="answer word 'elevenish' is not in the judge's vocabulary"):
        judge.score_batch(PROMPTS[:1], A[:1])


def test_score_is_the_expected_rating_scaled_to_one(saved_judge_model):
    judge = make_judge(saved_judge_model)
    model, codec = saved_judge_model
    scores = judge.score_batch(PROMPTS[:2], A[:2])
    assert scores.shape == (2,) and np.all((scores >= 0) & (scores <= 1))
    ids = [codec.tokenizer.convert_tokens_to_ids(w) for w in RATING_ANSWERS]
    expected = []
    for rule in judge.principles:
        logprobs = next_token_logprobs(model, codec, [RATING_REQUEST.format(rule=rule, prompt=PROMPTS[0], response=A[0])], ids)[0]
        expected.append(float((torch.softmax(logprobs, -1) * torch.arange(11.0)).sum() / 10))
    assert math.isclose(scores[0], np.mean(expected), rel_tol=1e-5)


def test_missing_answer_tokens_are_an_error_or_an_undecided_half(saved_judge_model):
    with pytest.raises(ValueError, match="'yes'.*not in the judge's vocabulary"):
        make_judge(saved_judge_model, answer_words=("yes", "b"))
    with pytest.raises(ValueError, match="share a first token"):
        make_judge(saved_judge_model, answer_words=("a", "a"))
    # a model that puts (almost) no mass on the answer words abstains: ½ for that order
    judge = make_judge(saved_judge_model, min_answer_mass=1.0)
    np.testing.assert_allclose(judge.prefer_batch(PROMPTS, A, B), 0.5)
    assert judge.abstentions == 2 * len(PROMPTS) * len(judge.principles)


@pytest.mark.parametrize("profile", ["human", "ai"])
def test_simulated_annotator_profiles_have_the_accuracy_and_position_bias_they_are_set_to(profile):
    world = AssistantWorld()
    config = annotator_profile(profile)
    annotator = SimulatedAnnotator(world, config)
    rng = np.random.default_rng(0)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    flip = lambda p: (1 - config.flip_rate) * p + config.flip_rate * (1 - p)  # noqa: E731
    n = 6000
    # equal gold utility and length: the first shown wins with σ(position bias), after flips
    tie = [annotator.label_pair("list 3 fruits", "apple pear plum", "apple plum pear", rng).chosen == "apple pear plum" for _ in range(n)]
    assert annotator.utility("list 3 fruits", "apple pear plum") == annotator.utility("list 3 fruits", "apple plum pear")
    assert abs(np.mean(tie) - flip(sigmoid(config.position_bias))) < 0.02
    # a gold gap g between equal-length responses: P(correct) = flip(σ(g / T + bias)) when the better is first
    prompt, better, worse = "list 3 fruits", "apple pear plum", "apple pear bus"
    gap = annotator.utility(prompt, better) - annotator.utility(prompt, worse)
    assert gap > 0
    correct = [annotator.label_pair(prompt, better, worse, rng).chosen == better for _ in range(n)]
    assert abs(np.mean(correct) - flip(sigmoid(gap / config.temperature + config.position_bias))) < 0.02


def test_a_huge_response_is_cut_before_it_enters_the_judges_request(saved_judge_model):
    """A 20 MB response is judged (and rated) as its first max_response_chars characters: the
    request never holds it whole."""
    judge = make_judge(saved_judge_model, max_response_chars=200)
    prompt, short = "list 3 fruits", "apple banana cherry"
    huge = ("banana " * 3_000_000)[: 20_000_000]
    cut = huge[:200]
    np.testing.assert_array_equal(judge.prefer_batch([prompt], [huge], [short]), judge.prefer_batch([prompt], [cut], [short]))
    np.testing.assert_array_equal(judge.score_batch([prompt], [huge]), judge.score_batch([prompt], [cut]))


def test_judged_requests_come_back_in_their_order_whatever_batches_their_lengths_make(saved_judge_model):
    """next_token_logprobs batches requests by length and reads the last position's logits only; each
    row must still be its own request's, equal to the full forward of that request alone."""
    model, codec = saved_judge_model
    requests = [JUDGMENT_REQUEST.format(rule="never insult the user", prompt=p, a=a, b=b) for p, a, b in zip(PROMPTS, A, B)]
    requests = [requests[0], "list 3 fruits", requests[1], "sort 7 2 5 and 4", requests[2], requests[3], "hi"]
    ids = [codec.tokenizer.convert_tokens_to_ids(w) for w in JUDGMENT_ANSWERS]
    with torch.no_grad():
        expected = torch.stack([
            torch.log_softmax(model(input_ids=torch.tensor([codec.encode_prompt(r)])).logits[0, -1], dim=-1)[ids] for r in requests
        ])
    for batch_size in (1, 2, 3, 256):
        torch.testing.assert_close(next_token_logprobs(model, codec, requests, ids, batch_size=batch_size), expected, atol=1e-5, rtol=1e-5)
