"""Named random streams: every sampling step draws from a generator seeded by what it is for."""

from __future__ import annotations

import contextlib
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
