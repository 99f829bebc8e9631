"""The SFT policy itself: the baseline every method is compared against.

Evaluated exactly like a trained method (fresh samples, not the cached reference
samples), so its win rate against the reference is 1/2 up to sampling noise: the
check that the protocol is unbiased.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignbench.methods.base import AlignmentMethod


@dataclass
class SFTBaselineConfig:
    """The SFT baseline has nothing to configure."""


class SFTBaseline(AlignmentMethod):
    name = "sft"
    config_class = SFTBaselineConfig
    trains = False
