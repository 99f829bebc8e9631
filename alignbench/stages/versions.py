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
# Hashes recorded without a bump when the data modules took their rows as `alignbench.data.Rows`
# instead of `datasets.Dataset` (stages/training.py): the same rows in the same order.
# Hashes recorded without a bump when a model named by model.name or ai_labeler.model that cannot
# be loaded became a ConfigError naming the key (sources.py, stages/sft.py, stages/ai_labeler.py):
# what loads, loads as before.
# Hashes recorded without a bump when stages/training.py's fits went through `trainer_fit` (a
# Ctrl-C raised again as KeyboardInterrupt): what a fit that ends builds is unchanged.
# Hashes recorded without a bump when the AI reward model's stage.json stopped copying the AI labels
# stage's own records (labels/sha256, labels/seconds, ...; stages/pair_reward_model.py): the same model.
# Hashes recorded without a bump (labels: 2) when the labels stage's ranked pairs took the annotator's
# flips (sources.py): what every other stage builds from the same labels is unchanged.
# Hashes recorded without a bump when the keys of stages built from local data files gained the
# files' checksums (sources.py, `hf_data.dataset_key`): the keys changed, not what is built.

BUILD: dict[str, Build] = {
    # 2: fine-tuned on demonstrations packed several to a row (`DemonstrationDataModule(pack=True)`): the
    # same loss up to float rounding, about 30% fewer tokens through the model.
    "sft": Build(2, ("stages/sft.py", *SHARED), "6a1fee87cac1baf9"),
    # 2: the annotator's label flips reach the ranked pairs (`SimulatedAnnotator.ranked_pairs`; before,
    # only the safe/unsafe labels were flipped): labels as noisy as labels.annotator.flip_rate says.
    "labels": Build(2, ("stages/labels.py", "annotator.py", *SHARED), "ec421d2875876433"),
    # 2: the safety RM's Platt calibration no longer diverges (`fit_calibration`).
    # 3: trained on shared-prompt rows, packed (`train_reward_model`): the same loss up to float rounding.
    # 4: scored (held-out accuracy, the safety calibration) in smaller batches, a prompt's responses
    # with the prompt once (`score_texts`): the same scores up to float rounding.
    "reward_models": Build(4, ("stages/reward_models.py", *SHARED), "1d9d07e0f94c1111"),
    "reference_samples": Build(1, ("stages/reference_samples.py", *SHARED), "37dbf0bf72a7370e"),
    "candidates": Build(1, ("stages/candidates.py", *SHARED), "f2b9db3b1207d6ca"),
    # 2: fine-tuned by the packing fine_tune, as sft 2 (the quickstart's requests do not pack, so
    # its labeler is built as at 1; a shorter request would pack).
    # 3: requests too long to share a row of max_length packed into rows twice as wide
    # (`DemonstrationDataModule`): the same loss up to float rounding, 19% fewer tokens.
    "ai_labeler": Build(3, ("stages/ai_labeler.py", "ai_feedback.py", *SHARED), "67b7948ba590e1bb"),
    # 2: the labeler reads requests batched by length, the last position's logits only
    # (`judges.next_token_logprobs`): the same labels up to float rounding.
    "ai_labels": Build(2, ("stages/ai_labels.py", "stages/ai_labeler.py", *SHARED), "a282d1a5bfeb60ca"),
    # 2: trained by the one `train_reward_model`, which honours reward_model.architecture and LoRA
    # (version 1 always built the backbone + head, without adapters). 3, 4: as reward_models 3, 4.
    "pair_reward_model": Build(4, ("stages/pair_reward_model.py", *SHARED), "b556332ddb54876a"),
    # 2: fine-tuned packed, as sft 2.
    "helpful_only": Build(2, ("stages/helpful_only.py", *SHARED), "651e73d586d6de67"),
    # 2: fine-tuned packed, as sft 2. 3: stage.json records its training tokens (constitutional's
    # budget/train_tokens counts them); the same policy.
    "sl_cai": Build(3, ("stages/sl_cai.py", "stages/helpful_only.py", *SHARED), "eb994bbdadbb870b"),
    # 2, 3, 4: as pair_reward_model.
    "cai_preference_model": Build(4, ("stages/cai_preference_model.py", "stages/pair_reward_model.py", *SHARED), "16d4d9334dfef022"),
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
