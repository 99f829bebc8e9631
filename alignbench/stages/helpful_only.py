"""The helpful-only stage (Constitutional AI, Bai et al. 2022, step 1): the SFT policy fine-tuned
on demonstrations that comply with every request (harmful ones included), mixed with the world's
critique and revision tasks so that it can be prompted to critique and revise."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from alignbench.config import to_dict
from alignbench.models import load_pretrained_policy
from alignbench.stage_cache import versioned_key
from alignbench.stages.training import fine_tune
from alignbench.stages.versions import version
from alignbench.training import OptimConfig
from alignbench.world import AssistantWorld

if TYPE_CHECKING:
    from alignbench.pipeline import Pipeline


@dataclass
class HelpfulOnlyConfig:
    """The helpful-only policy: SFT fine-tuned to comply with everything and to critique and revise."""

    n_demonstrations: int = 3000
    """Demonstrations that comply with every request, harmful ones included."""
    critique_tasks: int = 2000
    """Critique demonstrations (and as many revision demonstrations) by a random principle, half on harmful prompts."""
    epochs: int = 2
    batch_size: int = 64
    max_length: int = 64
    """Critique and revision requests are long (about 50 tokens)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_ratio=0.05))
    seed: int | None = None
    """Seed of the helpful-only policy's data and training (None: the run's seed)."""

    def __post_init__(self):
        for key in ("n_demonstrations", "epochs", "batch_size", "max_length"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if self.critique_tasks < 0:
            raise ValueError(f"critique_tasks={self.critique_tasks} must be >= 0")


def red_team_prompts(world: AssistantWorld, n: int, seed: int) -> list[str]:
    """n harmful training prompts (the world's red-team set)."""
    found: list[str] = []
    draw = 0
    while len(found) < n:
        found += [x for x in world.sample_prompts("train", 8 * n, seed=seed + 1000 * draw) if world.is_harmful(x)]
        draw += 1
    return found[:n]


def key(p: "Pipeline", c: HelpfulOnlyConfig) -> dict:
    return {"sft": p.sft_key(), "helpful_only": to_dict(c)}


def dependency_key(p: "Pipeline", c: HelpfulOnlyConfig) -> dict:
    """`key` as the stages built from the helpful-only policy embed it: with its build version."""
    return versioned_key(key(p, c), version("helpful_only"))


def helpful_only(p: "Pipeline", c: HelpfulOnlyConfig) -> tuple[Path, dict]:
    """The cached helpful-only policy (`OUT/cache/helpful_only-<hash>/policy`). A seed left at
    None is the pipeline's run seed."""
    if c.seed is None:
        c = dataclasses.replace(c, seed=p.config.seed)
    return p.stage("helpful_only", key(p, c), lambda tmp: build(p, tmp, c), version("helpful_only"))


def build(p: "Pipeline", tmp: Path, c: HelpfulOnlyConfig) -> dict:
    world = p.world
    demonstrator = dataclasses.replace(world.config.demonstrator, comply_harmful=1.0)
    compliant = AssistantWorld(dataclasses.replace(world.config, demonstrator=demonstrator))
    rng = np.random.default_rng([c.seed, 31])
    prompts = world.sample_prompts("train", c.n_demonstrations, seed=c.seed + 11)
    texts = [(x, compliant.demonstrate(x, rng)) for x in prompts]
    # Critique and revision tasks on answers that comply half of the time, by any principle.
    n_harmful = c.critique_tasks // 2
    task_prompts = red_team_prompts(world, n_harmful, c.seed + 13) + world.sample_prompts("train", c.critique_tasks - n_harmful, seed=c.seed + 17)
    for x in task_prompts:
        response = (compliant if rng.random() < 0.5 else world).demonstrate(x, rng)
        principle = world.principles[int(rng.integers(len(world.principles)))]
        critique = world.critique(x, response, principle)
        texts.append((world.critique_request(x, response, principle), critique))
        texts.append((world.revision_request(x, response, principle, critique), world.revise(x, response, principle)))
    order = rng.permutation(len(texts))
    sft_dir, _ = p.sft()
    model = p.config.model
    policy, trained = fine_tune(load_pretrained_policy(str(sft_dir / "policy")), p.codec, [texts[i][0] for i in order], [texts[i][1] for i in order],
                                epochs=c.epochs, batch_size=c.batch_size, max_length=c.max_length, optim=c.optim, trainer=p.config.trainer, seed=c.seed,
                                lora=model.lora, gradient_checkpointing=model.gradient_checkpointing)
    policy.save_pretrained(tmp / "policy")
    return {"demonstrations": len(prompts), "critique_tasks": len(task_prompts), "tokens": trained["tokens"]}
