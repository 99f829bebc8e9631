"""Best-of-n's KL to the policy it samples from, ties included (alignbench.methods.best_of_n):
the exact formula against a brute-force enumeration of every draw, the estimate from n candidates
against the exact KL of an enumerable model policy and against a Monte Carlo of the selection,
and the method reporting it."""

from __future__ import annotations

import itertools
import math
import types
import zlib

import numpy as np
import pytest
import torch

from alignbench.evaluation import EvalConfig, best_of_n_kl, sample_policy
from alignbench.generation import sample
from alignbench.methods.best_of_n import (
    BestOfN,
    BestOfNConfig,
    BestOfNGold,
    best_of_n_kl_estimate,
    best_of_n_kl_exact,
    best_of_n_law_kl,
)

EOS, PAD = 1, 0


def brute_force_kl(probs: list[float], rewards: list[float], n: int) -> float:
    """Every n-tuple of draws, the first best candidate selected (np.argmax), KL(π_bon ‖ q) summed exactly."""
    selected = np.zeros(len(probs))
    for draw in itertools.product(range(len(probs)), repeat=n):
        selected[draw[int(np.argmax([rewards[i] for i in draw]))]] += math.prod(probs[i] for i in draw)
    return float(sum(s * math.log(s / p) for s, p in zip(selected, probs) if s > 0))


def test_exact_kl_matches_a_brute_force_enumeration_of_the_selection():
    # Responses 0 and 2 tie on reward 1.0; 3 is the best; a rare middle one.
    probs, rewards = [0.4, 0.25, 0.2, 0.1, 0.05], [1.0, 0.0, 1.0, 2.0, 0.5]
    for n in (1, 2, 4, 6):
        assert best_of_n_kl_exact(probs, rewards, n) == pytest.approx(brute_force_kl(probs, rewards, n), rel=1e-12, abs=1e-15)
    # Distinct rewards but repeated responses: still below the tie-free formula.
    assert best_of_n_kl_exact(probs, [0, 1, 2, 3, 4], 4) < best_of_n_kl(4)


def test_law_kl_hand_values():
    # No atoms: log n − (n−1)/n (Stiennon 2020), the formula ties lower.
    assert best_of_n_law_kl([(1.0, False)], 16) == pytest.approx(math.log(16) - 15 / 16, rel=1e-12)
    assert best_of_n_law_kl([(0.3, False), (0.7, False)], 5) == pytest.approx(best_of_n_kl(5), rel=1e-12)
    # Two equally likely responses with distinct rewards, n = 2: π_bon = (1/4, 3/4).
    assert best_of_n_law_kl([(0.5, True), (0.5, True)], 2) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-12)
    # Everything ties: best-of-n is the policy itself.
    assert best_of_n_law_kl([(1.0, True)], 16) == 0.0
    assert best_of_n_kl_exact([0.6, 0.4], [1.0, 1.0], 8) == 0.0
    # n = 1 never changes the policy.
    assert best_of_n_law_kl([(0.2, True), (0.5, False), (0.3, True)], 1) == pytest.approx(0.0, abs=1e-15)


def test_estimate_without_ties_is_the_tie_free_formula():
    n = 16
    candidates = list(range(n))  # all distinct, each of negligible probability, distinct rewards
    estimate = best_of_n_kl_estimate(candidates, [math.log(1e-7)] * n, np.linspace(0, 1, n))
    assert estimate == pytest.approx(best_of_n_kl(n), rel=1e-5)
    # One response drawn every time: the candidates carry no choice, KL 0.
    assert best_of_n_kl_estimate([7] * n, [math.log(0.999)] * n, [0.3] * n) == pytest.approx(0.0, abs=1e-3)


def enumerate_policy(model, prompt: list[int], max_new_tokens: int, temperature: float) -> dict[tuple[int, ...], float]:
    """Every response of at most `max_new_tokens` tokens (ended by EOS, or cut) with its exact
    probability under `model` sampled at `temperature`, by walking the tree of prefixes."""
    finished: dict[tuple[int, ...], float] = {}
    frontier: dict[tuple[int, ...], float] = {(): 0.0}  # unfinished prefix -> its log-probability
    for step in range(max_new_tokens):
        prefixes = list(frontier)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(p) for p in prefixes])).logits[:, -1].double()
        rows = torch.log_softmax(logits / temperature, dim=-1).tolist()
        grown: dict[tuple[int, ...], float] = {}
        for prefix, row in zip(prefixes, rows):
            for token, logprob in enumerate(row):
                ends = token == EOS or step == max_new_tokens - 1
                (finished if ends else grown)[prefix + (token,)] = frontier[prefix] + logprob
        frontier = grown
    return {y: math.exp(lp) for y, lp in finished.items()}


