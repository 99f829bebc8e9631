"""The method registry: a plain dict from registry name to method class."""

from __future__ import annotations

from alignbench.config import ConfigError, did_you_mean
from alignbench.methods.base import AlignmentMethod
from alignbench.methods.best_of_n import BestOfN, BestOfNGold
from alignbench.methods.constitutional import Constitutional, HelpfulOnly
from alignbench.methods.cpl import CPL, CPLKL
from alignbench.methods.dpo import DPO
from alignbench.methods.hir import HIR
from alignbench.methods.grpo import GRPO
from alignbench.methods.ipo import IPO
from alignbench.methods.kto import KTO
from alignbench.methods.online_dpo import OnlineDPO
from alignbench.methods.orpo import ORPO
from alignbench.methods.ppo import PPO
from alignbench.methods.reinforce_pp import ReinforcePP
from alignbench.methods.rejection_sampling import RejectionSampling
from alignbench.methods.rest import ReST
from alignbench.methods.rloo import RLOO
from alignbench.methods.rlaif import RLAIF, RLAIFDirect, RLHFOneRM
from alignbench.methods.sft import SFTBaseline
from alignbench.methods.simpo import SimPO
from alignbench.methods.slic import SLiC

METHODS: dict[str, type[AlignmentMethod]] = {cls.name: cls for cls in (
    SFTBaseline, BestOfN, BestOfNGold, DPO, CPL, CPLKL, IPO, SLiC, SimPO, ORPO, KTO, HIR, RejectionSampling, ReST,
    PPO, GRPO, RLOO, ReinforcePP, OnlineDPO, RLAIF, RLHFOneRM, RLAIFDirect, HelpfulOnly, Constitutional,
)}


def get_method(name: str) -> type[AlignmentMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r};{did_you_mean(name, METHODS)} registered methods: {', '.join(METHODS)}"
        ) from None
