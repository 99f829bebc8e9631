"""Build versions of the stages. A stage's cache key holds its version (from 2 on), so a change to
what a stage builds from the same settings must bump its version here, in the same commit: caches
built before are then rebuilt instead of reused.

Beside each version: the files the stage is built by, and the sha256 (first 16 hex digits) of
their sources when the version was set. `tests/test_stages.py` fails when a file changes and the
hash is not updated; whoever updates it decides whether the change alters what is built (bump the
version) or not (a comment, a rename: keep it).
"""

from __future__ import annotations

from typing import NamedTuple


class Build(NamedTuple):
    version: int
    files: tuple[str, ...]
    """Paths relative to the alignbench package."""
    sha256: str


SHARED = ("stages/training.py", "sources.py")

BUILD: dict[str, Build] = {
    "sft": Build(1, ("stages/sft.py", *SHARED), "287261eecb4ce72e"),
    "labels": Build(1, ("stages/labels.py", *SHARED), "18b820714b9a2703"),
    # 2: the safety RM's Platt calibration no longer diverges (`fit_calibration`).
    "reward_models": Build(2, ("stages/reward_models.py", *SHARED), "d70444007cd964d2"),
    "reference_samples": Build(1, ("stages/reference_samples.py", *SHARED), "5cf0e337a1d6d7f8"),
    "candidates": Build(1, ("stages/candidates.py", *SHARED), "f11236cf83261faa"),
    "ai_labeler": Build(1, ("stages/ai_labeler.py", "ai_feedback.py", *SHARED), "1f2eb37bea3758cd"),
    "ai_labels": Build(1, ("stages/ai_labels.py", "stages/ai_labeler.py", *SHARED), "32a4900115c9c92f"),
    # 2: trained by the one `train_reward_model`, which honours reward_model.architecture and LoRA
    # (version 1 always built the backbone + head, without adapters).
    "pair_reward_model": Build(2, ("stages/pair_reward_model.py", *SHARED), "0834bd9ffbf96065"),
    "helpful_only": Build(1, ("stages/helpful_only.py", *SHARED), "30930d5efdc83e00"),
    "sl_cai": Build(1, ("stages/sl_cai.py", "stages/helpful_only.py", *SHARED), "02985316489a473d"),
    # 2: as pair_reward_model.
    "cai_preference_model": Build(2, ("stages/cai_preference_model.py", "stages/pair_reward_model.py", *SHARED), "df98cda1d82643eb"),
}


def version(stage: str) -> int:
    return BUILD[stage].version


def source_hash(stage: str) -> str:
    """The sha256 (first 16 hex digits) of the files `stage` is built by, as they are now."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for name in BUILD[stage].files:
        digest.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]
