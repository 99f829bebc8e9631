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
# Hashes recorded without a version bump when reward-model scoring was cut to reward_model.max_length
# (issue 21): world texts are far shorter (prompt <= 10 + response <= 16 tokens < 48), so nothing the
# world builds changed; only a dataset whose prompt + response passes max_length is scored differently.
# Hashes recorded without a bump when the keys that stages embed of the stages they are built from
# gained those stages' build versions: the keys changed, not what is built.

BUILD: dict[str, Build] = {
    "sft": Build(1, ("stages/sft.py", *SHARED), "45542cad2d210909"),
    "labels": Build(1, ("stages/labels.py", *SHARED), "d2978777c17314db"),
    # 2: the safety RM's Platt calibration no longer diverges (`fit_calibration`).
    "reward_models": Build(2, ("stages/reward_models.py", *SHARED), "ccec0f1ecf85741c"),
    "reference_samples": Build(1, ("stages/reference_samples.py", *SHARED), "1798e7dcfd3f8781"),
    "candidates": Build(1, ("stages/candidates.py", *SHARED), "ef356c910ec6ecec"),
    "ai_labeler": Build(1, ("stages/ai_labeler.py", "ai_feedback.py", *SHARED), "ddff0d45ff1295e7"),
    "ai_labels": Build(1, ("stages/ai_labels.py", "stages/ai_labeler.py", *SHARED), "f3b7a2aef95bd79e"),
    # 2: trained by the one `train_reward_model`, which honours reward_model.architecture and LoRA
    # (version 1 always built the backbone + head, without adapters).
    "pair_reward_model": Build(2, ("stages/pair_reward_model.py", *SHARED), "229237c2b2799a51"),
    "helpful_only": Build(1, ("stages/helpful_only.py", *SHARED), "732c96926f0aabe8"),
    "sl_cai": Build(1, ("stages/sl_cai.py", "stages/helpful_only.py", *SHARED), "88d1f49208cc67e2"),
    # 2: as pair_reward_model.
    "cai_preference_model": Build(2, ("stages/cai_preference_model.py", "stages/pair_reward_model.py", *SHARED), "66370312d24a1e52"),
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
