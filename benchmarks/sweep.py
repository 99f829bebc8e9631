"""Sweeps: `alignbench sweep`'s worker processes against a process per run.

`alignbench sweep --workers W` runs its runs in W worker processes (`alignbench.sweep_worker`)
that take them one after another, so the imports and start-up (~4.5–9 s on 2 cores) are paid once
per worker. The baseline is a process per run, W at a time (what the sweep did before 59cbf5f, and
what a shell loop over `alignbench run` does), each with the environment the sweep gives a worker
(one torch thread each where W processes x threads would exceed the cores). The sweep's time
includes its own parent process (its imports, the check that the shared stages are built), which
the baseline has no counterpart of; so each runs the sweep at one seed and at two (N and 2N
runs), and the difference over N is what a run costs it (in worker-seconds: x W), its fixed
costs left out. Both run the same runs from the same stage cache, built beforehand and not
timed, into fresh folders, interleaved; every run's metrics are checked equal between the two
(wall-clock times aside).

The default runs are short (the tests' tiny world), where start-up is most of a run; at the
quickstart's size (`--full`: world-small, 30–90 s a run) the saving per run is the same seconds,
and a smaller share.

    python -m benchmarks.sweep [--quick] [--repeats 3] [--workers 2] [--methods sft,dpo,...] [--full] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine_line, print_table, setup

# The tests' tiny world (tests/conftest.py), so that start-up is what the runs mostly are.
TINY = ["model.name=world-tiny", "sft.n_demonstrations=600", "sft.epochs=1", "sft.batch_size=32",
        "labels.n_prompts=60", "labels.responses_per_prompt=3", "reward_model.epochs=1", "reward_model.batch_size=8",
        "eval.n_test_prompts=64", "eval.n_val_prompts=32", "eval.bootstrap_samples=200", "eval.max_new_tokens=12",
        "dpo.kl_prompts=16", "ipo.kl_prompts=16", "slic.kl_prompts=16", "cpl.kl_prompts=16", "kto.kl_prompts=16", "simpo.kl_prompts=16"]
TIMING_KEYS = ("budget/wall_s", "budget/stage_s")


def alignbench(*args: str, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    handle = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "alignbench", *args], stdout=handle, stderr=subprocess.STDOUT, env=env or dict(os.environ))


def wait_all(processes: list[subprocess.Popen], what: str) -> None:
    for process in processes:
        if process.wait() != 0:
            raise SystemExit(f"{what} failed (exit {process.returncode}): {process.args}")


def sweep_with_workers(sweep_file: Path, methods: list[str], seeds: list[int], out: Path, workers: int, overrides: list[str]) -> float:
    started = time.perf_counter()
    wait_all([alignbench("sweep", str(sweep_file), f"seeds={json.dumps(seeds)}", "--workers", str(workers), "--out", str(out), *overrides,
                         log=out.with_suffix(".log"))], "the sweep")
    return time.perf_counter() - started


def process_per_run(sweep_file: Path, methods: list[str], seeds: list[int], out: Path, workers: int, overrides: list[str]) -> float:
    from alignbench.sweep import _run_environment

    started = time.perf_counter()
    pending, running = [(method, seed) for method in methods for seed in seeds], {}
    while pending or running:
        free = [slot for slot in range(workers) if slot not in running]
        while pending and free:
            slot, (method, seed) = free.pop(0), pending.pop(0)
            running[slot] = alignbench("run", str(sweep_file), f"method={method}", f"seed={seed}", *overrides, "--out", str(out), env=_run_environment(workers, slot))
        time.sleep(0.05)
        for slot, process in list(running.items()):
            if process.poll() is not None:
                wait_all([running.pop(slot)], "a run")
    return time.perf_counter() - started


def metrics_of(out: Path) -> dict[str, dict]:
    return {path.parent.name: {k: v for k, v in json.loads(path.read_text())["metrics"].items() if k not in TIMING_KEYS}
            for path in sorted(out.glob("bench_sweep/*/metrics.json"))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two runs, one repeat, to check that the benchmark runs")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each (median reported)")
    parser.add_argument("--workers", type=int, default=2, help="runs at once (the sweep's --workers)")
    parser.add_argument("--methods", default="sft,dpo,ipo,slic,cpl,kto", help="comma-separated methods, one run each at seed 0")
    parser.add_argument("--full", action="store_true", help="the quickstart's settings (world-small) instead of the tiny world")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args(argv)
    args.threads = None
    setup(args)
    methods = args.methods.split(",")[:2] if args.quick else args.methods.split(",")
    repeats = 1 if args.quick else args.repeats
    overrides = ([] if args.full else TINY) + list(args.overrides)
    with tempfile.TemporaryDirectory(prefix="alignbench-sweep-bench-") as tmp:
        root = Path(tmp)
        os.environ["ALIGNBENCH_STAGE_CACHE"] = str(root / "cache")  # one cache for every folder below
        os.environ.setdefault("WANDB_MODE", "disabled")
        sweep_file = root / "bench_sweep.yaml"
        sweep_file.write_text(json.dumps({"name": "bench_sweep", "methods": methods, "seeds": [0], "tracking": {"wandb": "disabled"}}))
        print(f"building the shared stages of seeds 0 and 1 once ({'quickstart settings' if args.full else 'tiny world'}) ...", flush=True)
        wait_all([alignbench("run", str(sweep_file), f"method={methods[0]}", f"seed={seed}", *overrides, "--out", str(root / f"warm{seed}"), log=root / f"warm{seed}.log")
                  for seed in (0, 1)], "building the stages")
        runners = {f"a process per run ({args.workers} at a time)": process_per_run, f"alignbench sweep --workers {args.workers}": sweep_with_workers}
        sizes = {len(methods): [0], 2 * len(methods): [0, 1]}
        seconds: dict[tuple[str, int], list[float]] = {(name, runs): [] for name in runners for runs in sizes}
        reference: dict[int, dict] = {}
        for repeat in range(repeats):
            for runs, seeds in sizes.items():
                for index, (name, runner) in enumerate(runners.items()):
                    out = root / f"out-{repeat}-{runs}-{index}"
                    seconds[name, runs].append(runner(sweep_file, methods, seeds, out, args.workers, overrides))
                    found = metrics_of(out)
                    if len(found) != runs:
                        raise SystemExit(f"{name}: {len(found)} of {runs} runs finished in {out}")
                    if reference.setdefault(runs, found) != found:
                        raise SystemExit(f"{name}: metrics differ from the first measurement's in {sorted(k for k in found if found[k] != reference[runs].get(k))}")
                    print(f"repeat {repeat + 1}, {runs} runs: {name}: {seconds[name, runs][-1]:.1f} s", flush=True)
    n = len(methods)
    per_run = {name: (statistics.median(seconds[name, 2 * n]) - statistics.median(seconds[name, n])) / n * args.workers for name in runners}
    baseline = next(iter(per_run.values()))
    print()
    print(f"## Sweeps of {n} and {2 * n} runs ({', '.join(methods)} at seed 0, then seeds 0 and 1; {'quickstart settings' if args.full else 'tiny world'}), "
          f"{args.workers} at a time, medians of {repeats}; every run's metrics equal between the two")
    print(machine_line())
    print()
    rows = [[name, statistics.median(seconds[name, n]), statistics.median(seconds[name, 2 * n]),
             f"{min(seconds[name, 2 * n]):.1f}–{max(seconds[name, 2 * n]):.1f}", per_run[name], f"{baseline / per_run[name]:.2f}x"]
            for name in runners]
    print_table(["runner", f"wall s, {n} runs", f"wall s, {2 * n} runs", f"range, {2 * n} runs", "worker-s a run", "x a process per run"], rows)


if __name__ == "__main__":
    main()
