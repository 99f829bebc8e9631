"""Statistics of the evaluation protocol."""

import math

import numpy as np
import pytest

from alignbench.evaluation import best_of_n_kl, bootstrap_ci, distinct_n
from alignbench.judges import preference_from_scores


def test_bootstrap_interval_covers_the_true_win_rate_at_its_nominal_rate():
    rng = np.random.default_rng(0)
    true_p, n, trials, covered = 0.6, 400, 300, 0
    for t in range(trials):
        # win = 1, loss = 0, tie = 1/2, as the protocol counts them
        outcomes = rng.choice([1.0, 0.0, 0.5], size=n, p=[0.5, 0.3, 0.2])
        mean, low, high = bootstrap_ci(outcomes, n_boot=500, seed=t)
        covered += low <= true_p <= high
        assert low <= mean <= high
    coverage = covered / trials
    assert 0.91 <= coverage <= 0.99, coverage  # nominal 0.95, +-3 standard errors


def test_bootstrap_interval_width_matches_the_normal_approximation():
    x = np.random.default_rng(1).integers(0, 2, size=2048).astype(float)
    mean, low, high = bootstrap_ci(x, n_boot=2000, seed=0)
    half_width = 1.96 * math.sqrt(mean * (1 - mean) / len(x))
    assert abs((high - low) / 2 - half_width) < 0.003  # 0/1 outcomes; ties (1/2) narrow it further


def test_ties_count_one_half():
    assert list(preference_from_scores([1.0, 0.2, 0.5], [0.5, 0.7, 0.5])) == [1.0, 0.0, 0.5]


def test_distinct_2_counts_unique_bigrams():
    assert distinct_n(["a b c", "a b d"], 2) == 3 / 4
    assert distinct_n(["a"], 2) == 0.0


def test_best_of_n_analytic_kl():
    assert best_of_n_kl(1) == 0.0
    assert math.isclose(best_of_n_kl(16), math.log(16) - 15 / 16)


def test_the_evaluation_shows_the_policys_response_first_on_half_of_the_prompts():
    """A judge that favours the first response shown (the "ai" annotator profile's position bias)
    would favour the policy on every prompt were it always shown first; shown first on half of them,
    a policy that answers as the reference does wins half. The gold judge gives what one order gives."""
    from alignbench.annotator import AnnotatorConfig, SimulatedAnnotator
    from alignbench.evaluation import prefer_in_both_orders
    from alignbench.judges import AnnotatorJudge, GoldJudge
    from alignbench.world import AssistantWorld

    world = AssistantWorld()
    prompts = world.sample_prompts("test", 40, seed=0)
    answers = [world.ideal_response(p) for p in prompts]
    biased = AnnotatorJudge(SimulatedAnnotator(world, AnnotatorConfig(temperature=0.1, flip_rate=0.0, position_bias=2.0)))
    assert biased.prefer_batch(prompts, answers, answers).mean() == pytest.approx(1 / (1 + math.exp(-2.0)))  # one order: 0.88
    assert prefer_in_both_orders(biased, prompts, answers, answers).mean() == pytest.approx(0.5)
    refusals = ["sorry i can not help with that"] * len(prompts)
    gold = GoldJudge(world)
    np.testing.assert_array_equal(prefer_in_both_orders(gold, prompts, answers, refusals), gold.prefer_batch(prompts, answers, refusals))


def test_judges_share_one_interface():
    import torch

    from alignbench.judges import GoldJudge, RewardModelJudge
    from alignbench.world import AssistantWorld

    world = AssistantWorld()
    gold = GoldJudge(world)
    prompt = "count from 4 to 9"
    assert gold.prefer(prompt, "4 5 6 7 8 9", "sorry i can not help with that") == 1.0
    assert gold.prefer(prompt, "4 5 6 7 8 9", "4 5 6 7 8 9") == 0.5
    assert gold.score(prompt, "4 5 6 7 8 9") == 1.0

    class FixedProxy:  # a stand-in reward model: longer responses score higher
        def score(self, prompts, responses, harmful=None):
            return torch.tensor([min(0.99, 0.1 * len(r.split())) for r in responses], dtype=torch.float64)

    judge = RewardModelJudge(FixedProxy())
    p_ab = judge.prefer(prompt, "4 5 6", "4")
    assert 0.5 < p_ab < 1 and math.isclose(p_ab + judge.prefer(prompt, "4", "4 5 6"), 1.0, rel_tol=1e-9)


