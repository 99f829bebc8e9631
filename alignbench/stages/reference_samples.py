"""The reference-samples stage: the SFT policy's samples on the evaluation prompts, which every
method's win rate and KL at evaluation compare against (one set per seed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from alignbench.config import to_dict
from alignbench.evaluation import EvalConfig, sample_policy
from alignbench.models import freeze, load_pretrained_policy, weights_dtype
from alignbench.seeding import seeded_generator
from alignbench.stages.versions import version

if TYPE_CHECKING:
    from alignbench.pipeline import Pipeline

# Evaluation settings left out of the key: those that do not change the reference's samples, and
# the batch size, which does but enters the key only where it is not the default (below).
NOT_READ = ("eval_every", "judge", "bootstrap_samples", "batch_size", "temperatures")


def key(p: "Pipeline", seed: int) -> dict:
    key = {"sft": p.sft_key(), "eval": {k: v for k, v in to_dict(p.config.eval).items() if k not in NOT_READ}, "seed": seed}
    # The batch size sets how the one stream is drawn (which uniform goes to which row), so it
    # changes the samples; in the key where it is not the default, so default caches stay valid.
    if p.config.eval.batch_size != EvalConfig().batch_size:
        key["eval"]["batch_size"] = p.config.eval.batch_size
    prompts = p.source.eval_prompts_key(p)
    if prompts is not None:
        key["prompts"] = prompts
    return key


def reference_samples(p: "Pipeline", seed: int) -> tuple[Path, dict]:
    return p.stage("reference_samples", key(p, seed), lambda tmp: build(p, tmp, seed), version("reference_samples"))


def build(p: "Pipeline", tmp: Path, seed: int) -> dict:
    sft_dir, _ = p.sft()
    model = p.config.model
    reference = freeze(load_pretrained_policy(str(sft_dir / "policy"), trust_remote_code=model.trust_remote_code, dtype=weights_dtype(p.config.trainer.precision))).to(p.device)
    for split, prompts in p.eval_prompts().items():
        out = sample_policy(reference, None, p.codec, prompts, p.config.eval, seeded_generator(seed, "reference", split), desc=f"reference samples ({split})")
        with open(tmp / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps({"prompt": x, "response_ids": ids, "text": t}) + "\n" for x, ids, t in zip(prompts, out.response_ids, out.texts))
    return {"splits": list(p.eval_prompts())}
