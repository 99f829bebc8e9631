"""The pair-reward-model stage: one reward model on the first n shared pairs, labelled by the AI
labeler (soft labels: RLAIF's) or by the human annotators (hard labels, no margin, as the AI
gives none: RLAIF's RLHF control at equal label count). Its summary: labels spent and, with
gold, held-out accuracy against it (`rm/accuracy`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from alignbench.config import to_dict
from alignbench.models import RewardModel
from alignbench.stage_cache import build_summary, read_jsonl
from alignbench.stages import ai_labeler, ai_labels
from alignbench.stages.training import centre, holdout_pairs, train_reward_model
from alignbench.stages.versions import version

if TYPE_CHECKING:
    from alignbench.pipeline import Pipeline


def key(p: "Pipeline", labeler: Literal["ai", "human"], n_pairs: int) -> dict:
    # The SFT policy is the model's initialisation (a dataset's labels key does not hold it).
    key = {"labels": p.labels_key(), "sft": p.sft_key(), "reward_model": to_dict(p.config.reward_model), "labeler": labeler, "n_pairs": n_pairs}
    if labeler == "ai":
        key["ai_labeler"] = ai_labeler.dependency_key(p)
    return key


def pair_reward_model(p: "Pipeline", labeler: Literal["ai", "human"], n_pairs: int) -> tuple[RewardModel, dict]:
    directory, summary = p.stage(f"{labeler}_reward_model", key(p, labeler, n_pairs), lambda tmp: build(p, tmp, labeler, n_pairs), version("pair_reward_model"))
    return RewardModel.load(directory / "reward_model"), summary


def build(p: "Pipeline", tmp: Path, labeler: str, n_pairs: int) -> dict:
    if labeler == "ai":
        records, label_summary = ai_labels.ai_labels(p, n_pairs)
    else:
        records, label_summary = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in ai_labels.shared_pairs(p, n_pairs)], {}
    sft_dir, _ = p.sft()
    model = trained_on_pairs(p, sft_dir, records, p.config.labels.seed)
    model.save(tmp / "reward_model")
    return {"labels": len(records), "labeler": labeler, **{f"labels/{k}": v for k, v in build_summary(label_summary).items()}, **holdout_accuracy(p, model)}


def trained_on_pairs(p: "Pipeline", sft_dir: Path, records: list[dict], seed: int) -> RewardModel:
    """A reward model from the SFT policy trained on pair records, its scores centred on the labelled responses."""
    model = train_reward_model(sft_dir / "policy", p.codec, records, p.config.reward_model, p.config.model, p.config.trainer, seed)
    centre(model, p.codec, [r["prompt"] for r in records for _ in (0, 1)], [y for r in records for y in (r["chosen"], r["rejected"])], p.config.reward_model.max_length)
    return model


def holdout_accuracy(p: "Pipeline", model: RewardModel) -> dict[str, float]:
    """`rm/accuracy`: agreement with gold on the held-out labelled prompts' pairs whose gold differs ({} without gold)."""
    from alignbench.reward import score_texts

    if p.source.gold_judge is None:
        return {}
    labels_dir, _ = p.labels()
    prompts, firsts, seconds = holdout_pairs(read_jsonl(labels_dir / "holdout.jsonl"))
    length = p.config.reward_model.max_length
    better = score_texts(model, p.codec, prompts, firsts, max_length=length).numpy() > score_texts(model, p.codec, prompts, seconds, max_length=length).numpy()
    return {"rm/accuracy": p.source.agreement_with_gold(prompts, firsts, seconds, better)}
