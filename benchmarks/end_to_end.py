"""End to end: wall time of `alignbench quickstart`, per shared stage and per method, and peak memory.

Runs exactly what `alignbench quickstart` runs (one `Pipeline`, then `run_one` for every method and
seed), in this process, into a fresh output directory (so every shared stage is built, not reused),
timing each shared stage as it is built and each method's run (training, evaluation on the test
prompts, writing results). Peak memory is this process's peak resident set size after each row.

The goal it checks: every method and both baselines in at most 10 minutes on 2 CPU cores, with the
evaluation at DESIGN.md's defaults (2,048 test prompts at temperature 1). Extra `key=value`
arguments override the experiment as on the command line; `--quick` is a smoke-test size (tiny
model, small stages and evaluation) whose times mean nothing.

    python -m benchmarks.end_to_end [--quick] [--out DIR] [--methods dpo,ppo] [key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    add_common_arguments,
    machine_line,
    peak_rss_mib,
    print_table,
    setup,
)

GOAL_SECONDS = 600

# Smoke-test size: a tiny model and small stages, so that the benchmark itself can be checked fast.
QUICK_OVERRIDES = [
    "model.name=world-tiny", "sft.n_demonstrations=600", "sft.epochs=1", "sft.batch_size=32",
    "labels.n_prompts=60", "labels.responses_per_prompt=3", "reward_model.epochs=1", "reward_model.batch_size=8",
    "eval.n_test_prompts=64", "eval.n_val_prompts=32", "eval.bootstrap_samples=200", "eval.max_new_tokens=12",
    "hir.prompts_per_round=100", "rejection_sampling.prompts_per_round=50", "rejection_sampling.samples_per_prompt=2",
    "rest.prompts_per_round=50", "rest.samples_per_prompt=2", "ppo.iterations=3", "ppo.batch_size=16", "ppo.minibatch_size=8",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--out", default=None, help="output directory (default: a fresh temporary one; an existing one reuses its cached stages)")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: the quickstart's)")
    parser.add_argument("--show-logs", action="store_true", help="show alignbench's own output")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the quickstart experiment")
    args = parser.parse_args(argv)
    setup(args)
    overrides = (QUICK_OVERRIDES if args.quick else []) + ["trainer.progress_bar=false"] + list(args.overrides)
    if args.model != "world-small":
        overrides.append(f"model.name={args.model}")

    from alignbench.experiment import load_experiment

    config = load_experiment("quickstart", overrides)
    methods = args.methods.split(",") if args.methods else list(config.methods)
    with contextlib.ExitStack() as stack:
        out = Path(args.out) if args.out else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="alignbench-e2e-")))
        rows, total = run(config, methods, out, quiet=not args.show_logs)
    print(f"## End to end: alignbench quickstart ({len(methods)} methods x {len(config.seeds)} seed(s)), "
          f"eval on {config.eval.n_test_prompts} test prompts at temperature {config.eval.temperature}"
          f"{' (--quick: smoke-test size)' if args.quick else ''}")
    print(machine_line())
    print()
    print_table(["part", "seconds", "share", "peak RSS MiB"], [[name, s, s / total, rss] for name, s, rss in rows] + [["total", total, 1.0, peak_rss_mib()]])
    verdict = "met" if total <= GOAL_SECONDS else "NOT met"
    print(f"\ngoal: whole quickstart <= {GOAL_SECONDS} s on 2 CPU cores -> {total:.0f} s, {verdict} (on this machine and load)")


def run(config, methods: list[str], out: Path, quiet: bool) -> tuple[list[tuple[str, float, float]], float]:
    """Time the shared stages, then every method; returns ([(part, seconds, peak RSS)], total seconds)."""
    from alignbench.pipeline import Pipeline
    from alignbench.runner import run_one

    rows: list[tuple[str, float, float]] = []
    started = time.perf_counter()

    def timed(name: str, work) -> None:
        begin = time.perf_counter()
        with contextlib.ExitStack() as hush:
            if quiet:  # alignbench's log lines and progress bars; errors still raise
                hush.enter_context(contextlib.redirect_stdout(io.StringIO()))
                hush.enter_context(contextlib.redirect_stderr(io.StringIO()))
            work()
        rows.append((name, time.perf_counter() - begin, peak_rss_mib()))

    pipeline = Pipeline(config, out)
    timed("stage: sft", pipeline.sft)
    timed("stage: labels", pipeline.labels)
    timed("stage: reward models", pipeline.reward_models)
    for seed in config.seeds:
        timed(f"stage: reference samples (seed {seed})", lambda seed=seed: pipeline.reference_samples(seed))
        for method in methods:
            timed(f"method: {method} (seed {seed})", lambda method=method, seed=seed: run_one(config, out, method=method, seed=seed, pipeline=pipeline))
    return rows, time.perf_counter() - started


if __name__ == "__main__":
    main()
