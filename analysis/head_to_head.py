"""Head to head: every policy against every other on the same test prompts, and a ranking.

Each run's `samples.jsonl` holds its responses to the experiment's test prompts, each with the
world's gold reward the evaluation gave it (`gold_reward`). Two policies are compared prompt by
prompt by those gold rewards (ties count 1/2), only where both answered the same prompts under the
same world (the runs' resolved `config["world"]`) at the same seed; a file without them (written
before they were recorded) is scored again by the world's gold judge, rebuilt from that config.
The comparisons give a win-rate matrix and a Bradley–Terry ranking whose intervals come from the
two-level bootstrap (seeds, then prompts within each seed; one seed: prompts only), and per-cell
intervals of the matrix from the same draws.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
from alignbench.analysis.runs import Group, Run
from alignbench.analysis.stats import Ranking, bradley_terry_ranking
from alignbench.analysis.style import Skipped


@dataclass
class HeadToHead:
    """outcomes[u, i, j]: wins of policy i over j on comparison unit (prompt) u, summed over the
    seeds at which both ran, ties 1/2; counts[u, i, j]: how many comparisons that is;
    seed_outcomes / seed_counts [S, U, M, M]: the same per seed (`seeds`, sorted)."""

    names: list[str]
    outcomes: np.ndarray
    counts: np.ndarray
    seed_outcomes: np.ndarray | None = None
    seed_counts: np.ndarray | None = None
    seeds: tuple[int, ...] = (0,)

    def _per_seed(self) -> tuple[np.ndarray, np.ndarray]:
        outcomes = self.seed_outcomes if self.seed_outcomes is not None else self.outcomes[None]
        counts = self.seed_counts if self.seed_counts is not None else self.counts[None]
        return outcomes, counts

    def seeds_met(self) -> np.ndarray:
        """[M, M]: at how many seeds each pair was compared."""
        return (self._per_seed()[1].sum(axis=1) > 0).sum(axis=0)

    def win_rate_intervals(self, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """[M, M] low and high of each cell's win rate under the two-level bootstrap (NaN where never
        met), over the seeds at which that pair met: a seed where one of the two did not run would
        otherwise enter the draws as nothing, and count towards the t-quantile's degrees of freedom."""
        from alignbench.analysis.stats import replicate_interval, two_level_weights

        outcomes, counts = self._per_seed()
        u, m = outcomes.shape[1], outcomes.shape[2]
        met_at = counts.sum(axis=1) > 0  # [S, M, M]
        rates = self.win_rates()
        cells_by_seeds: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        for i, j in zip(*np.nonzero(np.isfinite(rates))):
            cells_by_seeds.setdefault(tuple(np.flatnonzero(met_at[:, i, j])), []).append((i, j))
        low, high = np.full((m, m), np.nan), np.full((m, m), np.nan)
        for seeds, cells in cells_by_seeds.items():
            s = len(seeds)
            weights = two_level_weights(s, u, n_boot, seed).reshape(n_boot, s * u)
            wins = (weights @ outcomes[list(seeds)].reshape(s * u, m * m)).reshape(n_boot, m, m)
            met = (weights @ counts[list(seeds)].reshape(s * u, m * m)).reshape(n_boot, m, m)
            with np.errstate(invalid="ignore", divide="ignore"):
                replicates = np.where(met > 0, wins / met, np.nan)
            for i, j in cells:
                interval = replicate_interval(float(rates[i, j]), replicates[:, i, j], s, level)
                low[i, j], high[i, j] = interval.low, interval.high
        return low, high

    def win_rates(self) -> np.ndarray:
        """[M, M]: P(row beats column); NaN where the two never met (and on the diagonal)."""
        wins, counts = self.outcomes.sum(axis=0), self.counts.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, wins / np.maximum(counts, 1), np.nan)

    def ranking_seeds(self) -> list[int]:
        """Indices of the seeds at which every policy was compared: the Bradley–Terry ranking's.
        A bootstrap replicate that drew none of a policy's seeds would leave its strength to the
        ridge alone (about 0), and that value would widen and shift its interval."""
        counts = self._per_seed()[1]
        return [s for s in range(counts.shape[0]) if (counts[s].sum(axis=(0, 2)) > 0).all()]

    def connected(self) -> bool:
        """Whether every policy is linked to every other by comparisons at the ranking's seeds
        (Bradley–Terry needs it); False where no seed has them all."""
        seeds = self.ranking_seeds()
        if not seeds:
            return False
        linked = self._per_seed()[1][seeds].sum(axis=(0, 1)) > 0
        reached, frontier = {0}, [0]
        while frontier:
            i = frontier.pop()
            for j in np.flatnonzero(linked[i]):
                if j not in reached:
                    reached.add(int(j))
                    frontier.append(int(j))
        return len(reached) == len(self.names)

    def ranking(self, anchor: str | None, n_boot: int = 1000, seed: int = 0) -> Ranking:
        """Bradley–Terry strengths from the comparisons at `ranking_seeds` (see `connected`)."""
        return bradley_terry_ranking(self.names, self._per_seed()[0][self.ranking_seeds()], anchor=anchor, n_boot=n_boot, seed=seed)


