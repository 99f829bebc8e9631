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

Shared stages (content-addressed under `OUT/cache/`, like every pipeline stage):
- `ai_labeler`: the fine-tuned labeler (world models only; a hub model is used as it is);
- `ai_labels`: the labeler's soft labels on the same sampled pairs the human annotators
  labelled (so that AI and human feedback compare on equal pairs and counts);
- `pair_reward_model`: one reward model trained on the first n of those pairs, with human or AI
  labels — RLAIF's reward model and its RLHF control at equal label count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
import torch
from datasets import Dataset

from alignbench.config import ConfigError, to_dict
from alignbench.data import (
    DemonstrationDataModule,
    PreferenceDataModule,
    preference_rows,
)
from alignbench.judges import LMJudge
from alignbench.models import (
    TINY_MODELS,
    RewardModel,
    TextCodec,
    build_tiny_policy,
    freeze,
    load_pretrained_policy,
    load_tokenizer,
)
from alignbench.reward import RewardModelConfig, RewardModelTraining, score_texts
from alignbench.sft import SupervisedFineTuning
from alignbench.training import OptimConfig, TrainerConfig, make_trainer
from alignbench.world import (
    GENERAL_RULE,
    JUDGMENT_ANSWERS,
    JUDGMENT_REQUEST,
    RATING_ANSWERS,
    RATING_REQUEST,
    AssistantWorld,
)

if TYPE_CHECKING:
    from alignbench.pipeline import Pipeline


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
    seed: int = 0
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


def fine_tune(policy, codec: TextCodec, prompts: Sequence[str], responses: Sequence[str], *, epochs: int, batch_size: int, max_length: int,
              optim: OptimConfig, trainer: TrainerConfig, seed: int) -> int:
    """Supervised fine-tuning of `policy` in place on (prompt, response) texts; returns tokens trained on."""
    data = DemonstrationDataModule(Dataset.from_dict({"prompt": list(prompts), "response": list(responses)}), codec, batch_size, max_length, seed=seed)
    total = len(data.train_dataloader()) * epochs
    module = SupervisedFineTuning(policy.train(), optim, total)
    torch.manual_seed(seed)
    make_trainer(trainer, max_steps=total, max_epochs=epochs, grad_clip=optim.grad_clip).fit(module, datamodule=data)
    policy.eval()
    return module.tokens_trained


def train_reward_model(policy, codec: TextCodec, records: list[dict], config: RewardModelConfig, trainer: TrainerConfig, seed: int) -> RewardModel:
    """A reward model (the policy's backbone + a scalar head) trained with the ranking loss on pair
    records ({prompt, chosen, rejected, margin?, label?}), its scores centred on the labelled responses."""
    data = PreferenceDataModule(preference_rows(records, allow_empty_responses=True), codec, config.batch_size, config.max_length, seed=seed)
    torch.manual_seed(seed)  # before the head's initialisation: not whatever ran before in this process
    model = RewardModel.from_policy(policy, likelihood=config.likelihood)
    total = len(data.train_dataloader()) * config.epochs
    make_trainer(trainer, max_steps=total, max_epochs=config.epochs, grad_clip=config.optim.grad_clip).fit(RewardModelTraining(model, config, total), datamodule=data)
    model.eval()
    prompts = [r["prompt"] for r in records for _ in (0, 1)]
    responses = [y for r in records for y in (r["chosen"], r["rejected"])]
    model.calibration.copy_(torch.tensor([1.0, -float(score_texts(model, codec, prompts, responses).mean())]))
    return model


# --- the labeler ------------------------------------------------------------------------
def labeler_key(pipeline: "Pipeline") -> dict:
    # The SFT policy writes half of the labeler's training responses (and may be its initialisation).
    return {"world": to_dict(pipeline.config.world), "ai_labeler": to_dict(pipeline.config.ai_labeler), "sft": pipeline.sft_key(),
            "max_new_tokens": pipeline.config.eval.max_new_tokens}


def ai_labeler(pipeline: "Pipeline") -> tuple[Path, dict]:
    """The fine-tuned world labeler's cached stage (`OUT/cache/ai_labeler-<hash>/`)."""
    if pipeline.config.ai_labeler.model not in (*TINY_MODELS, "sft"):
        raise ConfigError("only the SFT checkpoint or a named world model is fine-tuned as the AI labeler; a hub model is prompted as it is")
    return pipeline._stage("ai_labeler", labeler_key(pipeline), lambda tmp: _build_ai_labeler(pipeline, tmp))


