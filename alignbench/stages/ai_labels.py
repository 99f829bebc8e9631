"""The AI-labels stage: the AI labeler's soft labels on the first n of the pairs the human
annotators labelled (so that AI and human feedback compare on equal pairs and counts). Each
record's `label` is the labeler's P(chosen better) by its rules, averaged over both orders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from alignbench.config import ConfigError
from alignbench.stage_cache import read_jsonl, write_jsonl
from alignbench.stages import ai_labeler
from alignbench.stages.versions import version

if TYPE_CHECKING:
    from alignbench.pipeline import Pipeline


def shared_pairs(p: "Pipeline", n_pairs: int) -> list[dict]:
    """The first n (0: all) of the pairs the human annotators labelled (overall preference)."""
    labels_dir, _ = p.labels()
    records = read_jsonl(labels_dir / "overall.jsonl")
    if n_pairs > len(records):
        raise ConfigError(f"n_labels={n_pairs} is more than the {len(records)} labelled pairs; raise labels.n_prompts or lower n_labels")
    return records[:n_pairs] if n_pairs else records


def key(p: "Pipeline", n_pairs: int) -> dict:
    return {"labels": p.labels_key(), "labeler": ai_labeler.dependency_key(p), "n_pairs": n_pairs}


def ai_labels(p: "Pipeline", n_pairs: int) -> tuple[list[dict], dict]:
    directory, summary = p.stage("ai_labels", key(p, n_pairs), lambda tmp: build(p, tmp, n_pairs), version("ai_labels"))
    return read_jsonl(directory / "pairs.jsonl"), summary


def build(p: "Pipeline", tmp: Path, n_pairs: int) -> dict:
    pairs = shared_pairs(p, n_pairs)
    judge = ai_labeler.ai_judge(p)
    prompts, chosen, rejected = [r["prompt"] for r in pairs], [r["chosen"] for r in pairs], [r["rejected"] for r in pairs]
    label = judge.prefer_batch(prompts, chosen, rejected)
    write_jsonl(tmp / "pairs.jsonl", [{"prompt": x, "chosen": a, "rejected": b, "label": float(q)} for x, a, b, q in zip(prompts, chosen, rejected, label)])
    summary = {"ai_labels": len(pairs), "agreement_with_human": float(np.mean(label > 0.5)), "abstentions": judge.abstentions}
    gold = p.source.agreement_with_gold(prompts, chosen, rejected, label > 0.5)
    if gold is not None:
        summary["agreement_with_gold"] = gold
    return summary
