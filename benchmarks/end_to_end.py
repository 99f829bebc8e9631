"""End to end: wall time of `alignbench quickstart` as a newcomer runs it (three seeds, each with
its own stages, their runs shared between worker processes), its peak memory (RSS of all its
processes together, sampled every 0.5 s), and the time of every stage build and every method run.

The quickstart runs as a subprocess, exactly `alignbench quickstart --out DIR [key=value ...]`,
into a fresh output directory (so every stage is built, not reused), figures included; with `--out`
an existing folder's cached stages and finished runs are reused, and left out of the table. Stage
times are the builds' own (`stage.json`'s `own_seconds`: the stages built inside one, as the AI
labeler inside the AI labels, left out), method times their runs' own (`budget/wall_s` less the
build seconds of the stages it counts, `budget_stages` in metrics.json: training, evaluation and
writing results). The workers run at once, so parts overlap and their sum exceeds the wall time.

The goal it checks: 3 seeds x 13 policies in at most 10 minutes on 2 CPU cores with peak RSS at
most 2.5 GB (10^9 bytes; reported with the peak PSS, which counts pages shared between processes once), the
evaluation at DESIGN.md's defaults (2,048 test prompts at temperature 1).
`--quick` is a smoke-test size (tiny model, small stages and evaluation) whose times mean nothing.

    python -m benchmarks.end_to_end [--quick] [--out DIR] [--workers N] [key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.common import add_common_arguments, machine_line, print_table, setup

GOAL_SECONDS = 600

# Smoke-test size: a tiny model and small stages, so that the benchmark itself can be checked fast.
QUICK_OVERRIDES = [
    "model.name=world-tiny", "sft.n_demonstrations=600", "sft.epochs=1", "sft.batch_size=32",
    "labels.n_prompts=60", "labels.responses_per_prompt=3", "reward_model.epochs=1", "reward_model.batch_size=8",
    "eval.n_test_prompts=64", "eval.n_val_prompts=32", "eval.bootstrap_samples=200", "eval.max_new_tokens=12",
    "hir.prompts_per_round=100", "rejection_sampling.prompts_per_round=50", "rejection_sampling.samples_per_prompt=2",
    "rest.prompts_per_round=50", "rest.samples_per_prompt=2", "ppo.iterations=3", "ppo.batch_size=16", "ppo.minibatch_size=8",
    "rlaif.n_labels=100", "ai_labeler.n_examples=400",
]


GOAL_MEMORY_GB = 2.5  # the unit: 10^9 bytes (2.33 GiB)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--out", default=None, help="output directory (default: a fresh temporary one; an existing one reuses its cached stages)")
    parser.add_argument("--workers", type=int, default=None, help="the quickstart's worker processes (default: its own choice, one per seed, at most one per core)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the quickstart experiment")
    args = parser.parse_args(argv)
    setup(args)
    overrides = (QUICK_OVERRIDES if args.quick else []) + ["trainer.progress_bar=false"] + list(args.overrides)
    if args.model != "world-small":
        overrides.append(f"model.name={args.model}")
    command = [sys.executable, "-m", "alignbench", "quickstart", *overrides] + (["--workers", str(args.workers)] if args.workers else [])
    with contextlib.ExitStack() as stack:
        out = Path(args.out) if args.out else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="alignbench-e2e-")))
        started = time.time()
        seconds, peak_gb, peak_pss_gb, processes = run_measured(command + ["--out", str(out)], out / "quickstart.log")
        stage_rows, method_rows, policies, seeds, reused = parts(out, since=started)
    print(f"## End to end: `alignbench quickstart` ({len(policies)} policies x {len(seeds)} seed(s)){' (--quick: smoke-test size)' if args.quick else ''}")
    print(machine_line())
    print()
    if stage_rows or method_rows:
        print_table(["part", "runs", "mean s", "sum s"], stage_rows + method_rows)
        print()
    if reused:
        print(f"Reused from {out}, not timed here (not in the table above): {reused['stages']} cached stage build(s), {reused['runs']} finished run(s).")
        print()
    # A quickstart that reused work measures less than the goal is about: no verdict then.
    verdict = lambda met: "n/a (reused)" if reused else "met" if met else "NOT met"
    print_table(["whole quickstart", "value", "goal", "verdict"], [
        ["wall seconds (figures included)", seconds, float(GOAL_SECONDS), verdict(seconds <= GOAL_SECONDS)],
        ["peak RSS GB (all processes)", peak_gb, GOAL_MEMORY_GB, verdict(peak_gb <= GOAL_MEMORY_GB)],
        ["peak PSS GB (all processes, shared pages once)", peak_pss_gb, GOAL_MEMORY_GB, verdict(peak_pss_gb <= GOAL_MEMORY_GB)],
    ])
    print()
    print_table(["process", "RSS MiB at the peak", "its own peak MiB (VmHWM)"], processes)


def run_measured(command: list[str], log_path: Path) -> tuple[float, float, float, list[list[object]]]:
    """Run `command`, its output to `log_path`; returns the wall seconds, the peak RSS and the peak PSS
    in GB (10^9 bytes) of its process tree, and per process (the parent, each worker, each W&B service, ...): its
    RSS at the RSS peak and its own highest RSS (the kernel's VmHWM), in MiB.

    The sum of RSS counts a page shared by several processes once for each: a process forked by a
    worker (a library starting a program: between fork and exec it is a copy of the worker)
    adds the worker's whole RSS for a moment. PSS (proportional set size) divides each shared page
    among the processes sharing it, so its sum is the memory the tree holds."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        # Without ALIGNBENCH_STAGE_CACHE: a shared stage cache would hand the quickstart stages built
        # before, and the benchmark times every stage built from scratch in OUT/cache.
        from alignbench.stage_cache import STAGE_CACHE_VARIABLE

        env = {k: v for k, v in os.environ.items() if k != STAGE_CACHE_VARIABLE}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        peak, peak_pss, at_peak, own_peaks, done = [0], [0], {}, {}, threading.Event()

        def sample() -> None:
            while not done.is_set():
                pids = _tree(process.pid)  # one walk of the tree per sample: RSS and PSS of the same processes
                rows = [(f"{_label(pid, process.pid)} (pid {pid})", *_memory_bytes(pid)) for pid in pids]
                for label, _, high in rows:
                    own_peaks[label] = max(own_peaks.get(label, 0), high)
                peak_pss[0] = max(peak_pss[0], sum(_pss_bytes(pid) for pid in pids))
                if sum(rss for _, rss, _ in rows) > peak[0]:
                    peak[0] = sum(rss for _, rss, _ in rows)
                    at_peak.clear()
                    at_peak.update((label, rss) for label, rss, _ in rows)
                done.wait(0.5)

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        code = process.wait()
        done.set()
        watcher.join()
    if code != 0:
        raise SystemExit(f"the quickstart failed (exit {code}); its log: {log_path}")
    processes = [[label, at_peak.get(label, 0) / 2**20, high / 2**20] for label, high in own_peaks.items() if high >= 2**20]
    return time.perf_counter() - started, peak[0] / 1e9, peak_pss[0] / 1e9, sorted(processes, key=lambda row: -row[2])


def _tree(pid: int) -> list[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid] + [p for child in children for p in _tree(int(child))]


def _memory_bytes(pid: int) -> tuple[int, int]:
    """(RSS now, highest RSS so far) of a process, 0 for one that has ended."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def _pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _label(pid: int, root: int) -> str:
    """What a process of the quickstart's tree is: the parent, a worker, or the program it runs."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except OSError:
        return "ended"
    if pid == root:
        return "quickstart (parent)"
    if "--worker" in argv:
        return "worker"
    return Path(argv[0]).name or "unknown"


def parts(out: Path, since: float) -> tuple[list[list[object]], list[list[object]], set[str], set[int], dict[str, int]]:
    """Per stage kind: builds and their own seconds (stage.json); per method: runs and their own
    seconds (budget/wall_s less the stages it counts). Only what was written after `since` (this
    measurement): with `--out` reusing a folder, its cached stages and finished runs, and those
    of earlier code versions beside them, are counted apart (`reused`: stages and runs, empty where
    none). Policies and seeds: of every run in the folder, reused or not."""
    stages: dict[str, list[float]] = defaultdict(list)
    methods: dict[str, list[float]] = defaultdict(list)
    policies: set[str] = set()
    seeds: set[int] = set()
    reused: dict[str, int] = defaultdict(int)
    for path in sorted((out / "cache").glob("*/stage.json")):
        if path.stat().st_mtime < since:
            reused["stages"] += 1
            continue
        summary = json.loads(path.read_text())
        stages[path.parent.name.rsplit("-", 1)[0]].append(float(summary.get("own_seconds", summary.get("seconds", 0.0))))
    for path in sorted((out / "quickstart").glob("*/metrics.json")):
        result = json.loads(path.read_text())
        policies.add(result["method"])
        seeds.add(int(result["seed"]))
        if path.stat().st_mtime < since:
            reused["runs"] += 1
            continue
        wall = float(result["metrics"].get("budget/wall_s", float("nan")))
        methods[result["method"]].append(wall - sum(result.get("budget_stages", {}).values()))
    row = lambda name, times: [name, len(times), statistics.fmean(times), sum(times)]
    return [row(f"stage: {k}", v) for k, v in stages.items()], [row(f"method: {k}", v) for k, v in methods.items()], policies, seeds, reused


if __name__ == "__main__":
    main()