def _build_ai_labeler(pipeline: "Pipeline", tmp: Path) -> dict:
    c, world = pipeline.config.ai_labeler, pipeline.world
    sft_dir, _ = pipeline.sft()
    if c.model == "sft":
        model = load_pretrained_policy(str(sft_dir / "policy"))
    else:
        model = build_tiny_policy(c.model, pipeline.codec.tokenizer, seed=c.seed)
    sft_policy = freeze(load_pretrained_policy(str(sft_dir / "policy")))
    requests, answers = judgment_examples(world, c, _policy_samples(pipeline, sft_policy, c))
    tokens = fine_tune(model, pipeline.codec, requests, answers, epochs=c.epochs, batch_size=c.batch_size, max_length=c.max_length,
                       optim=c.optim, trainer=pipeline.config.trainer, seed=c.seed)
    model.save_pretrained(tmp / "labeler")
    pipeline.codec.tokenizer.save_pretrained(tmp / "labeler")
    judge = _world_judge(freeze(model), pipeline.codec, c, world)
    return {"examples": len(requests), "tokens": tokens, **principle_agreement(judge, world, n=600, seed=c.seed)}


def _policy_samples(pipeline: "Pipeline", policy, c: AILabelerConfig) -> dict[str, list[str]]:
    """Two fresh SFT samples for a `policy_sample_fraction` share of the labeler's training prompts."""
    from alignbench.evaluation import EvalConfig, sample_policy
    from alignbench.seeding import seeded_generator

    prompts = sorted(set(labeler_prompts(pipeline.world, c)))
    chosen = [prompts[i] for i in np.random.default_rng([c.seed, 19]).permutation(len(prompts))[: int(c.policy_sample_fraction * c.n_examples)]]
    if not chosen:
        return {}
    texts = sample_policy(policy, None, pipeline.codec, chosen, EvalConfig(max_new_tokens=pipeline.config.eval.max_new_tokens),
                          seeded_generator(c.seed, "ai_labeler"), desc="sampling responses to judge", num_samples=2).texts
    return {p: [texts[2 * i], texts[2 * i + 1]] for i, p in enumerate(chosen)}


def _world_judge(model, codec: TextCodec, c: AILabelerConfig, world: AssistantWorld | None, principles: Sequence[str] | None = None,
                 principle_sampling: str = "all") -> LMJudge:
    principles = principles or c.principles or ([GENERAL_RULE.text] if world is not None else None)
    if not principles:
        raise ConfigError("ai_labeler.principles must list the rule texts the labeler judges by (there is no world and no general rule)")
    return LMJudge(
        model, codec, principles,
        comparison_template=c.comparison_template or JUDGMENT_REQUEST, answer_words=c.answer_words or JUDGMENT_ANSWERS,
        rating_template=c.rating_template or RATING_REQUEST, rating_words=c.rating_words or RATING_ANSWERS,
        principle_sampling=principle_sampling, min_answer_mass=c.min_answer_mass,
    )


def load_ai_judge(pipeline: "Pipeline", principles: Sequence[str] | None = None, principle_sampling: str = "all") -> LMJudge:
    """The AI labeler as an `LMJudge`: the fine-tuned world labeler, or a hub / local model as it is.
    It judges by `principles` (texts; RL-CAI passes its constitution's), else by
    `ai_labeler.principles`, else by the world's general rule (overall quality, RLAIF)."""
    c = pipeline.config.ai_labeler
    if c.model in (*TINY_MODELS, "sft"):
        directory, _ = ai_labeler(pipeline)
        model, codec = load_pretrained_policy(str(directory / "labeler")), pipeline.codec
    else:
        model = load_pretrained_policy(c.model, trust_remote_code=c.trust_remote_code)
        codec = TextCodec(load_tokenizer(c.model, trust_remote_code=c.trust_remote_code))
    return _world_judge(freeze(model), codec, c, pipeline.world, principles, principle_sampling)


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


