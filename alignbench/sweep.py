"""`alignbench sweep SWEEP [key=value ...] [--workers N]`: methods x seeds x a grid of overrides.

A sweep file is an experiment file (any experiment runs as a sweep of its methods and
seeds) plus an optional `sweep:` section:

    base: quickstart           # start from a shipped experiment's settings (and stage caches)
    methods: [sft, dpo, ppo]
    seeds: [0, 1, 2]
    sweep:
      grid:                    # cartesian product over dotted-key overrides
        dpo.beta: [0.05, 0.1, 0.5]
      zip:                     # paired values, varied together: one run per index
        ppo.init_kl_coef: [0.05, 0.2]
        ppo.iterations: [40, 20]
      max_retries: 1

Runs = methods x seeds x grid x zip. Each run is exactly
`alignbench run SWEEP [key=value ...] method=M seed=S <its grid and zip values>` (a plain
`run` ignores the sweep section), run by one of `--workers` worker processes, which take the
runs one after another and pay the imports once rather than once a run. A run that fails ends
its worker, and its retry (or whatever runs next in that slot) starts in a fresh process, so a
crash, a NaN or a kill stays inside that run; a distributed run (`trainer.distributed`) starts
its own process. A run's name hashes its resolved config, in which only its own method's
section counts: the `sft` baseline under three `dpo.beta` values is one run.

Before any run starts, the shared stages (SFT, labels, reward models, reference samples)
are built once, in a child of this process that also loads the configs (so that this process,
which then only waits for its workers, holds no torch); the runs load them from the cache. A run whose
metrics.json exists is skipped, an interrupted one resumes from its checkpoint, and a
failed one is retried `max_retries` times and then reported: the sweep exits non-zero and
lists it (never dropping it silently), with its log at `OUT/<sweep>/<run>/run.log` (what a worker
writes between runs goes to `OUT/<sweep>/logs/worker<K>.log`). Every run
is in the W&B group named after the sweep. At the end the sweep prints the table of its
runs, averaged over seeds per method and swept setting, and writes `OUT/<sweep>/sweep.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import select
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignbench.config import ConfigError, apply_overrides, at_least_one, from_dict, parse_overrides
from alignbench.log import log, quiet_libraries, warn
from alignbench.processes import PARENT_PID_VARIABLE, in_forked_child
from alignbench.records import UnreadableResult, read_result, write_json_atomic

# Set by the sweep's own expansion, not by the grid.
_RESERVED_KEYS = ("method", "methods", "seed", "seeds", "name")


@dataclass
class SweepConfig:
    """The `sweep:` section of a sweep file."""

    grid: dict[str, Any] = field(default_factory=dict)
    """Dotted key -> list of values; runs cover every combination (`dpo.beta: [0.05, 0.1]`)."""
    zip: dict[str, Any] = field(default_factory=dict)
    """Dotted key -> list of values, all lists of one length, varied together (one run per index)."""
    max_retries: int = 1
    """A failed run is started again this many times before it is reported as failed."""

    def __post_init__(self):
        if self.max_retries < 0:
            raise ValueError(f"sweep.max_retries={self.max_retries} must be >= 0")


def flatten_keys(tree: dict, where: str, is_leaf) -> dict[str, Any]:
    """{"dpo": {"beta": X}} and {"dpo.beta": X} alike -> {"dpo.beta": X}, descending until
    `is_leaf(value)`; `where` names the section in errors."""
    flat: dict[str, Any] = {}
    for key, value in (tree or {}).items():
        if is_leaf(value):
            found = {str(key): value}
        elif isinstance(value, dict):
            found = {f"{key}.{sub}": v for sub, v in flatten_keys(value, f"{where}.{key}", is_leaf).items()}
        else:
            raise ConfigError(f"{where}.{key} must be a list of values, got {value!r}")
        for twice in found.keys() & flat.keys():  # one given dotted and nested: one would be lost
            raise ConfigError(f"{where}: {twice} is given twice (as a dotted key and inside its section); give it once")
        flat.update(found)
    return flat


@dataclass
class SweepRun:
    """One run of a sweep: its method, seed and swept values, and what `alignbench run` makes of them."""

    method: str
    seed: int
    values: dict[str, Any]
    """The grid and zip values of this run."""
    argv: list[str]
    """The overrides that make it: method=, seed= and the values (after the user's overrides)."""
    config: Any
    """Its resolved config; None in a `SweepPlan` (the sweep's parent never loads one)."""
    name: str
    """The run's folder name: method, seed and the hash of its resolved config."""
    label: str
    """The method and the swept values that matter to it (what the summary table groups by)."""


@dataclass(frozen=True)
class SweepPlan:
    """What the sweep's parent process keeps of a sweep: plain values, made in a forked child
    (`_plan`) that loads the configs and builds the shared stages, so that the parent, which only
    hands runs to its workers and waits for them, never loads torch, transformers and Lightning
    (~400 MB, held for the whole sweep beside the workers' own)."""

    name: str
    folder: Path
    """OUT/<sweep>: the runs' folders, sweep.json and the workers' logs."""
    experiment_path: str
    """The sweep file, resolved: what every run's `alignbench run` reads."""
    max_retries: int
    runs: list[SweepRun]
    """Every run, each without its config."""
    todo: list[SweepRun]
    """The runs not finished yet, in the sweep's order (without their configs)."""
    distributed: frozenset[str]
    """The names of the runs that train distributed (`trainer.distributed`): a process each."""
    gpus: int
    """The machine's GPU count (asking torch would load it)."""


def override_text(key: str, value: Any) -> str:
    """`key=value` that parses back to exactly `value` (JSON is YAML)."""
    text = f"{key}={json.dumps(value)}"
    if parse_overrides([text])[key] != value:
        raise ConfigError(f"the sweep value {value!r} of '{key}' cannot be passed on a command line; use a number, string, boolean, list or mapping")
    return text


def load_sweep(name_or_path: str, overrides: list[str] = ()) -> tuple[dict, SweepConfig]:
    """The experiment mapping (base merged, overrides applied, sweep/tune sections removed) and its sweep section."""
    from alignbench.experiment import load_experiment_data

    data = apply_overrides(load_experiment_data(name_or_path), parse_overrides(overrides))
    spec = from_dict(SweepConfig, data.pop("sweep", None), "sweep")
    data.pop("tune", None)
    return data, spec


def expand(name_or_path: str, overrides: list[str] = ()) -> tuple[list[SweepRun], SweepConfig]:
    """Every run of the sweep, each once (runs whose resolved configs coincide are one run)."""
    from alignbench.experiment import (
        experiment_from_data,
        for_run,
        load_experiment,
        run_config_dict,
        run_name,
    )

    data, spec = load_sweep(name_or_path, overrides)
    is_list = lambda v: isinstance(v, list)
    grid, zipped = flatten_keys(spec.grid, "sweep.grid", is_list), flatten_keys(spec.zip, "sweep.zip", is_list)
    for section, values in (("grid", grid), ("zip", zipped)):
        for key, options in values.items():
            if key.split(".")[0] in _RESERVED_KEYS:
                raise ConfigError(f"sweep.{section}.{key}: methods and seeds are swept with the top-level 'methods' and 'seeds' lists")
            if not options:
                raise ConfigError(f"sweep.{section}.{key} is an empty list; give at least one value")
            texts = [json.dumps(v, sort_keys=True) for v in options]
            if section == "grid" and len(set(texts)) < len(texts):  # one run where two were meant
                raise ConfigError(f"sweep.grid.{key}={options} lists {next(t for t in texts if texts.count(t) > 1)} more than once; each value must be distinct")
    lengths = {key: len(v) for key, v in zipped.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"sweep.zip lists must all have one length, got {', '.join(f'{k}: {n}' for k, n in lengths.items())}")
    if set(grid) & set(zipped):
        raise ConfigError(f"sweep keys in both grid and zip: {', '.join(sorted(set(grid) & set(zipped)))}")
    combinations = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    pairs = [{key: v[i] for key, v in zipped.items()} for i in range(next(iter(lengths.values()), 1))]
    variants = [{**g, **z} for g in combinations for z in pairs]
    base = experiment_from_data(dict(data))
    runs, seen, read = [], set(), set()
    for seed in base.seeds:
        for method in base.methods:
            for values in variants:
                argv = [f"method={method}", f"seed={seed}"] + [override_text(k, v) for k, v in values.items()]
                try:  # exactly what `alignbench run` will make of it
                    config = for_run(load_experiment(name_or_path, list(overrides) + argv))
                except ConfigError as err:
                    raise ConfigError(f"sweep values {values}: {err}") from None
                sections = run_config_dict(config)
                relevant = {k: v for k, v in values.items() if k.split(".")[0] in sections}
                read.update(relevant)
                name = run_name(config)
                if name in seen:
                    continue
                seen.add(name)
                label = " ".join([method] + [f"{k.removeprefix(method + '.')}={json.dumps(v)}" for k, v in relevant.items()])
                runs.append(SweepRun(method, seed, values, argv, config, name, label))
    unread = [f"sweep.{'grid' if key in grid else 'zip'}.{key}" for key in [*grid, *zipped] if key not in read]
    if unread:  # its values would make no run differ: the runs meant with them would never happen
        raise ConfigError(f"{', '.join(unread)}: no run of this sweep reads {'these keys' if len(unread) > 1 else 'this key'} "
                          f"(methods: {', '.join(base.methods)}); add the method whose section it is to 'methods', or remove it")
    return runs, spec


def build_shared_stages(runs: list[SweepRun], out: Path) -> None:
    """Build each distinct set of shared stages once, here, before the runs fan out."""
    from alignbench.config import config_hash, to_dict
    from alignbench.experiment import ExperimentBase
    from alignbench.runner import stage_pipeline

    shared = [f.name for f in dataclasses.fields(ExperimentBase) if f.name not in ("methods", "seeds", "method", "seed", "name", "tracking")]
    done = set()
    for run in runs:  # run.config is resolved: its stage seeds are the run seed's (or pinned)
        key = (config_hash({name: to_dict(getattr(run.config, name)) for name in shared}), run.seed)
        if key not in done:
            done.add(key)
            stage_pipeline(run.config, out).context()


def _run_environment(workers: int, slot: int, distributed: bool = False, gpus: int | None = None) -> dict[str, str]:
    """The environment of a worker process in `slot` of `workers`; `gpus` is the machine's GPU count
    (None: ask torch)."""
    env = dict(os.environ)
    # Each worker starts its own W&B service: one shared with this process would outlive a killed worker.
    env.pop("WANDB_SERVICE", None)
    # The worker and its run die with the sweep, even when the sweep is SIGKILLed, rather than
    # running on unwatched (running the sweep again resumes the run from its checkpoint).
    env[PARENT_PID_VARIABLE] = str(os.getpid())
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores instead of each run taking them all
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    gpus = _gpu_count() if gpus is None else gpus
    if gpus > 1 and workers > 1 and not distributed and "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)  # one GPU per worker (a multi-GPU run sees them all)
    return env


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "    (no log)"


class _SweepWorker:
    """One of a sweep's worker processes (`alignbench.sweep_worker`): it is given one run at a
    time, as the `alignbench run` command line, and replies with the run's exit status when the
    run ends. It pays the imports (~4.5–9 s on 2 cores) once; a process per run paid them every
    run (`benchmarks/sweep.py`). Each run still loads the shared stages it needs from the cache."""

    def __init__(self, env: dict[str, str], log_path: Path):
        with open(log_path, "a") as handle:
            self.process = subprocess.Popen([sys.executable, "-m", "alignbench.sweep_worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=handle, env=env, text=True)

    def start(self, name: str, command: list[str], log_path: Path) -> None:
        try:
            self.process.stdin.write(json.dumps({"name": name, "command": command, "log": str(log_path)}) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:  # it died waiting (killed from outside): `poll` says so
            pass

    def poll(self) -> int | None:
        """As a run's own process's `Popen.poll`: the exit status of the run it was given, once the
        run has ended; None before. A worker that died in the run (killed, out of memory, a crash
        below Python) gives its own: negative where a signal killed it. After a non-zero status the
        worker is gone (see `sweep_worker`)."""
        if not select.select([self.process.stdout], [], [], 0)[0]:
            return None
        reply = self.process.stdout.readline()
        if reply:
            status = json.loads(reply)["exit"]
            if status != 0:
                self.process.wait()
            return status
        return self.process.wait() or 1  # it ended without replying

    def stop(self) -> None:
        """Let it end: it exits once its input closes."""
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass

    def kill(self) -> None:
        self.process.kill()


def _plan(experiment: str, overrides: list[str], out: Path, workers: int) -> SweepPlan:
    """The sweep's runs, which of them are finished, and their shared stages built (see `SweepPlan`)."""
    from alignbench.experiment import find_experiment, output_folder
    from alignbench.runner import finished_result

    quiet_libraries()
    runs, spec = expand(experiment, overrides)
    name = runs[0].config.name
    folder = output_folder(out, name)
    todo = [r for r in runs if finished_result(folder / r.name, r.config) is None]
    log(f"sweep {name}: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run in {workers} worker process(es)")
    if todo:
        build_shared_stages(todo, out)
    return SweepPlan(name=name, folder=folder, experiment_path=str(find_experiment(experiment).resolve()), max_retries=spec.max_retries,
                     runs=[dataclasses.replace(r, config=None) for r in runs], todo=[dataclasses.replace(r, config=None) for r in todo],
                     distributed=frozenset(r.name for r in runs if r.config.trainer.distributed), gpus=_gpu_count())


def run_sweep(experiment: str, overrides: list[str], out: Path, workers: int = 1) -> tuple[list[SweepRun], dict[str, Any]]:
    """Run every unfinished run of a sweep in up to `workers` processes; returns the runs (without
    their configs) and the status written to OUT/<sweep>/sweep.json ({"runs": [...], "failed": [...]})."""
    if workers < 1:
        raise ConfigError(f"--workers={workers} must be >= 1")
    plan = in_forked_child(_plan, experiment, list(overrides), Path(out), workers)
    runs, folder, path = plan.runs, plan.folder, plan.experiment_path
    status = {r.name: {"run_name": r.name, "method": r.method, "seed": r.seed, "values": r.values, "attempts": 0, "status": "finished"} for r in runs}
    todo = plan.todo
    pending, running, free = deque(todo), {}, list(range(workers))
    processes: dict[int, _SweepWorker] = {}  # slot -> its worker process, while it has one
    stopped: list[_SweepWorker] = []  # told to exit: no run is left for them
    started = time.perf_counter()
    try:
        while pending or running:
            while pending and free:
                run, slot = pending.popleft(), free.pop(0)
                status[run.name]["attempts"] += 1
                run_dir = folder / run.name
                run_dir.mkdir(parents=True, exist_ok=True)
                with open(run_dir / "run.log", "a") as handle:
                    handle.write(f"--- attempt {status[run.name]['attempts']} ---\n")
                command = ["run", path, *overrides, *run.argv, "--out", str(out), "--expect-run-name", run.name]
                if run.name in plan.distributed:  # it starts processes of its own, and so gets one of its own
                    with open(run_dir / "run.log", "a") as handle:
                        running[slot] = (run, time.perf_counter(), subprocess.Popen([sys.executable, "-m", "alignbench", *command], stdout=handle,
                                                                                    stderr=subprocess.STDOUT, env=_run_environment(workers, slot, True, plan.gpus)))
                else:
                    if slot not in processes:
                        (folder / "logs").mkdir(exist_ok=True)
                        processes[slot] = _SweepWorker(_run_environment(workers, slot, False, plan.gpus), folder / "logs" / f"worker{slot}.log")
                    processes[slot].start(run.name, command, run_dir / "run.log")
                    running[slot] = (run, time.perf_counter(), processes[slot])
                log(f"started {run.label} ({run.name}); log: {run_dir / 'run.log'}")
            time.sleep(0.5)
            for slot in list(running):
                run, began, runner = running[slot]  # the slot's worker, or a distributed run's own process
                exit_status = runner.poll()
                if exit_status is None:
                    continue
                del running[slot]
                free.append(slot)
                if exit_status != 0 and processes.get(slot) is runner:
                    del processes[slot]  # it has exited (`sweep_worker`): the slot's next run gets a fresh one
                if not pending and slot in processes:  # its memory goes back while the others finish
                    stopped.append(processes.pop(slot))
                    stopped[-1].stop()
                entry = status[run.name]
                if exit_status == 0:
                    entry["status"] = "finished"
                    log(f"finished {run.label} in {time.perf_counter() - began:.0f}s ({len(todo) - len(pending) - len(running)} of {len(todo)} done)")
                    continue
                log_path = folder / run.name / "run.log"
                if entry["attempts"] <= plan.max_retries:
                    log(f"{run.label} failed (exit {exit_status}); retrying ({entry['attempts']} of {plan.max_retries} retries). Its log ends:\n{_tail(log_path)}")
                    pending.append(run)
                else:
                    entry["status"] = "failed"
                    entry["exit_code"] = exit_status
                    entry["log"] = str(log_path)
                    log(f"{run.label} failed (exit {exit_status}) after {entry['attempts']} attempt(s). Its log ends:\n{_tail(log_path)}")
        for worker in [*processes.values(), *stopped]:
            worker.stop()
            worker.process.wait()
    except BaseException:  # KeyboardInterrupt included: no run outlives the sweep
        for _, _, runner in running.values():
            runner.kill()
        for worker in [*processes.values(), *stopped]:
            worker.kill()
        raise
    failed = [s for s in status.values() if s["status"] == "failed"]
    result = {"sweep": plan.name, "runs": list(status.values()), "failed": [s["run_name"] for s in failed], "seconds": round(time.perf_counter() - started, 1)}
    write_json_atomic(folder / "sweep.json", result)
    return runs, result


def run_quickstart_workers(experiment: str, overrides: list[str], out: Path, folder: Path, workers: int, gpus: int | None = None) -> list[int]:
    """A quickstart's runs in `workers` processes (`alignbench quickstart ... --worker`), with one
    torch thread each where processes x threads would exceed the cores, and logs in
    FOLDER/logs/worker<K>.log. The workers share the runs of all seeds: each takes the next run
    that none of them has taken, method by method across the seeds (`runner.run_experiment_runs`),
    so three seeds on two cores keep both busy to the end without a third process. Every seed is a
    full replicate with stages of its own; whichever worker first needs a seed's stage builds it.
    Returns the workers that failed: a worker goes on past a run that fails and exits non-zero at
    the end, its log naming the runs (`runner.run_experiment_runs`); rerunning retries them.
    `gpus`: the machine's GPU count, where the caller knows it (see `_run_environment`)."""
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    running, failed = {}, []
    started = last_report = time.perf_counter()
    try:
        for slot in range(workers):
            log_path = folder / "logs" / f"worker{slot}.log"
            command = [sys.executable, "-m", "alignbench", "quickstart", "--experiment", experiment, *overrides, "--out", str(out), "--worker"]
            with open(log_path, "a") as handle:
                process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=_run_environment(workers, slot, gpus=gpus))
            running[process] = (slot, log_path)
            log(f"worker {slot}: started (log: {log_path})")
        while running:
            if time.perf_counter() - last_report > 60:  # the workers' logs are files: say where each one is
                last_report = time.perf_counter()
                for slot, log_path in running.values():
                    log(f"worker {slot} at {last_report - started:.0f}s: {_last_step(log_path)}")
            time.sleep(0.5)
            for process in [p for p in running if p.poll() is not None]:
                slot, log_path = running.pop(process)
                if process.returncode == 0:
                    log(f"worker {slot}: finished at {time.perf_counter() - started:.0f}s")
                else:
                    failed.append(slot)
                    log(f"worker {slot} failed (exit {process.returncode}). Its log ends:\n{_tail(log_path)}")
    except BaseException:  # KeyboardInterrupt included: no worker outlives the quickstart
        for process in running:
            process.kill()
        raise
    return failed


def _last_step(log_path: Path) -> str:
    """The last line alignbench logged (progress bars aside) in a worker's log."""
    try:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.startswith("[alignbench]")]
    except FileNotFoundError:
        return "starting"
    return lines[-1].removeprefix("[alignbench] ") if lines else "starting"


def _result(path: Path) -> dict[str, Any] | None:
    """A finished run's metrics.json; None where there is none, or one that cannot be read (the
    run is not finished: a rerun of the sweep makes it again)."""
    try:
        return read_result(path) if path.exists() else None
    except UnreadableResult as err:
        warn(f"{err}; the run is not finished")
        return None


def summary(runs: list[SweepRun], folder: Path) -> str:
    """The sweep's finished runs: one column per method and swept setting, averaged over seeds."""
    from alignbench.analysis.tables import format_table, results_frame, summary_table

    finished = [(r, _result(folder / r.name / "metrics.json")) for r in runs]
    results = [dict(result, method=r.label) for r, result in finished if result is not None]
    if not results:
        return "no finished runs\n"
    table = summary_table(results_frame(results))
    transposed = table.set_index("method").drop(columns=["experiment"]).T.reset_index().rename(columns={"index": "metric"})
    return (f"Means over each policy's finished seeds; `alignbench results {folder}` gives each with its 95% interval "
            "over seeds and prompts.\n\n" + format_table(transposed, "md"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="a shipped sweep or experiment name (head_to_head) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every run, e.g. eval.n_test_prompts=512")
    parser.add_argument("--workers", type=at_least_one, default=1, help="runs at once, in as many worker processes (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and whether each is finished, and run nothing")


def main(args) -> None:
    out = Path(args.out)
    if args.dry_run:
        quiet_libraries()
        runs, _ = expand(args.sweep, args.overrides)
        for run in runs:
            done = _result(out / run.config.name / run.name / "metrics.json") is not None
            print(f"{'finished' if done else 'to run  '}  {run.name}  {run.label}")
        print(f"{len(runs)} runs")
        return
    runs, result = run_sweep(args.sweep, args.overrides, out, args.workers)
    print()
    print(summary(runs, out / result["sweep"]), end="")
    print(f"sweep {result['sweep']}: {len(result['runs']) - len(result['failed'])} of {len(result['runs'])} runs finished; results in {out / result['sweep']}")
    if result["failed"]:
        print(f"FAILED after retries ({len(result['failed'])}):", file=sys.stderr)
        for entry in result["runs"]:
            if entry["status"] == "failed":
                print(f"  {entry['run_name']} (exit {entry['exit_code']}): {entry['log']}", file=sys.stderr)
        raise SystemExit(1)
