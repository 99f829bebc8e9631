"""The CAI preference-model stage (Constitutional AI, Bai et al. 2022, RL-CAI): the AI labeler
compares pairs of SL-CAI samples, each by one principle drawn at random (soft labels, both
orders averaged); a preference model is trained on those harmlessness preferences mixed with
the first n human helpfulness labels. `c` is the constitutional method's config."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from alignbench.config import to_dict
from alignbench.evaluation import EvalConfig, sample_policy
from alignbench.models import RewardModel, freeze, load_pretrained_policy
from alignbench.seeding import seeded_generator
from alignbench.stage_cache import read_jsonl
from alignbench.stages import ai_labeler
from alignbench.stages.helpful_only import red_team_prompts
from alignbench.stages.pair_reward_model import holdout_accuracy, trained_on_pairs
from alignbench.stages.training import agreement_where_gold_differs
from alignbench.stages.versions import version

if TYPE_CHECKING:
    from alignbench.pipeline import Pipeline


def key(p: "Pipeline", c, sl_dir: Path, seed: int) -> dict:
    return {"sl_cai": str(sl_dir.name), "labeler": ai_labeler.dependency_key(p), "labels": p.labels_key(),
            "reward_model": to_dict(p.config.reward_model), "rl_prompts": c.rl_prompts, "principles": c.principles,
            "human_helpfulness_pairs": c.human_helpfulness_pairs, "seed": seed}


def cai_preference_model(p: "Pipeline", c, sl_dir: Path, seed: int) -> tuple[RewardModel, dict]:
    directory, summary = p.stage("cai_preference_model", key(p, c, sl_dir, seed), lambda tmp: build(p, tmp, c, sl_dir, seed), version("cai_preference_model"))
    return RewardModel.load(directory / "reward_model"), summary


def build(p: "Pipeline", tmp: Path, c, sl_dir: Path, seed: int) -> dict:
    world, codec = p.world, p.codec
    policy = freeze(load_pretrained_policy(str(sl_dir / "policy")))
    half = c.rl_prompts // 2
    prompts = red_team_prompts(world, half, seed=1000 * seed + 53) + world.sample_prompts("train", c.rl_prompts - half, seed=1000 * seed + 59)
    samples = sample_policy(policy, None, codec, prompts, EvalConfig(max_new_tokens=p.config.eval.max_new_tokens), seeded_generator(seed, "rl_cai_pairs"), num_samples=2).texts
    pairs = [(x, samples[2 * i], samples[2 * i + 1]) for i, x in enumerate(prompts) if samples[2 * i] != samples[2 * i + 1]]
    texts = [x.text for x in world.principles if x.name in c.principles]
    judge = ai_labeler.ai_judge(p, principles=texts, principle_sampling="random")
    label = judge.prefer_batch([x for x, _, _ in pairs], [a for _, a, _ in pairs], [b for _, _, b in pairs])
    records = [{"prompt": x, "chosen": a, "rejected": b, "label": float(q)} for (x, a, b), q in zip(pairs, label)]
    labels_dir, _ = p.labels()
    helpfulness = read_jsonl(labels_dir / "helpfulness.jsonl")[: c.human_helpfulness_pairs]
    records += [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in helpfulness]
    sft_dir, _ = p.sft()
    model = trained_on_pairs(p, sft_dir, records, seed)
    model.save(tmp / "reward_model")
    # The principle the judge drew for each pair, and the world's preference by it.
    by_text = {x.text: x for x in world.principles}
    drawn = [by_text[rules[0]] for rules in judge.principles_for([x for x, _, _ in pairs], [a for _, a, _ in pairs], [b for _, _, b in pairs])]
    gold = np.array([world.principle_preference(x, a, b, pr) for (x, a, b), pr in zip(pairs, drawn)])
    return {"ai_labels": len(pairs), "human_labels": len(helpfulness), "policy_samples": 2 * len(prompts),
            "ai_agreement_with_principle": agreement_where_gold_differs(label > 0.5, gold, 1 - gold), **holdout_accuracy(p, model)}
