"""Named random streams: every sampling step draws from a generator seeded by what it is for."""

from __future__ import annotations

from typing import Any

import torch

from alignbench.config import config_hash


def seeded_generator(*parts: Any) -> torch.Generator:
    """A torch generator whose seed is a stable function of `parts` (e.g. (seed, 'reference', 'test'))."""
    return torch.Generator().manual_seed(int(config_hash(list(parts), length=12), 16) % (2**63))