REWARDS = {
    # gold-like: few levels, many responses tie on each
    "levels": lambda y: float(sum(y) % 4),
    # reward-model-like: every distinct response its own score
    "distinct": lambda y: zlib.crc32(bytes(y)) / 2**32,
}
PROMPTS = [[3, 4, 5], [12, 2], [20, 21]]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_estimate_from_candidates_matches_the_exact_kl_of_an_enumerable_policy(tiny_gpt2, temperature):
    """A 32-token GPT-2 answering in at most 3 tokens (about 31^2 + 31 + 1 responses per prompt,
    enumerated exactly); best-of-16 from its candidates, with the sampler's probabilities at T."""
    n, groups, max_new = 16, 120, 3
    laws = [enumerate_policy(tiny_gpt2, prompt, max_new, temperature) for prompt in PROMPTS]
    assert all(sum(law.values()) == pytest.approx(1.0, abs=1e-9) for law in laws)
    out = sample(tiny_gpt2, PROMPTS, max_new_tokens=max_new, eos_token_id=EOS, pad_token_id=PAD, temperature=temperature,
                 num_samples=n * groups, batch_size=4096, generator=torch.Generator().manual_seed(0))
    ids = [tuple(y) for y in out.response_ids]
    # The sampler's probability of each candidate is its exact probability under the enumerated law.
    assert all(math.exp(out.sampling_logprobs[i]) == pytest.approx(laws[i // (n * groups)][ids[i]], rel=1e-4) for i in range(0, len(ids), 37))
    repeats = np.mean([len(set(ids[k : k + n])) < n for k in range(0, len(ids), n)])
    assert repeats > 0.9  # candidates repeat each other: the tie-free formula would be wrong here
    for name, reward in REWARDS.items():
        exact = np.mean([best_of_n_kl_exact(list(law.values()), [reward(y) for y in law], n) for law in laws])
        estimates = [
            best_of_n_kl_estimate(ids[k : k + n], out.sampling_logprobs[k : k + n], [reward(y) for y in ids[k : k + n]])
            for k in range(0, len(ids), n)
        ]
        estimate = np.mean(estimates)
        # Tolerances of about 2 standard errors of the mean of 360 estimates (0.3% and 2.5%).
        assert estimate == pytest.approx(exact, rel=0.01 if name == "distinct" else 0.05), (name, estimate, exact)
        if name == "levels":
            assert exact < 0.8 * best_of_n_kl(n)  # ties matter
            # A second, independent computation: a Monte Carlo of the selection itself (draw 16
            # responses from the enumerated law, keep the first best), the selected levels' law
            # against the policy's, KL(π_bon ‖ q) being the KL between the two (module docstring).
            rng = np.random.default_rng(1)
            monte_carlo = []
            for law in laws:
                responses, probs = list(law), np.array(list(law.values()))
                levels = np.array([reward(y) for y in responses])
                draws = levels[rng.choice(len(responses), size=(20000, n), p=probs / probs.sum())]
                picked = draws.max(axis=1)
                level_kl = 0.0
                for v in np.unique(levels):
                    w, p = float(np.mean(picked == v)), float(probs[levels == v].sum())
                    level_kl += w * math.log(w / p) if w > 0 else 0.0
                monte_carlo.append(level_kl)
            assert np.mean(monte_carlo) == pytest.approx(exact, rel=0.02)
            assert estimate == pytest.approx(np.mean(monte_carlo), rel=0.05)


class ScoreByLength:
    """A reward with ties: the number of words of the response."""

    def score_batch(self, prompts, responses):
        return np.array([float(len(r.split())) for r in responses])


def test_best_of_n_responds_with_the_first_best_candidate_and_reports_its_kl(world, codec):
    from alignbench.models import build_tiny_policy, freeze
    from alignbench.training import Budget

    policy = freeze(build_tiny_policy("world-tiny", codec.tokenizer, seed=0))
    config = EvalConfig(max_new_tokens=4, temperature=0.5, batch_size=256)
    context = types.SimpleNamespace(load_policy=lambda trainable: policy, budget=Budget(), reward_model_labels=0, codec=codec, eval_config=config, gold_judge=ScoreByLength())
    method = BestOfNGold(BestOfNConfig(n=4), context)
    prompts = world.sample_prompts("test", 6, seed=0)
    responses = method.respond(prompts, torch.Generator().manual_seed(3))
    assert context.budget.policy_samples == 24
    # The same candidates again (same stream): the response is the first longest, the KL its estimate.
    candidates = sample_policy(policy, None, codec, prompts, config, torch.Generator().manual_seed(3), num_samples=4)
    for i in range(len(prompts)):
        block = slice(4 * i, 4 * i + 4)
        lengths = [len(t.split()) for t in candidates.texts[block]]
        assert responses.texts[i] == candidates.texts[block][int(np.argmax(lengths))]
        expected = best_of_n_kl_estimate([tuple(y) for y in candidates.response_ids[block]], candidates.sampling_logprobs[block], lengths)
        assert responses.kl[i] == pytest.approx(expected, abs=1e-12)
    assert len(responses.kl) == len(prompts) and np.mean(responses.kl) < best_of_n_kl(4)


def test_best_of_n_and_best_of_n_gold_share_candidates_that_equal_separate_sampling(tmp_path, tiny_overrides):
    """The candidates stage: drawn once per stream and reused; the same draws as sampling anew."""
    from alignbench.experiment import for_run, load_experiment, method_config
    from alignbench.pipeline import Pipeline
    from alignbench.seeding import seeded_generator

    config = for_run(load_experiment("quickstart", [*tiny_overrides, "best_of_n.n=4", "best_of_n_gold.n=4"]), "best_of_n", 0)
    context = Pipeline(config, tmp_path).context()
    prompts = context.evaluator.prompts["test"][:24]
    shared = BestOfN(method_config(config), context).respond(prompts, seeded_generator(0, "policy", "test"))
    assert len(list((tmp_path / "cache").glob("candidates-*"))) == 1
    gold = BestOfNGold(method_config(config), context)
    gold.respond(prompts, seeded_generator(0, "policy", "test"))
    assert len(list((tmp_path / "cache").glob("candidates-*"))) == 1  # the gold chooser read the same candidates
    gold.respond(prompts, seeded_generator(1, "policy", "test"))
    assert len(list((tmp_path / "cache").glob("candidates-*"))) == 2  # another stream, other candidates
    context.stages = None  # sample directly, as without a pipeline
    fresh = BestOfN(method_config(config), context).respond(prompts, seeded_generator(0, "policy", "test"))
    assert shared.response_ids == fresh.response_ids and shared.texts == fresh.texts
    np.testing.assert_array_equal(shared.kl, fresh.kl)
