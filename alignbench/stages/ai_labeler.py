"""The AI-labeler stage: a world model fine-tuned on the world's judgment texts (by default from
the SFT checkpoint; alignbench.ai_feedback has the texts), and `ai_judge`, the labeler as an
`LMJudge` — the fine-tuned world labeler, or any HF model prompted as it is."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from alignbench.ai_feedback import AILabelerConfig, judgment_examples, labeler_prompts, principle_agreement, world_judge
from alignbench.config import ConfigError, to_dict
from alignbench.evaluation import EvalConfig, sample_policy
from alignbench.judges import LMJudge
from alignbench.models import TINY_MODELS, TextCodec, build_tiny_policy, freeze, load_pretrained_policy, load_tokenizer
from alignbench.seeding import seeded_generator
from alignbench.stage_cache import versioned_key
from alignbench.stages.training import fine_tune
from alignbench.stages.versions import version

if TYPE_CHECKING:
    from alignbench.pipeline import Pipeline


def key(p: "Pipeline") -> dict:
    # The SFT policy writes half of the labeler's training responses (and may be its initialisation).
    return {"world": to_dict(p.config.world), "ai_labeler": to_dict(p.config.ai_labeler), "sft": p.sft_key(), "max_new_tokens": p.config.eval.max_new_tokens}


def dependency_key(p: "Pipeline") -> dict:
    """`key` as the stages built from the labeler embed it: with its build version."""
    return versioned_key(key(p), version("ai_labeler"))


def ai_labeler(p: "Pipeline") -> tuple[Path, dict]:
    """The fine-tuned world labeler (`OUT/cache/ai_labeler-<hash>/labeler`)."""
    if p.config.ai_labeler.model not in (*TINY_MODELS, "sft"):
        raise ConfigError("only the SFT checkpoint or a named world model is fine-tuned as the AI labeler; a hub model is prompted as it is")
    if p.world is None:
        raise ConfigError(f"ai_labeler.model={p.config.ai_labeler.model!r} is fine-tuned on the built-in world's judgment texts; with data.source=hf name a Hugging Face model as ai_labeler.model")
    return p.stage("ai_labeler", key(p), lambda tmp: build(p, tmp), version("ai_labeler"))


def build(p: "Pipeline", tmp: Path) -> dict:
    c, world, model_config = p.config.ai_labeler, p.world, p.config.model
    sft_dir, _ = p.sft()
    if c.model == "sft":
        model = load_pretrained_policy(str(sft_dir / "policy"))
    else:
        model = build_tiny_policy(c.model, p.codec.tokenizer, seed=c.seed)
    sft_policy = freeze(load_pretrained_policy(str(sft_dir / "policy")))
    requests, answers = judgment_examples(world, c, _policy_samples(p, sft_policy, c))
    model, trained = fine_tune(model, p.codec, requests, answers, epochs=c.epochs, batch_size=c.batch_size, max_length=c.max_length, optim=c.optim,
                               trainer=p.config.trainer, seed=c.seed, lora=model_config.lora, gradient_checkpointing=model_config.gradient_checkpointing)
    model.save_pretrained(tmp / "labeler")
    p.codec.tokenizer.save_pretrained(tmp / "labeler")
    judge = world_judge(freeze(model), p.codec, c, world)
    return {"examples": len(requests), "tokens": trained["tokens"], **principle_agreement(judge, world, n=600, seed=c.seed)}


def _policy_samples(p: "Pipeline", policy, c: AILabelerConfig) -> dict[str, list[str]]:
    """Two fresh SFT samples for a `policy_sample_fraction` share of the labeler's training prompts."""
    prompts = sorted(set(labeler_prompts(p.world, c)))
    chosen = [prompts[i] for i in np.random.default_rng([c.seed, 19]).permutation(len(prompts))[: int(c.policy_sample_fraction * c.n_examples)]]
    if not chosen:
        return {}
    texts = sample_policy(policy, None, p.codec, chosen, EvalConfig(max_new_tokens=p.config.eval.max_new_tokens),
                          seeded_generator(c.seed, "ai_labeler"), desc="sampling responses to judge", num_samples=2).texts
    return {x: [texts[2 * i], texts[2 * i + 1]] for i, x in enumerate(chosen)}


def ai_judge(p: "Pipeline", principles: Sequence[str] | None = None, principle_sampling: str = "all") -> LMJudge:
    """The AI labeler as an `LMJudge`: the fine-tuned world labeler, or a hub / local model as it is.
    It judges by `principles` (texts; RL-CAI passes its constitution's), else by
    `ai_labeler.principles`, else by the world's general rule (overall quality, RLAIF)."""
    c = p.config.ai_labeler
    if c.model in (*TINY_MODELS, "sft"):
        directory, _ = ai_labeler(p)
        model, codec = load_pretrained_policy(str(directory / "labeler")), p.codec
    else:
        codec = TextCodec(load_tokenizer(c.model, trust_remote_code=c.trust_remote_code, key="ai_labeler.model"))
        model = load_pretrained_policy(c.model, trust_remote_code=c.trust_remote_code, key="ai_labeler.model")
    return world_judge(freeze(model), codec, c, p.world, principles, principle_sampling)