def _world_judge(world_config: dict):
    from alignbench.config import from_dict
    from alignbench.judges import GoldJudge
    from alignbench.world import AssistantWorld, WorldConfig

    return GoldJudge(AssistantWorld(from_dict(WorldConfig, world_config, "world")))


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def compare_policies(groups: list[Group]) -> HeadToHead:
    """All pairwise gold-judge comparisons between the groups' runs (see the module docstring)."""
    from alignbench.world import preference_from_scores

    if not any(run.samples_path for group in groups for run in group.runs):
        raise Skipped("needs the runs' samples.jsonl (their test responses), which only a local experiment directory has (W&B holds metrics, not samples)")
    judges: dict[str, object] = {}
    scored: list[tuple[int, Run, str, np.ndarray]] = []  # (group index, run, unit set, gold scores)
    unit_sets: dict[str, int] = {}  # (world, prompts) digest -> offset of its units
    total_units = 0
    for index, group in enumerate(groups):
        for run in group.runs:
            if run.samples_path is None:
                continue
            rows = [json.loads(line) for line in run.samples_path.read_text().splitlines() if line.strip()]
            prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
            world_key = _digest(run.config.get("world", {}))
            if all("gold_reward" in r for r in rows):  # what the world's gold judge gives them (evaluation.py)
                scores = np.array([r["gold_reward"] for r in rows], dtype=float)
            else:
                if world_key not in judges:
                    judges[world_key] = _world_judge(run.config.get("world", {}))
                try:
                    scores = judges[world_key].score_batch(prompts, responses)
                except (ValueError, KeyError) as err:
                    raise Skipped(f"the world's gold judge cannot score the prompts of {run.name} ({err}); head-to-head comparisons need runs on the built-in world") from None
            unit_key = f"{world_key}-{_digest(prompts)}"
            if unit_key not in unit_sets:
                unit_sets[unit_key] = total_units
                total_units += len(prompts)
            scored.append((index, run, unit_key, scores))
    m = len(groups)
    seeds = sorted({run.seed for _, run, _, _ in scored})
    outcomes, counts = np.zeros((len(seeds), total_units, m, m)), np.zeros((len(seeds), total_units, m, m))
    for a, (ga, run_a, units_a, scores_a) in enumerate(scored):
        for gb, run_b, units_b, scores_b in scored[a + 1 :]:
            if ga == gb or run_a.seed != run_b.seed or units_a != units_b:
                continue
            start, s = unit_sets[units_a], seeds.index(run_a.seed)
            rows = slice(start, start + len(scores_a))
            wins = preference_from_scores(scores_a, scores_b)
            outcomes[s, rows, ga, gb] += wins
            outcomes[s, rows, gb, ga] += 1 - wins
            counts[s, rows, ga, gb] += 1
            counts[s, rows, gb, ga] += 1
    present = [i for i in range(m) if counts[:, :, i, :].sum() > 0]
    if len(present) < 2:
        raise Skipped("needs samples.jsonl of at least two policies on the same test prompts and seed")
    outcomes, counts = outcomes[:, :, present][:, :, :, present], counts[:, :, present][:, :, :, present]
    return HeadToHead([groups[i].label for i in present], outcomes.sum(axis=0), counts.sum(axis=0), outcomes, counts, tuple(seeds))
