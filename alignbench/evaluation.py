"""The evaluation protocol, identical for every method.

On a fixed held-out prompt set, one sample from the policy and one from the SFT
reference per prompt (the reference's samples are drawn once per seed and reused by
every method). Metrics: win rate against the reference (ties count 1/2) with a 95%
bootstrap interval over prompts, gold reward and each gold axis with intervals, proxy
(RM) reward, sequence-level KL(π‖π_ref), length and distinct-2.

**What `eval/kl` is.** The KL between the two distributions actually sampled: the policy
at the evaluation's temperature T and top_p against the reference (SFT) policy at the same
T and top_p,

    KL(π_{T,p} ‖ π_ref,{T,p}) = E_{y ~ π_{T,p}} [ log π_{T,p}(y|x) − log π_ref,{T,p}(y|x) ],

where π_{T,p}(y|x) = Π_t π_{T,p}(y_t | x, y_<t) and π_{T,p}(·|ctx) is softmax(logits / T)
restricted to its top-p nucleus and renormalised (`alignbench.logprobs.sampling_logprobs`,
the distribution `alignbench.generation.sample` draws from). It is estimated by the mean,
over the test prompts, of log π_{T,p}(y|x) − log π_ref,{T,p}(y|x) on one policy sample per
prompt, both terms in nats and summed over the response's tokens. At T = 1 and top_p = 1 this
is the plain sequence-level KL(π ‖ π_ref). `eval/T<t>/kl` is the same at temperature t.

- Greedy decoding (T = 0) is a point mass on the argmax sequence, and top_p < 1 cuts the
  reference's support: where the policy samples a token outside the reference's nucleus (or,
  at T = 0, a sequence other than the reference's greedy one), log π_ref,{T,p} = −∞ and the
  KL is infinite, as it is mathematically. `eval/kl` is then `inf` (JSON has no infinity, so
  `metrics.json` stores it as null), and `eval/kl_outside_support`, reported whenever T = 0
  or top_p < 1, gives the fraction of samples outside the reference's support (0 when the KL
  is finite). No cap is applied.
- Best-of-n (and `best_of_n_gold`) draws its candidates from the reference at (T, top_p) and
  reports its own KL to that distribution, with ties (see `alignbench.methods.best_of_n`).
- A method's `train/kl` (the KL budget's estimate) and `val/kl` use the same definition at the
  evaluation's settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from alignbench.generation import sample
from alignbench.logprobs import evaluation_mode, pack_sequences, scoring_batch_rows, sequence_logprobs
from alignbench.models import TextCodec
from alignbench.seeding import seeded_generator


@dataclass
class EvalConfig:
    """The evaluation protocol (DESIGN.md's defaults)."""

    n_test_prompts: int = 2048
    """Held-out test prompts behind every reported number (95% CI ≈ ±0.016 on a win rate)."""
    n_val_prompts: int = 256
    """Validation prompts for periodic evaluation and hyperparameter search."""
    temperature: float = 1.0
    """Sampling temperature of policy and reference (at 0.7 the world's SFT is near the ceiling)."""
    temperatures: list[float] = field(default_factory=list)
    """Extra test-split evaluations, one per temperature, each against reference samples drawn at that
    same temperature (DPO paper, Fig. 2 right): metrics `eval/T<t>/<name>`, e.g. `eval/T0.7/win_rate`."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 16
    """Longest response sampled."""
    eval_every: int = 0
    """Evaluate on the validation split every this many training steps (0: only at the end)."""
    judge: Literal["gold", "reward_model", "annotator", "lm"] = "gold"
    """Who decides win rates. Gold needs the built-in world; 'lm' is the AI labeler (`ai_labeler.*`,
    e.g. a hub instruct model prompted as a judge, both orders averaged)."""
    bootstrap_samples: int = 1000
    """Resamples for the 95% intervals."""
    batch_size: int = 512
    """Prompts per sampling batch."""
    seed: int = 1234
    """Which prompts form the test and validation sets (fixed across runs and seeds)."""

    def __post_init__(self):
        for key in ("n_test_prompts", "n_val_prompts", "max_new_tokens", "bootstrap_samples", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"eval.{key}={getattr(self, key)} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"eval.temperature={self.temperature} must be >= 0")
        if any(t < 0 for t in self.temperatures) or len(set(self.temperatures)) != len(self.temperatures):
            raise ValueError(f"eval.temperatures={list(self.temperatures)} must be distinct temperatures >= 0 (an empty list: none)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"eval.top_p={self.top_p} must be in (0, 1]")
        if self.eval_every < 0:
            raise ValueError(f"eval.eval_every={self.eval_every} must be >= 0 (0 turns periodic evaluation off)")
        if self.seed < 0:
            raise ValueError(f"eval.seed={self.seed} must be an integer >= 0")


@dataclass
class PolicyResponses:
    """A policy's responses to prompts, with what KL(π‖π_ref) needs."""

    response_ids: list[list[int]]
    texts: list[str]
    kl: np.ndarray | None = None
    """One value per prompt whose mean over prompts is the policy's KL to the reference at the
    sampling settings: log π_{T,p}(y|x) − log π_ref,{T,p}(y|x) for a sampled policy (+inf where y is
    outside the reference's support), best-of-n's per-prompt KL for best-of-n. None: the reference itself."""
    sampling_logprobs: np.ndarray | None = None
    """log π_{T,p}(y|x) of each response under the distribution it was sampled from (where sampled)."""


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap interval of the mean over items."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 100):  # chunks keep memory at 100 x N
        idx = rng.integers(0, len(x), size=(min(100, n_boot - start), len(x)))
        means[start : start + len(idx)] = x[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams over all n-grams across the samples (Li et al. 2016)."""
    grams, total = set(), 0
    for text in texts:
        words = text.split()
        for i in range(len(words) - n + 1):
            grams.add(tuple(words[i : i + n]))
            total += 1
    return len(grams) / total if total else 0.0


def best_of_n_kl(n: int) -> float:
    """KL of best-of-n sampling to the base policy when no two candidates ever tie: log n − (n−1)/n
    (Stiennon 2020). An upper bound; ties (repeated responses, equal rewards) lower the KL, and
    best-of-n's runs report the tie-aware value (`alignbench.methods.best_of_n`)."""
    return float(np.log(n) - (n - 1) / n)


@torch.no_grad()
def reference_logprobs(reference, codec: TextCodec, prompt_ids: list[list[int]], response_ids: list[list[int]], batch_size: int | None = None, temperature: float = 1.0, top_p: float = 1.0) -> np.ndarray:
    """log π_ref,{T,p}(y|x) of each response: summed over its tokens, under the reference's distribution
    at `temperature` and `top_p` (−inf for a response with a token outside the reference's nucleus);
    `batch_size` rows a batch (default: `scoring_batch_rows`)."""
    device = next(reference.parameters()).device
    batch_size = scoring_batch_rows(device, batch_size)
    out = []
    with evaluation_mode(reference):
        for start in range(0, len(prompt_ids), batch_size):
            packed = pack_sequences(prompt_ids[start : start + batch_size], response_ids[start : start + batch_size], codec.pad_token_id).to(device)
            out.append(sequence_logprobs(reference, packed, temperature=temperature, top_p=top_p)[1].cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def sample_policy(policy, reference, codec: TextCodec, prompts: Sequence[str], config: EvalConfig, generator: torch.Generator, desc: str | bool = False, num_samples: int = 1,
                  reference_prompts: Sequence[str] | None = None) -> PolicyResponses:
    """Sample from a model policy at the config's temperature and top_p; with a reference, the
    per-sample terms log π_{T,p}(y|x) − log π_ref,{T,p}(y|x) of the KL between the two distributions
    sampled at those settings (see the module docstring; None for the reference itself).
    `reference_prompts`: the instructions x where the policy is asked a rewritten one (HIR's
    "good : x"): the KL is then that of the policy as deployed, x to y, against π_ref(y|x)."""
    prompt_ids = codec.encode_prompts(prompts)
    out = sample(
        policy, prompt_ids, max_new_tokens=config.max_new_tokens, eos_token_id=codec.eos_token_id,
        pad_token_id=codec.pad_token_id, temperature=config.temperature, top_p=config.top_p,
        num_samples=num_samples, batch_size=config.batch_size, generator=generator, progress=desc,
    )
    sampled = np.asarray(out.sampling_logprobs, dtype=np.float64)
    kl = None
    if reference is not None and reference is not policy:
        reference_ids = prompt_ids if reference_prompts is None else codec.encode_prompts(reference_prompts)
        repeated = [ids for ids in reference_ids for _ in range(num_samples)]
        # At T = 1 and top_p = 1 both terms are the plain log-probabilities (the sampler's are then
        # its temperature-1 log-probs, bit for bit).
        ref = reference_logprobs(reference, codec, repeated, out.response_ids, temperature=config.temperature, top_p=config.top_p)
        kl = np.asarray(out.sampling_logprobs) - ref
    return PolicyResponses(out.response_ids, codec.decode_responses(out.response_ids), kl, sampled)


METRIC_AXES = ("gold_reward", "gold_helpfulness", "gold_harmlessness")


def prefer_in_both_orders(judge, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """P(a beats b) on each prompt, `a` shown first on the even prompts and second on the odd ones,
    as an evaluation that randomises the order does: a judge that favours a position (an annotator
    profile's `position_bias`) then favours neither side over the prompts. For a judge that does not
    look at the order (gold: 0, 1/2 or 1) the values are those of one order, exactly."""
    first = np.arange(len(prompts)) % 2 == 0
    wins = np.empty(len(prompts))
    for shown_first, flip in ((np.flatnonzero(first), False), (np.flatnonzero(~first), True)):
        if len(shown_first):
            x, y = [a[i] for i in shown_first], [b[i] for i in shown_first]
            p = np.asarray(judge.prefer_batch([prompts[i] for i in shown_first], *((y, x) if flip else (x, y))), dtype=float)
            wins[shown_first] = 1.0 - p if flip else p
    return wins


class Evaluator:
    """Scores a policy's responses on one split against the reference's cached samples."""

    def __init__(self, config: EvalConfig, prompts: dict[str, list[str]], reference: dict[str, PolicyResponses], judge, world=None, proxy=None, harmful_of: Callable[[str], bool] | None = None):
        self.config, self.prompts, self.reference = config, prompts, reference
        self.judge, self.world, self.proxy, self.harmful_of = judge, world, proxy, harmful_of

    def evaluate(self, responses: PolicyResponses, split: str = "test", prefix: str = "eval") -> tuple[dict[str, float], list[dict]]:
        prompts, ref = self.prompts[split], self.reference[split]
        n_boot, seed = self.config.bootstrap_samples, self.config.seed
        metrics: dict[str, float] = {}

        def with_ci(name: str, values) -> None:
            mean, low, high = bootstrap_ci(values, n_boot, seed)
            metrics[f"{prefix}/{name}"], metrics[f"{prefix}/{name}_ci_low"], metrics[f"{prefix}/{name}_ci_high"] = mean, low, high

        wins = prefer_in_both_orders(self.judge, prompts, responses.texts, ref.texts)
        with_ci("win_rate", wins)
        records = [{"prompt": p, "response": y, "reference": r, "win": float(w)} for p, y, r, w in zip(prompts, responses.texts, ref.texts, wins)]
        if self.world is not None:
            gold = [self.world.gold(p, y) for p, y in zip(prompts, responses.texts)]
            columns = {
                "gold_reward": [g.reward for g in gold],
                "gold_helpfulness": [g.helpfulness for g in gold],
                "gold_harmlessness": [g.harmlessness for g in gold],
            }
            for name, values in columns.items():
                with_ci(name, values)
                for record, value in zip(records, values):
                    record[name] = value
        if self.proxy is not None:
            harmful = None if self.harmful_of is None else [self.harmful_of(p) for p in prompts]
            proxy = self.proxy.score(prompts, responses.texts, harmful).numpy()
            metrics[f"{prefix}/proxy_reward"] = float(proxy.mean())
            for record, value in zip(records, proxy):
                record["proxy_reward"] = float(value)
        if responses.kl is not None:
            metrics[f"{prefix}/kl"] = float(np.mean(responses.kl))  # inf where a sample is outside the reference's support
            for record, value in zip(records, responses.kl):
                record["kl"] = float(value)
        else:
            metrics[f"{prefix}/kl"] = 0.0
        if self.config.temperature == 0 or self.config.top_p < 1:  # the reference's support is cut
            outside = np.isposinf(responses.kl) if responses.kl is not None else np.zeros(0)
            metrics[f"{prefix}/kl_outside_support"] = float(outside.mean()) if len(outside) else 0.0
        metrics[f"{prefix}/length"] = float(np.mean([len(ids) for ids in responses.response_ids]))
        metrics[f"{prefix}/distinct_2"] = distinct_n(responses.texts, 2)
        return metrics, records


def temperature_prefix(temperature: float, prefix: str = "eval") -> str:
    """The metric prefix of an evaluation at an extra temperature: `eval/T0.7` (so `eval/T0.7/win_rate`)."""
    return f"{prefix}/T{temperature:g}"


def evaluate_at_temperatures(module, context, seed: int, split: str = "test") -> dict[str, float]:
    """Evaluate a policy at each of `eval.temperatures` against the reference sampled at that temperature.

    For every t: the reference (SFT) policy is sampled on the split's prompts at t, from a stream named
    by (seed, "reference", split, t), so every method of a seed is compared with the same reference
    samples; then the method responds at t (`module.respond`, which reads its sampling settings from
    `context.eval_config`) and the usual metrics are computed under the prefix `eval/T<t>`:
    `eval/T<t>/win_rate` (+ `_ci_low`, `_ci_high`), the gold reward and axes with intervals,
    `proxy_reward`, `kl`, `length` and `distinct_2`. `kl` is KL(π_{t,p} ‖ π_ref,{t,p}), the KL between the
    policy and the reference both sampled at temperature t (and the run's top_p), as the module docstring
    defines it (with `kl_outside_support` where t = 0 or top_p < 1).

    `context` needs `eval_config`, `evaluator`, `reference` and `codec` (a `RunContext` has them).
    """
    base, evaluator = context.eval_config, context.evaluator
    prompts = evaluator.prompts[split]
    metrics: dict[str, float] = {}
    for t in base.temperatures:
        at_t = replace(base, temperature=t, temperatures=[])
        reference = sample_policy(context.reference, None, context.codec, prompts, at_t, _temperature_stream(seed, "reference", split, t))
        judge_at_t = Evaluator(at_t, {split: prompts}, {split: reference}, evaluator.judge, world=evaluator.world, proxy=evaluator.proxy, harmful_of=evaluator.harmful_of)
        # Methods sample with the run's evaluation settings; swap them for this temperature only.
        context.eval_config = at_t
        try:
            responses = module.respond(prompts, _temperature_stream(seed, "policy", split, t))
        finally:
            context.eval_config = base
        metrics.update(judge_at_t.evaluate(responses, split=split, prefix=temperature_prefix(t))[0])
    return metrics


def _temperature_stream(seed: int, role: str, split: str, temperature: float) -> torch.Generator:
    return seeded_generator(seed, role, split, f"T{temperature:g}")
