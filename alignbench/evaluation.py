"""The evaluation protocol, identical for every method.

On a fixed held-out prompt set, one sample from the policy and one from the SFT
reference per prompt (the reference's samples are drawn once per seed and reused by
every method). Metrics: win rate against the reference (ties count 1/2) with a 95%
bootstrap interval over prompts, gold reward and each gold axis with intervals, proxy
(RM) reward, sequence-level KL(π‖π_ref), length and distinct-2.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from alignbench.generation import sample
from alignbench.logprobs import pack_sequences, sequence_logprobs
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


@dataclass
class PolicyResponses:
    """A policy's responses to prompts, with what KL(π‖π_ref) needs."""

    response_ids: list[list[int]]
    texts: list[str]
    kl: np.ndarray | None = None  # per-sample log π(y|x) − log π_ref(y|x)
    analytic_kl: float | None = None  # where the policy's KL is known in closed form (best-of-n)


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
    """Analytic KL of best-of-n sampling to the base policy: log n − (n−1)/n (Stiennon 2020)."""
    return float(np.log(n) - (n - 1) / n)


@torch.no_grad()
def reference_logprobs(reference, codec: TextCodec, prompt_ids: list[list[int]], response_ids: list[list[int]], batch_size: int = 512) -> np.ndarray:
    device = next(reference.parameters()).device
    out = []
    for start in range(0, len(prompt_ids), batch_size):
        packed = pack_sequences(prompt_ids[start : start + batch_size], response_ids[start : start + batch_size], codec.pad_token_id).to(device)
        out.append(sequence_logprobs(reference, packed)[1].cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def sample_policy(policy, reference, codec: TextCodec, prompts: Sequence[str], config: EvalConfig, generator: torch.Generator, desc: str | bool = False, num_samples: int = 1) -> PolicyResponses:
    """Sample from a model policy; per-sample KL terms against the reference (None for the reference itself)."""
    prompt_ids = codec.encode_prompts(prompts)
    out = sample(
        policy, prompt_ids, max_new_tokens=config.max_new_tokens, eos_token_id=codec.eos_token_id,
        pad_token_id=codec.pad_token_id, temperature=config.temperature, top_p=config.top_p,
        num_samples=num_samples, batch_size=config.batch_size, generator=generator, progress=desc,
    )
    kl = None
    if reference is not None and reference is not policy:
        repeated = [ids for ids in prompt_ids for _ in range(num_samples)]
        kl = np.asarray(out.logprobs) - reference_logprobs(reference, codec, repeated, out.response_ids, config.batch_size)
    return PolicyResponses(out.response_ids, codec.decode_responses(out.response_ids), kl)


METRIC_AXES = ("gold_reward", "gold_helpfulness", "gold_harmlessness")


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

        wins = self.judge.prefer_batch(prompts, responses.texts, ref.texts)
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
        if responses.analytic_kl is not None:
            metrics[f"{prefix}/kl"] = responses.analytic_kl
        elif responses.kl is not None:
            metrics[f"{prefix}/kl"] = float(np.mean(responses.kl))
            for record, value in zip(records, responses.kl):
                record["kl"] = float(value)
        else:
            metrics[f"{prefix}/kl"] = 0.0
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
    `proxy_reward`, `kl`, `length` and `distinct_2`. `kl` is the mean of log π(y|x) − log π_ref(y|x)
    (both at temperature 1) over samples drawn at t, as for the main evaluation.

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