# --- AI labels on the shared labelled pairs ----------------------------------------------
def _shared_pairs(pipeline: "Pipeline", n_pairs: int) -> list[dict]:
    """The first n (0: all) of the pairs the human annotators labelled (overall preference)."""
    labels_dir, _ = pipeline.labels()
    with open(labels_dir / "overall.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if n_pairs > len(records):
        raise ConfigError(f"n_labels={n_pairs} is more than the {len(records)} labelled pairs; raise labels.n_prompts or lower n_labels")
    return records[:n_pairs] if n_pairs else records


def ai_labels(pipeline: "Pipeline", n_pairs: int) -> tuple[list[dict], dict]:
    """The AI labeler's soft labels on the first n shared pairs: each record's `label` is the
    labeler's P(chosen better) by its rules (the world's general rule), averaged over both orders."""
    key = {"labels": pipeline.labels_key(), "labeler": labeler_key(pipeline), "n_pairs": n_pairs}

    def build(tmp: Path) -> dict:
        pairs = _shared_pairs(pipeline, n_pairs)
        judge = load_ai_judge(pipeline)
        p = judge.prefer_batch([r["prompt"] for r in pairs], [r["chosen"] for r in pairs], [r["rejected"] for r in pairs])
        records = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "label": float(pi)} for r, pi in zip(pairs, p)]
        with open(tmp / "pairs.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        summary = {"ai_labels": len(records), "agreement_with_human": float(np.mean(p > 0.5)), "abstentions": judge.abstentions}
        if pipeline.world is not None:
            gold_c = np.array([pipeline.world.gold(r["prompt"], r["chosen"]).reward for r in pairs])
            gold_r = np.array([pipeline.world.gold(r["prompt"], r["rejected"]).reward for r in pairs])
            differ = gold_c != gold_r
            summary["agreement_with_gold"] = float(((p > 0.5) == (gold_c > gold_r))[differ].mean()) if differ.any() else float("nan")
        return summary

    directory, summary = pipeline._stage("ai_labels", key, build)
    with open(directory / "pairs.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()], summary


def pair_reward_model(pipeline: "Pipeline", labeler: Literal["ai", "human"], n_pairs: int) -> tuple[RewardModel, dict]:
    """One reward model on the first n shared pairs, labelled by the AI labeler (soft labels) or by
    the human annotators (hard labels, no margin: the AI gives none). Returns it and its summary:
    labels spent and held-out accuracy against gold (`rm/accuracy`)."""
    key = {"labels": pipeline.labels_key(), "reward_model": to_dict(pipeline.config.reward_model), "labeler": labeler, "n_pairs": n_pairs}
    if labeler == "ai":
        key["ai_labeler"] = labeler_key(pipeline)

    def build(tmp: Path) -> dict:
        if labeler == "ai":
            records, label_summary = ai_labels(pipeline, n_pairs)
        else:
            records, label_summary = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in _shared_pairs(pipeline, n_pairs)], {}
        sft_dir, _ = pipeline.sft()
        model = train_reward_model(load_pretrained_policy(str(sft_dir / "policy")), pipeline.codec, records, pipeline.config.reward_model,
                                   pipeline.config.trainer, pipeline.config.labels.seed)
        model.save(tmp / "reward_model")
        summary = {"labels": len(records), "labeler": labeler, **{f"labels/{k}": v for k, v in label_summary.items()}}
        if pipeline.world is not None:
            summary.update(holdout_accuracy(pipeline, model))
        return summary

    directory, summary = pipeline._stage(f"{labeler}_reward_model", key, build)
    return RewardModel.load(directory / "reward_model"), summary


def holdout_accuracy(pipeline: "Pipeline", model: RewardModel) -> dict[str, float]:
    """`rm/accuracy`: agreement with the gold reward on the held-out labelled prompts' pairs whose gold rewards differ."""
    from alignbench.pipeline import holdout_pairs, read_holdout

    prompts, firsts, seconds = holdout_pairs(read_holdout(pipeline))
    gold_a = np.array([pipeline.world.gold(p, y).reward for p, y in zip(prompts, firsts)])
    gold_b = np.array([pipeline.world.gold(p, y).reward for p, y in zip(prompts, seconds)])
    score_a = score_texts(model, pipeline.codec, prompts, firsts).numpy()
    score_b = score_texts(model, pipeline.codec, prompts, seconds).numpy()
    differ = gold_a != gold_b
    return {"rm/accuracy": float(((score_a > score_b) == (gold_a > gold_b))[differ].mean()) if differ.any() else float("nan")}