# --- eval/kl at any temperature and top_p: the KL between the distributions actually sampled --------
EOS, PAD = 1, 0
KL_PROMPTS = [[3, 4, 5], [12, 2]]


def _tiny_gpt2(seed: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=32, n_embd=32, n_layer=2, n_head=2, n_positions=64, initializer_range=0.5,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config).eval()


def _exact_sampled_law(model, prompt, max_new_tokens, temperature, top_p):
    """log-probability of every response of at most `max_new_tokens` tokens under `model` sampled at
    (temperature, top_p), computed here in float64 from the logits (the nucleus: sorted by probability,
    keep a token while those above it hold less than top_p); -inf outside the nucleus."""
    import torch

    finished, frontier = {}, {(): 0.0}
    for step in range(max_new_tokens):
        prefixes = list(frontier)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(p) for p in prefixes])).logits[:, -1].double()
        grown = {}
        for prefix, row in zip(prefixes, logits):
            probs = torch.softmax(row / temperature, dim=-1).numpy()
            order = np.argsort(-probs, kind="stable")
            before = np.cumsum(probs[order]) - probs[order]
            kept = np.zeros(len(probs), dtype=bool)
            kept[order[before < top_p]] = True
            mass = probs[kept].sum()
            for token in range(len(probs)):
                logprob = math.log(probs[token] / mass) if kept[token] else -math.inf
                ends = token == EOS or step == max_new_tokens - 1
                (finished if ends else grown)[prefix + (token,)] = frontier[prefix] + logprob
        frontier = grown
    return finished


def _fake_codec():
    import types

    return types.SimpleNamespace(
        encode_prompts=lambda prompts: [list(p) for p in prompts], decode_responses=lambda ids: [" ".join(map(str, y)) for y in ids],
        eos_token_id=EOS, pad_token_id=PAD,
    )


def _evaluate_kl(policy, reference, temperature, top_p, samples):
    """`eval/kl` (and the per-sample terms) from the evaluator on `samples` draws per prompt."""
    import types

    import torch

    from alignbench.evaluation import EvalConfig, Evaluator, PolicyResponses, sample_policy

    config = EvalConfig(temperature=temperature, top_p=top_p, max_new_tokens=2, batch_size=4096, bootstrap_samples=10)
    prompts = [tuple(p) for p in KL_PROMPTS for _ in range(samples)]
    responses = sample_policy(policy, reference, _fake_codec(), KL_PROMPTS, config, torch.Generator().manual_seed(0), num_samples=samples)
    judge = types.SimpleNamespace(prefer_batch=lambda ps, a, b: np.full(len(ps), 0.5))
    evaluator = Evaluator(config, {"test": prompts}, {"test": PolicyResponses(responses.response_ids, responses.texts)}, judge)
    return evaluator.evaluate(responses)[0], responses


