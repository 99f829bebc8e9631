"""Best-of-n sampling at inference (Stiennon et al. 2020; Nakano et al. 2021).

n samples from the SFT policy per prompt; the one the reward model scores highest is
the response (the first of them where several tie). No training. `best_of_n_gold`
chooses by the gold reward instead: the upper bound that shows how much of the gap is
the reward model's error.

**Its KL to the SFT policy, ties included.** Let q be the SFT policy at the evaluation's
temperature and top_p (what the candidates are drawn from), Y_1..Y_n iid ~ q, R = r(Y) the
reward that selects, F(v) = P(R ≤ v), F(v⁻) = P(R < v) and p(v) = P(R = v). The best reward
is ≤ v with probability F(v)^n, so the selected level is v with probability
w(v) = F(v)^n − F(v⁻)^n; given that level, the selected candidate is the first candidate at
that level, which by exchangeability is distributed as q restricted to the level. Hence

    π_bon(y) = q(y) · [F(v)^n − F(v⁻)^n] / p(v),   v = r(y),

and, as π_bon/q depends on y only through its level,

    KL(π_bon ‖ q) = Σ_v w(v) log(w(v) / p(v)),

the KL between the law of the best of n rewards and the law of one. In terms of the CDF
u = F: an atom (a repeated response, or responses with equal rewards) spanning u ∈ [a, b]
contributes (b^n − a^n) log((b^n − a^n) / (b − a)); a continuous stretch contributes
G(b) − G(a) with G(u) = u^n (log n + (n − 1) log u − (n − 1)/n), the integral of
n u^{n−1} log(n u^{n−1}). With no atoms the sum is G(1) = log n − (n − 1)/n, the formula
usually quoted (`alignbench.evaluation.best_of_n_kl`), an upper bound: ties lower it. The
world's SFT policy repeats itself and the gold reward takes few values, so they matter.

**Estimating it from the n candidates of each prompt** (`best_of_n_kl_estimate`; the candidates
are what best-of-n draws anyway, so the estimate costs no sample):

1. Each distinct candidate y is an atom of known mass q(y) = exp(log q(y)), its exact
   probability under the sampler (not its count among the n, which would be a noisy estimate).
2. The mass no candidate hit, m = 1 − Σ q(y), is known exactly as well; its rewards are not.
   It is spread like the candidates drawn exactly once (Good–Turing: the unseen responses
   resemble those seen once; like all candidates if none was seen once), m/k for each of
   those k candidates, at its reward v:
   - if v was drawn more than once among the n (e.g. one of the gold reward's few levels),
     unseen responses with that reward tie with it: the mass joins the atom at v;
   - otherwise v stands for rewards not yet seen (e.g. the reward model's score of one text):
     the mass is continuous, half just below v and half just above it.
3. The KL of that law, by the formula above: K(candidates).
4. The law is seen through n draws, and K is a nonlinear function of it, so K is biased (low
   where the candidates miss reward levels: their unseen mass is then tied to levels that were
   seen). The bias is of order 1/n; the jackknife removes that order:
   n·K(all n) − (n − 1)·mean_i K(all but candidate i), each K the KL of best-of-n.
The evaluation reports the mean over prompts (a single prompt's value can be slightly negative).

Without the jackknife the estimate is exact when the candidates cover the whole support (m = 0),
and gives log n − (n − 1)/n when no mass is an atom. Measured (tests/test_best_of_n.py and the
quickstart's SFT policy):
- the quickstart's SFT policy, 200 test prompts at T = 1, best-of-16 from 16 candidates against the
  law of 400 samples per prompt: 1.583 vs 1.588 nats under the reward model, 1.232 vs 1.230 under
  gold (without the jackknife 1.585 and 1.203, −2%); best-of-4 (100 prompts): 0.620 vs 0.610 and
  0.515 vs 0.542 (−5%; without the jackknife 0.608 and 0.489, −10%);
- a 32-token GPT-2 answering in ≤ 3 tokens, enumerated exactly (3 prompts, 600 groups of 16): with
  4 reward levels 1.241 ± 0.020 vs 1.246 at T = 1 and 1.274 ± 0.026 vs 1.255 at T = 0.7 (without
  the jackknife −4% and −5%); with distinct rewards 1.833 vs 1.832 and 1.840 vs 1.824;
- its weak spot, a policy of 5 responses whose best reward level has probability 0.1: −10% at
  n = 4, +8% at n = 16 (the level is missed by a fifth of the 16-candidate draws).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np
import torch

from alignbench.evaluation import PolicyResponses, sample_policy
from alignbench.methods.base import AlignmentMethod
from alignbench.stages import candidates as candidates_stage


def _atom_kl(a: float, b: float, n: int) -> float:
    """KL contribution (b^n − a^n) log((b^n − a^n)/(b − a)) of an atom spanning the CDF from a to b."""
    w = b**n - a**n
    return w * math.log(w / (b - a)) if w > 0 else 0.0


def _continuous_kl(a: float, b: float, n: int) -> float:
    """KL contribution G(b) − G(a) of an atom-free stretch of the CDF from a to b."""

    def g(u: float) -> float:
        return u**n * (math.log(n) + (n - 1) * math.log(u) - (n - 1) / n) if u > 0 else 0.0

    return g(b) - g(a)


def best_of_n_law_kl(segments: Sequence[tuple[float, bool]], n: int) -> float:
    """KL(π_bon ‖ q) in nats from the law of the selecting reward under q (see the module docstring).

    Args:
        segments: ``(mass, is_atom)`` in increasing order of reward, masses summing to 1: an atom is a
            set of responses that tie (one reward value); a non-atom is a stretch of distinct rewards.
        n: candidates per prompt.
    """
    total, a = 0.0, 0.0
    for mass, atom in segments:
        if mass <= 0:
            continue
        b = min(a + mass, 1.0)
        total += _atom_kl(a, b, n) if atom else _continuous_kl(a, b, n)
        a = b
    return total


def best_of_n_kl_exact(probs: Sequence[float], rewards: Sequence[float], n: int) -> float:
    """KL(π_bon ‖ q) of best-of-n on a fully known discrete policy q: response i has probability
    ``probs[i]`` (summing to 1) and reward ``rewards[i]``; responses with equal rewards tie."""
    levels: dict[float, float] = defaultdict(float)
    for p, r in zip(probs, rewards):
        levels[float(r)] += float(p)
    return best_of_n_law_kl([(levels[v], True) for v in sorted(levels)], n)


def best_of_n_kl_estimate(candidates: Sequence[Hashable], logprobs: Sequence[float], rewards: Sequence[float]) -> float:
    """One prompt's KL(π_bon ‖ q) estimated from its n candidates: the law of steps 1–3 of the module
    docstring, jackknifed, n·K(all n) − (n − 1)·mean_i K(all but candidate i), with K always the KL of
    best-of-n (not of best-of-(n − 1)). May be slightly negative for one prompt; its mean is what counts.

    Args:
        candidates: the n candidates' identities (e.g. token-id tuples); equal ones are one response.
        logprobs: log q(y) of each candidate under the distribution it was sampled from.
        rewards: the reward each candidate was selected by (ties: equal values).
    """
    candidates, logprobs, rewards = list(candidates), [float(x) for x in logprobs], [float(r) for r in rewards]
    n = len(candidates)
    full = _law_kl_from_draws(candidates, logprobs, rewards, n)
    if n == 1:
        return full
    left_out = [_law_kl_from_draws(candidates[:i] + candidates[i + 1 :], logprobs[:i] + logprobs[i + 1 :], rewards[:i] + rewards[i + 1 :], n) for i in range(n)]
    return n * full - (n - 1) * sum(left_out) / n


def _law_kl_from_draws(candidates: list, logprobs: list[float], rewards: list[float], n: int) -> float:
    """KL of best-of-n under the reward law estimated from some draws (steps 1–3 of the module docstring)."""
    counts, value_counts = Counter(candidates), Counter(rewards)
    seen = {y: (math.exp(lp), r) for y, lp, r in zip(candidates, logprobs, rewards)}
    unseen = max(0.0, 1.0 - sum(q for q, _ in seen.values()))
    once = [r for y, (_, r) in seen.items() if counts[y] == 1] or rewards
    atoms: dict[float, float] = defaultdict(float)  # reward -> tied mass (candidates + unseen mass tied to them)
    spread: dict[float, float] = defaultdict(float)  # reward -> unseen mass at rewards not yet seen, around it
    for q, r in seen.values():
        atoms[r] += q
    for r in once:
        (atoms if value_counts[r] > 1 else spread)[r] += unseen / len(once)
    segments: list[tuple[float, bool]] = []
    for r in sorted(atoms):
        segments += [(spread[r] / 2, False), (atoms[r], True), (spread[r] / 2, False)]
    return best_of_n_law_kl(segments, n)


@dataclass
class BestOfNConfig:
    """Best-of-n at inference."""

    n: int = 16
    """Samples per prompt."""

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n={self.n} must be >= 1")


class BestOfN(AlignmentMethod):
    name = "best_of_n"
    config_class = BestOfNConfig
    trains = False
    family = "sample and tune"  # selection at inference: drawn with rejection sampling, ReST and HIR
    feedback = "reward"

    def select_scores(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """Scores the candidates are chosen by: the proxy reward model."""
        return self.reward_scores(prompts, responses)

    def respond(self, prompts, generator: torch.Generator, desc=False) -> PolicyResponses:
        n, ctx = self.config.n, self.context
        # self.policy is the SFT policy: the candidates come from the reference at the evaluation's
        # settings, drawn once per stream and shared with the other best-of-n methods (the candidates stage).
        if getattr(ctx, "stages", None) is not None:
            candidates = candidates_stage.candidates(ctx.stages, self.policy, prompts, ctx.eval_config, n, generator, desc=desc)
        else:
            candidates = sample_policy(self.policy, None, ctx.codec, prompts, ctx.eval_config, generator, desc=desc, num_samples=n)
        self.budget.policy_samples += len(candidates.texts)
        scores = np.asarray(self.select_scores([p for p in prompts for _ in range(n)], candidates.texts)).reshape(len(prompts), n)  # score_texts scores repeats once
        chosen = np.arange(len(prompts)) * n + scores.argmax(axis=1)  # the first of the best where they tie
        ids = [tuple(y) for y in candidates.response_ids]
        kl = np.array([
            best_of_n_kl_estimate(ids[i * n : (i + 1) * n], candidates.sampling_logprobs[i * n : (i + 1) * n], scores[i])
            for i in range(len(prompts))
        ])
        return PolicyResponses([candidates.response_ids[i] for i in chosen], [candidates.texts[i] for i in chosen], kl)


class BestOfNGold(BestOfN):
    name = "best_of_n_gold"
    feedback = "gold"

    def select_scores(self, prompts, responses) -> np.ndarray:
        return self.context.gold_judge.score_batch(prompts, responses)
