"""The training loops every stage shares: one supervised fine-tune, one reward-model fit, and
one measure of agreement with gold. Each honours the model section as the policy does: the
reward-model architecture, LoRA adapters (merged when done), gradient checkpointing and
`trust_remote_code`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from alignbench.data import DemonstrationDataModule, PreferenceDataModule, Rows, preference_rows
from alignbench.models import LoRAConfig, RewardModel, TextCodec, load_pretrained_policy, merge_lora, prepare_for_training
from alignbench.reward import RewardModelConfig, RewardModelTraining, score_texts
from alignbench.sft import SupervisedFineTuning
from alignbench.training import OptimConfig, TrainerConfig, make_trainer, trainer_fit


def fine_tune(policy, codec: TextCodec, prompts: Sequence[str], responses: Sequence[str], *, epochs: int, batch_size: int, max_length: int,
              optim: OptimConfig, trainer: TrainerConfig, seed: int, lora: LoRAConfig | None = None,
              gradient_checkpointing: bool = False) -> tuple[torch.nn.Module, dict]:
    """Supervised fine-tuning on (prompt, response) texts, the loss on the response tokens.
    With `lora` enabled, fresh adapters are trained and merged into the weights at the end. The
    demonstrations are packed several to a row (`DemonstrationDataModule(pack=True)`).
    Returns the tuned policy (in eval mode) and {"steps", "tokens"}."""
    policy = prepare_for_training(policy, lora or LoRAConfig(), gradient_checkpointing, seed=seed)
    data = DemonstrationDataModule(Rows.from_dict({"prompt": list(prompts), "response": list(responses)}), codec, batch_size, max_length, seed=seed, pack=True)
    total = len(data.train_dataloader()) * epochs
    module = SupervisedFineTuning(policy.train(), optim, total)
    torch.manual_seed(seed)
    trainer_fit(make_trainer(trainer, max_steps=total, max_epochs=epochs, grad_clip=optim.grad_clip), module, datamodule=data)
    policy = merge_lora(policy)
    policy.eval()
    return policy, {"steps": total, "tokens": module.tokens_trained}


def train_reward_model(policy_dir: Path, codec: TextCodec, records: list[dict], config: RewardModelConfig, model, trainer: TrainerConfig,
                       seed: int) -> RewardModel:
    """A reward model initialised from the policy saved in `policy_dir` (InstructGPT), trained
    with the ranking loss on pair records ({prompt, chosen, rejected, margin?, label?}).

    `config.architecture`: the policy's backbone with a scalar head (`backbone_head`), or a
    transformers sequence classifier with one label. `model` is the experiment's model section:
    its LoRA adapters (merged at the end), gradient checkpointing and trust_remote_code apply
    here as they do to the policy. A prompt's responses are scored in one row with the prompt once,
    several prompts to a row (`PreferenceDataModule(share_prompts=True, pack=True)`). Returned
    uncalibrated, in eval mode."""
    policy = load_pretrained_policy(str(policy_dir), trust_remote_code=model.trust_remote_code) if config.architecture == "backbone_head" else None
    data = PreferenceDataModule(preference_rows(records, allow_empty_responses=True), codec, config.batch_size, config.max_length, seed=seed,
                                share_prompts=True, pack=True)
    torch.manual_seed(seed)  # before the head's initialisation: not whatever ran before in this process
    if config.architecture == "sequence_classification":
        from transformers import AutoModelForSequenceClassification

        classifier = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1, dtype=torch.float32, trust_remote_code=model.trust_remote_code)
        classifier.config.pad_token_id = codec.pad_token_id  # transformers pools its own forward at the last non-pad token
        reward_model = RewardModel.from_sequence_classifier(classifier)
    else:
        reward_model = RewardModel.from_policy(policy, likelihood=config.likelihood)
    reward_model.backbone = prepare_for_training(reward_model.backbone, model.lora, model.gradient_checkpointing, seed=seed, causal_lm=False)
    if model.lora.enabled and reward_model.lm_head is not None:
        reward_model.lm_head.requires_grad_(False)  # an untied LM head is as large as the embeddings LoRA leaves frozen
    total = len(data.train_dataloader()) * config.epochs
    trainer_fit(make_trainer(trainer, max_steps=total, max_epochs=config.epochs, grad_clip=config.optim.grad_clip), RewardModelTraining(reward_model, config, total), datamodule=data)
    reward_model.backbone = merge_lora(reward_model.backbone)
    reward_model.eval()
    return reward_model


def centre(model: RewardModel, codec: TextCodec, prompts: Sequence[str], responses: Sequence[str], max_length: int) -> None:
    """Calibrate `model` in place so that its mean score on these responses (cut to `max_length`
    tokens, as scored) is 0 (scale 1)."""
    raw = score_texts(model, codec, list(prompts), list(responses), max_length=max_length)
    model.calibration.copy_(torch.tensor([1.0, -float(raw.mean())]))


def agreement_where_gold_differs(first_better: np.ndarray, gold_first: np.ndarray, gold_second: np.ndarray) -> float:
    """Accuracy against gold: the share of pairs whose gold scores differ on which the decision
    `first_better` (bool [N]) picks the one gold prefers; NaN when gold ties on every pair."""
    gold_first, gold_second = np.asarray(gold_first), np.asarray(gold_second)
    differ = gold_first != gold_second
    correct = np.asarray(first_better) == (gold_first > gold_second)
    return float(correct[differ].mean()) if differ.any() else float("nan")


def holdout_pairs(holdout: list[dict]) -> tuple[list[str], list[str], list[str]]:
    """Every pair of distinct responses of the held-out labelled prompts (`holdout.jsonl` rows):
    prompts, first responses, second responses."""
    prompts, firsts, seconds = [], [], []
    for row in holdout:
        for i, a in enumerate(row["responses"]):
            for b in row["responses"][i + 1 :]:
                prompts.append(row["prompt"])
                firsts.append(a)
                seconds.append(b)
    return prompts, firsts, seconds