@pytest.mark.parametrize(("temperature", "top_p"), [(0.6, 1.0), (1.4, 1.0)])
def test_tempered_kl_is_the_kl_between_the_sampled_distributions(temperature, top_p):
    policy, reference = _tiny_gpt2(0), _tiny_gpt2(1)
    samples = 3000
    metrics, responses = _evaluate_kl(policy, reference, temperature, top_p, samples)
    exact_terms, exact_kl = {}, []
    for prompt in KL_PROMPTS:
        pol = _exact_sampled_law(policy, prompt, 2, temperature, top_p)
        ref = _exact_sampled_law(reference, prompt, 2, temperature, top_p)
        assert sum(math.exp(lp) for lp in pol.values()) == pytest.approx(1.0, abs=1e-9)
        exact_terms[tuple(prompt)] = {y: pol[y] - ref[y] for y in pol if pol[y] > -math.inf}
        exact_kl.append(sum(math.exp(pol[y]) * term for y, term in exact_terms[tuple(prompt)].items()))
    # Every per-sample term is log π_{T,p}(y) − log π_ref,{T,p}(y) of the enumerated laws...
    for i, (ids, term) in enumerate(zip(responses.response_ids, responses.kl)):
        assert term == pytest.approx(exact_terms[tuple(KL_PROMPTS[i // samples])][tuple(ids)], abs=2e-4)
    # ...and eval/kl their mean: the exact KL within three standard errors.
    exact, standard_error = float(np.mean(exact_kl)), float(np.std(responses.kl) / math.sqrt(len(responses.kl)))
    assert abs(metrics["eval/kl"] - exact) < 3 * standard_error, (metrics["eval/kl"], exact, standard_error)
    assert ("eval/kl_outside_support" in metrics) == (top_p < 1)
    # The previous definition (temperature-1 log-probs on samples drawn at T) is another number.
    if top_p == 1:
        at_one = {tuple(p): (_exact_sampled_law(policy, p, 2, 1.0, 1.0), _exact_sampled_law(reference, p, 2, 1.0, 1.0)) for p in KL_PROMPTS}
        old = np.mean([at_one[tuple(KL_PROMPTS[i // samples])][0][tuple(y)] - at_one[tuple(KL_PROMPTS[i // samples])][1][tuple(y)] for i, y in enumerate(responses.response_ids)])
        assert abs(old - exact) > 10 * standard_error, (old, exact)


def test_kl_is_infinite_where_the_reference_nucleus_misses_the_sample_and_zero_against_itself():
    import torch

    policy, reference = _tiny_gpt2(0), _tiny_gpt2(0)
    with torch.no_grad():  # the reference: the policy's weights moved a little, so the nuclei differ in part
        for weight, noise in zip(reference.parameters(), _tiny_gpt2(1).parameters()):
            weight.add_(0.1 * noise)
    samples = 2000
    metrics, responses = _evaluate_kl(policy, reference, 1.0, 0.7, samples)
    laws = {tuple(p): (_exact_sampled_law(policy, p, 2, 1.0, 0.7), _exact_sampled_law(reference, p, 2, 1.0, 0.7)) for p in KL_PROMPTS}
    outside = np.mean([sum(math.exp(lp) for y, lp in pol.items() if ref[y] == -math.inf) for pol, ref in laws.values()])
    assert 0.1 < outside < 0.5  # about 15% and 35% of the policy's nucleus mass lies outside the reference's
    for i, (ids, term) in enumerate(zip(responses.response_ids, responses.kl)):  # each term, inf included
        pol, ref = laws[tuple(KL_PROMPTS[i // samples])]
        assert term == pytest.approx(pol[tuple(ids)] - ref[tuple(ids)], abs=2e-4)
    assert metrics["eval/kl"] == math.inf
    fraction = metrics["eval/kl_outside_support"]
    assert abs(fraction - outside) < 3 * math.sqrt(outside * (1 - outside) / len(responses.kl))
    # A copy of the policy as the reference: the same nucleus everywhere, KL 0, nothing outside.
    metrics, _ = _evaluate_kl(policy, _tiny_gpt2(0), 0.8, 0.7, 200)
    assert metrics["eval/kl"] == pytest.approx(0.0, abs=1e-5) and metrics["eval/kl_outside_support"] == 0.0
    # Greedy decoding: a point mass; the copy's greedy answers are the policy's.
    metrics, _ = _evaluate_kl(policy, _tiny_gpt2(0), 0.0, 1.0, 3)
    assert metrics["eval/kl"] == 0.0 and metrics["eval/kl_outside_support"] == 0.0


def test_a_policy_asked_a_rewritten_prompt_has_its_kl_taken_against_the_reference_on_the_instruction():
    """HIR in score mode asks "good : x": the KL of the policy as deployed (x to y) is against
    π_ref(y|x), not against what the reference would answer to the rewritten prompt."""
    import torch

    from alignbench.evaluation import EvalConfig, sample_policy

    policy, reference = _tiny_gpt2(0), _tiny_gpt2(1)
    asked = [[7, *p] for p in KL_PROMPTS]
    config = EvalConfig(max_new_tokens=2, batch_size=4096)
    responses = sample_policy(policy, reference, _fake_codec(), asked, config, torch.Generator().manual_seed(0), num_samples=20, reference_prompts=KL_PROMPTS)
    for i, (ids, term) in enumerate(zip(responses.response_ids, responses.kl)):
        pol = _exact_sampled_law(policy, asked[i // 20], 2, 1.0, 1.0)
        ref = _exact_sampled_law(reference, KL_PROMPTS[i // 20], 2, 1.0, 1.0)
        assert term == pytest.approx(pol[tuple(ids)] - ref[tuple(ids)], abs=2e-4)
    rewritten = sample_policy(policy, reference, _fake_codec(), asked, config, torch.Generator().manual_seed(0), num_samples=20)
    assert rewritten.response_ids == responses.response_ids and not np.allclose(rewritten.kl, responses.kl)
