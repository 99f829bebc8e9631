"""The labels stage: the preference pairs that reward models and preference methods share —
rankings of SFT samples by the world's simulated annotators, or a dataset's pairs (the source
builds them). Files: overall / helpfulness (/ safety, safety_labels) .jsonl to train on, and
holdout.jsonl, the held-out prompts with their responses that every accuracy is measured on."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from alignbench.stages.versions import version

if TYPE_CHECKING:
    from alignbench.pipeline import Pipeline


def key(p: "Pipeline") -> dict:
    return p.source.labels_key(p)


def labels(p: "Pipeline") -> tuple[Path, dict]:
    return p.stage("labels", key(p), lambda tmp: p.source.build_labels(p, tmp), version("labels"))
