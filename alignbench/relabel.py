"""Relabelers for hindsight instruction relabeling (HIR, Zhang et al. 2023).

A relabeler turns (instruction, output) into the instruction that the output does
satisfy — or drops the pair. Two kinds:
- `WorldRelabeler`: the world's relabel function ("list 3 fruits" answered with two
  fruits -> "list 2 fruits").
- `ScoreConditionedRelabeler`: for data with no relabel function, prefix the instruction
  with a feedback phrase chosen by a reward threshold (HIR's correct / incorrect
  templates on BigBench); at evaluation the policy is asked with the positive phrase.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence


class Relabeler(Protocol):
    def relabel(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str | None]:
        """The relabeled instruction per pair, or None to drop the pair."""

    def evaluation_prompt(self, prompt: str) -> str:
        """What the policy is asked at evaluation for an original instruction."""


class WorldRelabeler:
    def __init__(self, world):
        self.world = world

    def relabel(self, prompts, responses) -> list[str | None]:
        return [self.world.relabel(p, y) for p, y in zip(prompts, responses)]

    def evaluation_prompt(self, prompt: str) -> str:
        return prompt


class ScoreConditionedRelabeler:
    """`positive + prompt` where the reward is at least `threshold`, else `negative + prompt`."""

    def __init__(self, score: Callable[[Sequence[str], Sequence[str]], Sequence[float]], threshold: float, positive: str = "good :", negative: str = "bad :"):
        self.score, self.threshold, self.positive, self.negative = score, threshold, positive, negative

    def relabel(self, prompts, responses) -> list[str | None]:
        return [
            f"{self.positive if r >= self.threshold else self.negative} {p}"
            for p, r in zip(prompts, self.score(prompts, responses))
        ]

    def evaluation_prompt(self, prompt: str) -> str:
        return f"{self.positive} {prompt}"
