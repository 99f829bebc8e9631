"""AI feedback: the AI labeler, its labels, and reward models trained on labelled pairs.

RLAIF (Lee et al. 2023) and Constitutional AI (Bai et al. 2022) replace human preference
labels with a language model's. For a comparison with human feedback to mean anything, the
AI labels must carry a model's errors, not a noise setting: in the world the AI labeler is a
world model larger than the policy (`world-base` by default), fine-tuned on the world's
principle-conditioned judgment texts ("which answer is better by rule ... a : ... b : ..."
answered "a" or "b", and "how good is the answer by rule ..." answered 0..10), and it is only
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

from alignbench.config import to_dict
from alignbench.data import DemonstrationDataModule, PreferenceDataModule, preference_rows
from alignbench.judges import LMJudge
from alignbench.models import TINY_MODELS, RewardModel, TextCodec, build_tiny_policy, freeze, load_pretrained_policy, load_tokenizer
from alignbench.reward import RewardModelConfig, RewardModelTraining, score_texts
from alignbench.sft import SupervisedFineTuning
from alignbench.training import OptimConfig, TrainerConfig, make_trainer
from alignbench.world import JUDGMENT_ANSWERS, JUDGMENT_REQUEST, RATING_ANSWERS, RATING_REQUEST, AssistantWorld

if TYPE_CHECKING:
    from alignbench.pipeline import Pipeline


@dataclass
class AILabelerConfig:
    """The AI labeler used by RLAIF, RL-CAI and `alignbench judge-report`."""

    model: str = "world-base"
    """A named world model (larger than the policy), fine-tuned here on the world's judgment texts;
    or any HF causal LM (hub name or local path), prompted as it is with the templates below."""
    n_examples: int = 24000
    """Judgment and rating texts the world labeler is fine-tuned on."""
    rating_fraction: float = 0.25
    """Share of those that are single-response ratings (for direct RLAIF) rather than comparisons."""
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
    """Principle texts the labeler judges by (None: the world's constitution)."""
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
        for key in ("rating_fraction", "tie_keep"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"ai_labeler.{key}={getattr(self, key)} must be in [0, 1]")
        if self.answer_words is not None and len(self.answer_words) != 2:
            raise ValueError(f"ai_labeler.answer_words={self.answer_words} must name exactly two words")


# --- the world labeler's training texts ---------------------------------------------------
def judgment_examples(world: AssistantWorld, config: AILabelerConfig, split: str = "train") -> tuple[list[str], list[str]]:
    """(request, answer) texts: pairs of demonstrator answers compared by a random principle,
    answered by the gold principle preference, and single answers rated 0..10 by the gold
    principle score."""
    rng = np.random.default_rng([config.seed, 17])
    prompts = world.sample_prompts(split, config.n_examples * 2, seed=config.seed + 7)
    requests, answers = [], []
    for prompt in prompts:
        if len(requests) == config.n_examples:
            break
        principle = world.principles[int(rng.integers(len(world.principles)))]
        if rng.random() < config.rating_fraction:
            response = world.demonstrate(prompt, rng)
            requests.append(world.rating_request(prompt, response, principle))
            answers.append(str(round(10 * world.principle_score(prompt, response, principle))))
            continue
        a, b = world.demonstrate(prompt, rng), world.demonstrate(prompt, rng)
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
    model = RewardModel.from_policy(policy)
    total = len(data.train_dataloader()) * config.epochs
    torch.manual_seed(seed)
    make_trainer(trainer, max_steps=total, max_epochs=config.epochs, grad_clip=config.optim.grad_clip).fit(RewardModelTraining(model, config, total), datamodule=data)
    model.eval()
    prompts = [r["prompt"] for r in records for _ in (0, 1)]
    responses = [y for r in records for y in (r["chosen"], r["rejected"])]
    model.calibration.copy_(torch.tensor([1.0, -float(score_texts(model, codec, prompts, responses).mean())]))
    return model


# --- the labeler ------------------------------------------------------------------------
def labeler_key(pipeline: "Pipeline") -> dict:
    key = {"world": to_dict(pipeline.config.world), "ai_labeler": to_dict(pipeline.config.ai_labeler)}
    if pipeline.config.ai_labeler.model == "sft":
        key["sft"] = pipeline.sft_key()
    return key


def ai_labeler(pipeline: "Pipeline") -> tuple[Path, dict]:
    """The fine-tuned world labeler's cached stage (`OUT/cache/ai_labeler-<hash>/`)."""
    if pipeline.config.ai_labeler.model not in (*TINY_MODELS, "sft"):
        raise ValueError("only a named world model is fine-tuned as the AI labeler; a hub model is prompted as it is")
    return pipeline._stage("ai_labeler", labeler_key(pipeline), lambda tmp: _build_ai_labeler(pipeline, tmp))


def _build_ai_labeler(pipeline: "Pipeline", tmp: Path) -> dict:
    c, world = pipeline.config.ai_labeler, pipeline.world
    if c.model == "sft":
        sft_dir, _ = pipeline.sft()
        model = load_pretrained_policy(str(sft_dir / "policy"))
    else:
        model = build_tiny_policy(c.model, pipeline.codec.tokenizer, seed=c.seed)
    requests, answers = judgment_examples(world, c)
    tokens = fine_tune(model, pipeline.codec, requests, answers, epochs=c.epochs, batch_size=c.batch_size, max_length=c.max_length,
                       optim=c.optim, trainer=pipeline.config.trainer, seed=c.seed)
    model.save_pretrained(tmp / "labeler")
    pipeline.codec.tokenizer.save_pretrained(tmp / "labeler")
    judge = _world_judge(freeze(model), pipeline.codec, c, world)
    return {"examples": len(requests), "tokens": tokens, **principle_agreement(judge, world, n=400, seed=c.seed)}


def _world_judge(model, codec: TextCodec, c: AILabelerConfig, world: AssistantWorld | None, principle_sampling: str = "all") -> LMJudge:
    principles = c.principles or ([p.text for p in world.principles] if world is not None else None)
    if not principles:
        raise ValueError("ai_labeler.principles must list the principle texts the labeler judges by (there is no world constitution)")
    return LMJudge(
        model, codec, principles,
        comparison_template=c.comparison_template or JUDGMENT_REQUEST, answer_words=c.answer_words or JUDGMENT_ANSWERS,
        rating_template=c.rating_template or RATING_REQUEST, rating_words=c.rating_words or RATING_ANSWERS,
        principle_sampling=principle_sampling, min_answer_mass=c.min_answer_mass,
    )


def load_ai_judge(pipeline: "Pipeline", principles: Sequence[str] | None = None, principle_sampling: str = "all") -> LMJudge:
    """The AI labeler as an `LMJudge`: the fine-tuned world labeler, or a hub / local model as it is.
    `principles` (texts) narrows the constitution it judges by (RL-CAI's harmlessness principles)."""
    c = pipeline.config.ai_labeler
    if c.model in (*TINY_MODELS, "sft"):
        directory, _ = ai_labeler(pipeline)
        model, codec = load_pretrained_policy(str(directory / "labeler")), pipeline.codec
    else:
        model = load_pretrained_policy(c.model, trust_remote_code=c.trust_remote_code)
        codec = TextCodec(load_tokenizer(c.model, trust_remote_code=c.trust_remote_code))
    judge = _world_judge(freeze(model), codec, c, pipeline.world, principle_sampling)
    if principles is not None:
        judge.principles = list(principles)
    return judge


def principle_agreement(judge: LMJudge, world: AssistantWorld, n: int, seed: int) -> dict[str, float]:
    """The labeler's accuracy on held-out (validation) comparisons whose gold principle preference
    is not a tie, each judged by that principle alone."""
    rng = np.random.default_rng([seed, 29])
    rows = []
    for prompt in world.sample_prompts("val", 8 * n, seed=seed):
        principle = world.principles[int(rng.integers(len(world.principles)))]
        a, b = world.demonstrate(prompt, rng), world.demonstrate(prompt, rng)
        preference = world.principle_preference(prompt, a, b, principle)
        if preference != 0.5:
            rows.append((prompt, a, b, principle.text, preference))
        if len(rows) == n:
            break
    principles = judge.principles
    correct = []
    for rule in {r[3] for r in rows}:
        subset = [r for r in rows if r[3] == rule]
        judge.principles = [rule]
        p = judge.prefer_batch([r[0] for r in subset], [r[1] for r in subset], [r[2] for r in subset])
        correct += [float((pi > 0.5) == (r[4] == 1.0)) for pi, r in zip(p, subset)]
    judge.principles = principles
    return {"principle_accuracy": float(np.mean(correct)) if correct else float("nan"), "principle_pairs": len(correct)}


# --- AI labels on the shared labelled pairs ----------------------------------------------
def _shared_pairs(pipeline: "Pipeline", n_pairs: int) -> list[dict]:
    """The first n (0: all) of the pairs the human annotators labelled (overall preference)."""
    labels_dir, _ = pipeline.labels()
    with open(labels_dir / "overall.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if n_pairs > len(records):
        raise ValueError(f"n_labels={n_pairs} is more than the {len(records)} labelled pairs; raise labels.n_prompts or lower n_labels")
    return records[:n_pairs] if n_pairs else records


def ai_labels(pipeline: "Pipeline", n_pairs: int) -> tuple[list[dict], dict]:
    """The AI labeler's soft labels on the first n shared pairs: each record's `label` is the
    labeler's P(chosen better), averaged over both orders and every principle."""
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
    labels_dir, _ = pipeline.labels()
    with open(labels_dir / "holdout.jsonl") as f:
        holdout = [json.loads(line) for line in f if line.strip()]
    prompts, firsts, seconds = [], [], []
    for row in holdout:
        for i, a in enumerate(row["responses"]):
            for b in row["responses"][i + 1 :]:
                prompts.append(row["prompt"])
                firsts.append(a)
                seconds.append(b)
    gold_a = np.array([pipeline.world.gold(p, y).reward for p, y in zip(prompts, firsts)])
    gold_b = np.array([pipeline.world.gold(p, y).reward for p, y in zip(prompts, seconds)])
    score_a = score_texts(model, pipeline.codec, prompts, firsts).numpy()
    score_b = score_texts(model, pipeline.codec, prompts, seconds).numpy()
    differ = gold_a != gold_b
    return {"rm/accuracy": float(((score_a > score_b) == (gold_a > gold_b))[differ].mean()) if differ.any() else float("nan")}
