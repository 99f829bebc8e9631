"""The reward-models stage: a helpfulness reward model (and on the world a safety one, combined
as Llama 2 does) trained on the labels stage's pairs, calibrated, and measured on the held-out
prompts — against gold on the world, against the dataset's labels otherwise (`rm/*`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from alignbench.annotator import LLAMA2_MARGIN_SMALL
from alignbench.stage_cache import read_jsonl
from alignbench.stages.training import train_reward_model
from alignbench.stages.versions import version

if TYPE_CHECKING:
    from alignbench.pipeline import Pipeline


def key(p: "Pipeline") -> dict:
    return p.source.reward_key(p)


def reward_models(p: "Pipeline") -> tuple[Path, dict]:
    return p.stage("reward_models", key(p), lambda tmp: build(p, tmp), version("reward_models"))


def build(p: "Pipeline", tmp: Path) -> dict:
    sft_dir, _ = p.sft()
    labels_dir, label_summary = p.labels()
    models = {}
    for axis in p.source.reward_axes():
        records = read_jsonl(labels_dir / f"{axis}.jsonl")
        for r in records:
            if "margin_level" in r:  # the world's annotators give Llama 2's margin levels
                r["margin"] = LLAMA2_MARGIN_SMALL[r["margin_level"]]
        models[axis] = train_reward_model(sft_dir / "policy", p.codec, records, p.config.reward_model, p.config.model, p.config.trainer, p.config.labels.seed)
    p.source.calibrate(p, models, labels_dir)
    for axis, model in models.items():
        model.save(tmp / axis)
    return {"human_labels": label_summary["human_labels"], **p.source.reward_accuracy(p, models, labels_dir)}
