"""Named random streams: every sampling step draws from a generator seeded by what it is for."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from alignbench.config import config_hash


def seeded_generator(*parts: Any) -> torch.Generator:
    """A torch generator whose seed is a stable function of `parts` (e.g. (seed, 'reference', 'test'))."""
    return torch.Generator().manual_seed(int(config_hash(list(parts), length=12), 16) % (2**63))


@contextlib.contextmanager
def preserved_global_random_state() -> Iterator[None]:
    """Leave torch's (CPU and CUDA), numpy's and Python's global random state as they were.

    A shared stage may be built inside a run (the first run that needs it) or read from the
    cache (every later one); building it must not move the run's random stream, or the run
    would differ between the two cases."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


# --- the run seed and the stages' seeds ---------------------------------------------------------
# A run seed is a full replicate: each of these stage seeds left at None takes the run's seed, so
# seed 1 trains its own SFT policy, samples and labels its own responses, trains its own reward
# models, AI labeler and helpful-only policy. Pinning one (`sft.seed: 0`) shares that stage between
# the run seeds, so their spread measures what remains (e.g. the method's variance alone). The
# world (the task, `world.seed`) and the evaluation prompts (`eval.seed`) are fixed by design: every
# seed is evaluated on the same prompts, which keeps comparisons paired. (SL-CAI's and RL-CAI's own
# sampling always follows the run seed.)
STAGE_SEEDS = ("model.init_seed", "sft.seed", "labels.seed", "ai_labeler.seed", "helpful_only.seed", "constitutional.helpful_only.seed")


def get_dotted(config: Any, dotted: str) -> Any:
    """`config.a.b` for 'a.b' (None where a section is missing)."""
    for part in dotted.split("."):
        config = getattr(config, part, None)
    return config


def _replace(config: Any, dotted: str, value: Any) -> Any:
    head, _, rest = dotted.partition(".")
    return dataclasses.replace(config, **{head: _replace(getattr(config, head), rest, value) if rest else value})


def stage_seeds_following(config: Any) -> list[str]:
    """The stage seeds of `config` that are left to the run seed (None)."""
    return [key for key in STAGE_SEEDS if hasattr(config, key.split(".")[0]) and get_dotted(config, key) is None]


def with_run_seed(config: Any, seed: int) -> Any:
    """`config` at run seed `seed`, every stage seed left at None set to it."""
    config = dataclasses.replace(config, seed=seed)
    for key in stage_seeds_following(config):
        config = _replace(config, key, seed)
    return config
