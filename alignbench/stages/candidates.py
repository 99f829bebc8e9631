"""The candidates stage: n samples per prompt from the SFT policy, drawn from one random stream
and kept, so that the methods which choose among the same candidates share them: `best_of_n` and
`best_of_n_gold` draw the evaluation's candidates from the same stream (the run seed's
"policy" stream), and the second reads the first's instead of sampling 16 x 2048 again.

The key holds everything the samples depend on: the SFT stage, the sampling settings, n, the
prompts, and the generator's state itself (so a cached set is only ever the draw that stream
would have made). Reading from the cache does not advance the generator: nothing may draw from it
afterwards (best-of-n does not)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from alignbench.config import config_hash
from alignbench.evaluation import EvalConfig, PolicyResponses, sample_policy
from alignbench.stage_cache import read_jsonl
from alignbench.stages.versions import version

if TYPE_CHECKING:
    from alignbench.pipeline import Pipeline

# What sample_policy reads of the evaluation config (batch_size included: it sets how the stream is drawn).
SAMPLING = ("temperature", "top_p", "max_new_tokens", "batch_size")


def key(p: "Pipeline", prompts: Sequence[str], config: EvalConfig, n: int, generator: torch.Generator) -> dict:
    return {"sft": p.sft_key(), "sampling": {k: getattr(config, k) for k in SAMPLING}, "n": n, "prompts": config_hash(list(prompts)),
            "stream": hashlib.sha256(generator.get_state().numpy().tobytes()).hexdigest()[:16]}


def candidates(p: "Pipeline", sft_policy, prompts: Sequence[str], config: EvalConfig, n: int, generator: torch.Generator, desc: str | bool = False) -> PolicyResponses:
    """n candidates per prompt (prompt-major: prompt i's are rows i*n .. i*n+n-1) with their
    sampling log-probabilities. `sft_policy` must be the SFT stage's policy (the key names that stage)."""
    directory, _ = p.stage("candidates", key(p, prompts, config, n, generator), lambda tmp: build(tmp, sft_policy, p, prompts, config, n, generator, desc), version("candidates"))
    rows = read_jsonl(directory / "candidates.jsonl")
    return PolicyResponses([r["response_ids"] for r in rows], [r["text"] for r in rows], None, np.array([r["logprob"] for r in rows], dtype=np.float64))


def build(tmp: Path, sft_policy, p: "Pipeline", prompts: Sequence[str], config: EvalConfig, n: int, generator: torch.Generator, desc) -> dict:
    out = sample_policy(sft_policy, None, p.codec, prompts, config, generator, desc=desc, num_samples=n)
    with open(tmp / "candidates.jsonl", "w") as f:  # JSON keeps float64 exactly: the cached log-probs are the sampled ones
        f.writelines(json.dumps({"response_ids": ids, "text": t, "logprob": float(lp)}) + "\n" for ids, t, lp in zip(out.response_ids, out.texts, out.sampling_logprobs))
    return {"prompts": len(prompts), "n": n}
