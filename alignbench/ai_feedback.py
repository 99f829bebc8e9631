"""AI feedback: the AI labeler, its labels, and reward models trained on labelled pairs.

RLAIF (Lee et al. 2023) and Constitutional AI (Bai et al. 2022) replace human preference
labels with a language model's. For a comparison with human feedback to mean anything, the
AI labels must carry a model's errors, not a noise setting: in the world the AI labeler is a
world model (by default the SFT checkpoint, which already reads the world) fine-tuned on the
world's judgment texts ("which answer is better by rule ... a : ... b : ..." answered "a" or "b", and
"how good is the answer by rule ..." answered 0..10), by the world's general rule (overall
quality: RLAIF's question) or by one principle of its constitution (RL-CAI's), and it is only
ever queried through `LMJudge` — the same code that prompts a real model. The gold
principle scores only write its training targets.

This module holds what the labeler is, independent of any stage: its config, the world's
judgment texts it is fine-tuned on, the `LMJudge` that queries it, and its agreement with the
world's principles. The stages that build and use it are in alignbench.stages: `ai_labeler`
(the fine-tuned labeler and the judge on it), `ai_labels` (its soft labels on the shared pairs)
and `pair_reward_model` (RLAIF's reward model and its RLHF control at equal label count).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from alignbench.config import ConfigError
from alignbench.judges import LMJudge
from alignbench.models import TextCodec
from alignbench.reward import MAX_CHARS_PER_TOKEN
from alignbench.training import OptimConfig
from alignbench.world import (
    GENERAL_RULE,
    JUDGMENT_ANSWERS,
    JUDGMENT_REQUEST,
    RATING_ANSWERS,
    RATING_REQUEST,
    AssistantWorld,
)


@dataclass
class AILabelerConfig:
    """The AI labeler used by RLAIF, RL-CAI and `alignbench judge-report`."""

    model: str = "sft"
    """The labeler: "sft" (fine-tuned from the shared SFT checkpoint, which already reads the world's
    prompts and answers), a named world model trained from scratch here (world-base is larger than
    the quickstart's policy: on 2 CPU cores it learns the judgment texts too slowly to be the
    default), or any HF causal LM (hub name or local path) prompted as it is with the templates below."""
    n_examples: int = 10000
    """Judgment and rating texts the world labeler is fine-tuned on."""
    rating_fraction: float = 0.15
    """Share of those that are single-response ratings (for direct RLAIF) rather than comparisons."""
    policy_sample_fraction: float = 0.5
    """Share whose responses are samples of the SFT policy (the responses RLAIF's labels are about)
    rather than the demonstrator's; fresh samples, never the labelled pairs themselves."""
    general_fraction: float = 0.6
    """Share judged by the world's general rule (overall quality: what RLAIF asks) rather than by one
    principle of the constitution (what RL-CAI asks)."""
    tie_keep: float = 0.3
    """Share of comparisons that tie by their principle kept in training (answered a or b at random,
    so the labeler learns to be unsure there) — most pairs tie on most principles."""
    epochs: int = 1
    batch_size: int = 64
    max_length: int = 64
    """Longest request + answer in tokens (the world's judgment requests are about 50)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_ratio=0.05))
    seed: int | None = None
    """Seed of the AI labeler's initialisation, data and training (None: the run's seed)."""
    principles: list[str] | None = None
    """Rule texts the labeler judges overall quality by (None: the world's general rule)."""
    comparison_template: str | None = None
    """With {rule}, {prompt}, {a}, {b}; None: the world's judgment request."""
    answer_words: list[str] | None = None
    """The two answer words (first response better, second better); None: the world's "a", "b"."""
    rating_template: str | None = None
    """With {rule}, {prompt}, {response}; None: the world's rating request."""
    rating_words: list[str] | None = None
    """Rating answers, each a number; None: the world's 0..10."""
    min_answer_mass: float = 1e-3
    """Below this probability on both answer words, an order counts as undecided (½)."""
    trust_remote_code: bool = False

    def __post_init__(self):
        for key in ("n_examples", "epochs", "batch_size", "max_length"):
            if getattr(self, key) < 1:
                raise ValueError(f"ai_labeler.{key}={getattr(self, key)} must be >= 1")
        for key in ("rating_fraction", "tie_keep", "general_fraction", "policy_sample_fraction"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"ai_labeler.{key}={getattr(self, key)} must be in [0, 1]")
        if self.answer_words is not None and len(self.answer_words) != 2:
            raise ValueError(f"ai_labeler.answer_words={self.answer_words} must name exactly two words")


# --- the world labeler's training texts ---------------------------------------------------
def labeler_prompts(world: AssistantWorld, config: AILabelerConfig, split: str = "train") -> list[str]:
    """The prompts the labeler's training texts are drawn from (and its policy samples answer)."""
    return world.sample_prompts(split, config.n_examples * 2, seed=config.seed + 7)


def judgment_examples(world: AssistantWorld, config: AILabelerConfig, policy_samples: dict[str, list[str]] | None = None,
                      split: str = "train") -> tuple[list[str], list[str]]:
    """(request, answer) texts: pairs of answers compared by the general rule or a random
    principle, answered by the gold preference by that rule, and single answers rated 0..10 by
    the gold score by that rule. Answers are the demonstrator's, or for prompts in
    `policy_samples` the policy's (two samples each)."""
    rng = np.random.default_rng([config.seed, 17])
    prompts = labeler_prompts(world, config, split)
    requests, answers = [], []
    policy_samples = policy_samples or {}
    for prompt in prompts:
        if len(requests) == config.n_examples:
            break
        if rng.random() < config.general_fraction:
            principle = GENERAL_RULE
        else:
            principle = world.principles[int(rng.integers(len(world.principles)))]
        sampled = policy_samples.get(prompt)
        if rng.random() < config.rating_fraction:
            response = sampled[0] if sampled else world.demonstrate(prompt, rng)
            requests.append(world.rating_request(prompt, response, principle))
            answers.append(str(round(10 * world.principle_score(prompt, response, principle))))
            continue
        a, b = sampled if sampled else (world.demonstrate(prompt, rng), world.demonstrate(prompt, rng))
        preference = world.principle_preference(prompt, a, b, principle)
        if preference == 0.5 and (a == b or rng.random() >= config.tie_keep):
            continue
        answer = JUDGMENT_ANSWERS[0] if preference == 1.0 else JUDGMENT_ANSWERS[1] if preference == 0.0 else JUDGMENT_ANSWERS[int(rng.integers(2))]
        requests.append(world.judgment_request(prompt, a, b, principle))
        answers.append(answer)
    return requests, answers


# --- the labeler as a judge -------------------------------------------------------------
def world_judge(model, codec: TextCodec, c: AILabelerConfig, world: AssistantWorld | None, principles: Sequence[str] | None = None,
                principle_sampling: str = "all") -> LMJudge:
    """`model` as the AI labeler: an `LMJudge` with the labeler config's templates and answer words
    (the world's where unset), judging by `principles`, else `ai_labeler.principles`, else the
    world's general rule."""
    principles = principles or c.principles or ([GENERAL_RULE.text] if world is not None else None)
    if not principles:
        raise ConfigError("ai_labeler.principles must list the rule texts the labeler judges by (there is no world and no general rule)")
    return LMJudge(
        model, codec, principles,
        comparison_template=c.comparison_template or JUDGMENT_REQUEST, answer_words=c.answer_words or JUDGMENT_ANSWERS,
        rating_template=c.rating_template or RATING_REQUEST, rating_words=c.rating_words or RATING_ANSWERS,
        principle_sampling=principle_sampling, min_answer_mass=c.min_answer_mass,
        max_response_chars=c.max_length * MAX_CHARS_PER_TOKEN,  # a response longer than the whole request may be is cut
    )


def principle_agreement(judge: LMJudge, world: AssistantWorld, n: int, seed: int) -> dict[str, float]:
    """The labeler's accuracy on held-out (validation) comparisons whose gold preference is not a
    tie, each judged by one rule alone: by the general rule (`general_accuracy`, half of them)
    and by a principle of the constitution (`principle_accuracy`)."""
    rng = np.random.default_rng([seed, 29])
    rows = []
    rules = [GENERAL_RULE, *world.principles]
    for prompt in world.sample_prompts("val", 8 * n, seed=seed):
        principle = GENERAL_RULE if rng.random() < 0.5 else world.principles[int(rng.integers(len(world.principles)))]
        a, b = world.demonstrate(prompt, rng), world.demonstrate(prompt, rng)
        preference = world.principle_preference(prompt, a, b, principle)
        if preference != 0.5:
            rows.append((prompt, a, b, principle.text, preference))
        if len(rows) == n:
            break
    principles = judge.principles
    correct: dict[bool, list[float]] = {True: [], False: []}
    for rule in rules:
        subset = [r for r in rows if r[3] == rule.text]
        if not subset:
            continue
        judge.principles = [rule.text]
        p = judge.prefer_batch([r[0] for r in subset], [r[1] for r in subset], [r[2] for r in subset])
        correct[rule is GENERAL_RULE] += [float((pi > 0.5) == (r[4] == 1.0)) for pi, r in zip(p, subset)]
    judge.principles = principles
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")
    return {"general_accuracy": mean(correct[True]), "principle_accuracy": mean(correct[False]), "judged_pairs": len(rows)}
