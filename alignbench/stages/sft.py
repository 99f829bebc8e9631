"""The SFT stage: the policy every method starts from, fine-tuned on the source's demonstrations
(InstructGPT's step 1). With LoRA its adapters are merged, so methods start from plain weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from alignbench.models import TINY_MODELS, build_tiny_policy, load_pretrained_policy, weights_dtype
from alignbench.stages.training import fine_tune
from alignbench.stages.versions import version

if TYPE_CHECKING:
    from alignbench.pipeline import Pipeline


def key(p: "Pipeline") -> dict:
    return p.source.sft_key(p)


def sft(p: "Pipeline") -> tuple[Path, dict]:
    return p.stage("sft", key(p), lambda tmp: build(p, tmp), version("sft"))


def build(p: "Pipeline", tmp: Path) -> dict:
    c, model = p.config.sft, p.config.model
    if model.name in TINY_MODELS:
        policy = build_tiny_policy(model.name, p.codec.tokenizer, seed=model.init_seed)
    else:
        policy = load_pretrained_policy(model.name, trust_remote_code=model.trust_remote_code, dtype=weights_dtype(p.config.trainer.precision), key="model.name")
    prompts, responses, summary = p.source.demonstrations(p)
    policy, trained = fine_tune(policy, p.codec, prompts, responses, epochs=c.epochs, batch_size=c.batch_size, max_length=c.max_length, optim=c.optim,
                                trainer=p.config.trainer, seed=c.seed, lora=model.lora, gradient_checkpointing=model.gradient_checkpointing)
    policy.save_pretrained(tmp / "policy")
    p.codec.tokenizer.save_pretrained(tmp / "policy")
    return {"demonstrations": len(prompts), **trained, **summary}
