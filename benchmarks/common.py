"""What every benchmark shares: threads, the world's tiny model, interleaved timing, the table.

A speed claim is a ratio measured in one process: the baseline and alignbench run on the same
model and data, their repeats interleaved (baseline, alignbench, baseline, ...) so that a change
in the machine's load hits both, and the median of the repeats is reported.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a reduced size, to check that the benchmark runs (numbers not comparable)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats of each measurement (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--model", default="world-small", help="a named world model (world-tiny, world-mini, world-small, world-base)")


def setup(args: argparse.Namespace) -> None:
    """Offline, quiet, and the requested number of threads, before anything heavy is imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's and datasets' progress bars
    import logging
    import warnings

    warnings.filterwarnings("ignore")  # deprecation notes of the baselines' stacks, not results
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def machine_line() -> str:
    import torch
    import transformers

    return (
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}"
    )


@dataclass
class World:
    """The world, its tokenizer and codec, and a tiny model of the requested size."""

    world: object
    tokenizer: object
    codec: object
    model_name: str

    @classmethod
    def build(cls, model_name: str) -> World:
        from alignbench.models import TINY_MODELS, TextCodec, build_world_tokenizer
        from alignbench.world import AssistantWorld

        if model_name not in TINY_MODELS:
            raise SystemExit(f"--model {model_name!r}: expected one of {sorted(TINY_MODELS)}")
        world = AssistantWorld()
        tokenizer = build_world_tokenizer(world.vocabulary())
        return cls(world, tokenizer, TextCodec(tokenizer), model_name)

    def policy(self, seed: int = 0):
        """A freshly initialised policy (speed does not depend on the weights' values)."""
        from alignbench.models import build_tiny_policy

        return build_tiny_policy(self.model_name, self.tokenizer, seed=seed)


def interleaved(candidates: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, list[tuple[float, float]]]:
    """Run each candidate `warmup` times, then `repeats` rounds of all of them in turn.

    Each candidate returns the amount of work it did (tokens, steps); returns, per candidate,
    the (work, wall seconds) of every timed repeat.
    """
    for _ in range(warmup):
        for run in candidates.values():
            run()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            started = time.perf_counter()
            work = run()
            results[name].append((work, time.perf_counter() - started))
    return results


def median_rate(samples: list[tuple[float, float]]) -> float:
    """Median over repeats of work per second."""
    return statistics.median(work / seconds for work, seconds in samples)


def median_seconds(samples: list[tuple[float, float]]) -> float:
    return statistics.median(seconds for _, seconds in samples)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(columns: list[str], rows: list[list[object]]) -> None:
    """A Markdown table; floats get 3 significant digits."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in text)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in text:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")
