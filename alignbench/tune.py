"""`alignbench tune TUNE [key=value ...] [--storage URL] [--n-trials N] [--workers N]`:
an Optuna search over each method's hyperparameters, then the best settings on fresh seeds.

A tune file is an experiment file plus a `tune:` section (see TuneConfig):

    base: quickstart
    methods: [dpo]
    eval: {eval_every: 50}          # the periodic validation that pruning reads
    tune:
      n_trials: 20                  # per method: every method gets the same budget
      objective: {metric: eval/win_rate, direction: maximize}
      pruner: {type: median}
      space:
        dpo:
          dpo.beta: {type: log_float, low: 0.01, high: 1.0}
          dpo.optim.lr: {type: log_float, low: 1.0e-5, high: 1.0e-3}

Each method has a study `<tune>-<method>` in the storage (by default the SQLite file
`OUT/<tune>/optuna.db`, created before any worker starts; `--storage` takes any Optuna RDB
URL — postgresql://, mysql:// — or a path, read as an Optuna journal file). A trial is one
run of the method at `trial_seed` with the sampled settings, trained as `alignbench run`
would, under `OUT/<tune>_trials/`, tracked as a W&B run in the study's group, and measured
on the validation split: the objective `eval/<metric>` is read as `val/<metric>`, and the
test split is never evaluated. The periodic validation (`eval.eval_every`) is reported to
the pruner (median or Hyperband), which stops unpromising trials. The sampler is TPE, seeded
(`sampler.seed`, plus the worker's number when several work at once).

`--workers N` runs N trial processes on this machine. For many machines, point each at one
RDB storage (`--storage postgresql://...`): the study's trial budget is shared, and a machine
started with `--trials-only` leaves the final step to one other.

At the end, the best settings of each method are written as a runnable experiment,
`OUT/<tune>/best.yaml` (`alignbench run` / `alignbench sweep` it), and re-run on
`final_seeds` — fresh seeds, on the test split — as a sweep into `OUT/<tune>/`, whose table
is printed. The stock Optuna CLI reads every study:
`optuna trials --study-name <tune>-<method> --storage <URL>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from alignbench.config import (
    ConfigError,
    apply_overrides,
    at_least_one,
    config_hash,
    from_dict,
    parse_overrides,
    to_dict,
)
from alignbench.log import log, quiet_libraries
from alignbench.processes import follow_parent_process, freeze_imported_objects, in_forked_child, release_freed_memory

# Trials whose ids are in this user attribute failed by their settings (an exception in the
# run); other failed trials (a killed worker, over the budget) do not count towards it.
_ERROR = "error"
_OVER_BUDGET = "over_budget"


@dataclass
class ParameterSpace:
    """One hyperparameter's range: float / log_float / int between low and high (with an
    optional step), or categorical over choices."""

    type: Literal["float", "log_float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = None
    """Grid step within [low, high] (float and int; not with log_float)."""
    choices: list[Any] | None = None

    def __post_init__(self):
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("type 'categorical' needs a non-empty 'choices' list")
            return
        if self.step is not None and not self.step > 0:
            raise ValueError(f"step={self.step} must be > 0 (or left out for a continuous range)")
        if self.low is None or self.high is None:
            raise ValueError(f"type {self.type!r} needs 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError(f"low={self.low} must be < high={self.high}")
        if self.type == "log_float" and self.low <= 0:
            raise ValueError(f"log_float needs low > 0, got low={self.low}")
        if self.type == "log_float" and self.step is not None:
            raise ValueError("log_float takes no 'step'")
        if self.type == "int" and not all(float(v).is_integer() for v in (self.low, self.high, self.step or 1)):
            raise ValueError(f"type 'int' needs whole numbers, got low={self.low} high={self.high} step={self.step}")

    def suggest(self, trial, key: str) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(key, self.choices)
        if self.type == "int":
            return trial.suggest_int(key, int(self.low), int(self.high), step=int(self.step or 1))
        return trial.suggest_float(key, self.low, self.high, step=self.step, log=self.type == "log_float")

    def samples(self) -> list[Any]:
        """Values at the ends of the range (to check the key and its type before any trial)."""
        if self.type == "categorical":
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.type == "int" else [float(self.low), float(self.high)]


# The metrics the evaluator reports for a split (alignbench.evaluation.Evaluator.evaluate, tested
# against it), the first four with _ci_low and _ci_high; kl_outside_support at T = 0 or top_p < 1.
EVALUATION_METRICS = ("win_rate", "gold_reward", "gold_helpfulness", "gold_harmlessness", "proxy_reward", "kl", "kl_outside_support", "length", "distinct_2")


@dataclass
class Objective:
    """What the search optimises: a contract metric, measured on the validation split."""

    metric: str = "eval/win_rate"
    """An `eval/*` metric (read as its `val/*` twin, reported during training for pruning),
    or a `train/*`, `budget/*` or `rm/*` metric of the finished trial."""
    direction: Literal["maximize", "minimize"] = "maximize"

    def __post_init__(self):
        family, _, name = self.metric.partition("/")
        if family not in ("eval", "val", "train", "budget", "rm"):
            raise ValueError(f"objective.metric={self.metric!r} must be a contract metric: eval/... (measured on the validation split), train/..., budget/... or rm/...")
        if family in ("eval", "val") and name.removesuffix("_ci_low").removesuffix("_ci_high") not in EVALUATION_METRICS:
            # Checked now: a name no trial reports would fail every trial, each after its training.
            raise ValueError(f"objective.metric={self.metric!r} is not an evaluation metric; use {family}/ with one of {', '.join(EVALUATION_METRICS)}")

    @property
    def key(self) -> str:
        """The metric's name in a trial's results: `val/win_rate` for `eval/win_rate`."""
        family, _, name = self.metric.partition("/")
        return f"val/{name}" if family in ("eval", "val") else self.metric


@dataclass
class SamplerConfig:
    """Optuna's TPE sampler."""

    seed: int = 0
    """Seed of the sampler (worker k of several uses seed + k)."""
    n_startup_trials: int = 5
    """Random trials before TPE starts modelling."""

    def __post_init__(self):
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"tune.sampler.seed={self.seed} must be an integer in [0, 2**31)")
        if self.n_startup_trials < 0:
            raise ValueError(f"tune.sampler.n_startup_trials={self.n_startup_trials} must be >= 0")


@dataclass
class PrunerConfig:
    """Stopping unpromising trials on their periodic validation (`eval.eval_every`)."""

    type: Literal["median", "hyperband", "none"] = "median"
    n_startup_trials: int = 3
    """median: trials that finish before any is pruned."""
    n_warmup_steps: int = 0
    """median: training steps of a trial before it may be pruned."""
    min_resource: int = 1
    """hyperband: the fewest training steps a trial gets."""
    reduction_factor: int = 3
    """hyperband: 1 / the share of trials promoted at each rung."""

    def __post_init__(self):
        for key, value, least in (("n_startup_trials", self.n_startup_trials, 0), ("n_warmup_steps", self.n_warmup_steps, 0),
                                  ("min_resource", self.min_resource, 1), ("reduction_factor", self.reduction_factor, 2)):
            if value < least:
                raise ValueError(f"tune.pruner.{key}={value} must be >= {least}")

    def build(self):
        import optuna

        if self.type == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=self.n_startup_trials, n_warmup_steps=self.n_warmup_steps)
        if self.type == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=self.min_resource, reduction_factor=self.reduction_factor)
        return optuna.pruners.NopPruner()


@dataclass
class TuneConfig:
    """The `tune:` section of a tune file."""

    space: dict[str, Any] = field(default_factory=dict)
    """Per method: dotted key of its own section -> ParameterSpace. A listed method without a
    space is not searched; it runs on the final seeds with its settings as they are."""
    n_trials: int = 20
    """Trials per method (the same for every method: a fair comparison tunes each equally)."""
    objective: Objective = field(default_factory=Objective)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    trial_seed: int = 0
    """The seed every trial trains with (trials differ only in their settings)."""
    final_seeds: list[int] = field(default_factory=lambda: [100, 101, 102])
    """Fresh seeds the best settings are re-run on, reported on the test split."""

    def __post_init__(self):
        if self.n_trials < 1:
            raise ValueError(f"tune.n_trials={self.n_trials} must be >= 1")
        if self.trial_seed < 0:
            raise ValueError(f"tune.trial_seed={self.trial_seed} must be an integer >= 0")
        if not self.final_seeds:
            raise ValueError("tune.final_seeds needs at least one seed")
        if any(seed < 0 for seed in self.final_seeds):
            raise ValueError(f"tune.final_seeds={self.final_seeds}: a seed must be an integer >= 0")
        if len(set(self.final_seeds)) < len(self.final_seeds):  # checked now, not when the search is over
            raise ValueError(f"tune.final_seeds={self.final_seeds} lists a seed more than once; each entry must be distinct")


@dataclass
class Tune:
    """A loaded tune file: the experiment its trials share, and the search."""

    name: str
    data: dict
    """The experiment mapping (base merged, overrides applied, tune/sweep sections removed)."""
    spec: TuneConfig
    spaces: dict[str, dict[str, ParameterSpace]]

    def study_name(self, method: str) -> str:
        return f"{self.name}-{method}"

    def experiment(self):
        """The experiment the trials share, as a config object (checked by `load_tune`). Plain
        values otherwise, so that a tune's parent, which only waits for its trial workers, can hold
        a Tune without torch: making the config object imports every method."""
        from alignbench.experiment import experiment_from_data

        return experiment_from_data(dict(self.data))


def load_tune(name_or_path: str, overrides: list[str] = ()) -> Tune:
    from alignbench.experiment import experiment_from_data, load_experiment_data
    from alignbench.sweep import flatten_keys

    data = apply_overrides(load_experiment_data(name_or_path), parse_overrides(overrides))
    spec = from_dict(TuneConfig, data.pop("tune", None), "tune")
    data.pop("sweep", None)
    config = experiment_from_data(dict(data))
    if config.trainer.distributed:
        raise ConfigError("alignbench tune runs each trial in one process (pruning stops a trial from inside it); set trainer.devices=1 and trainer.num_nodes=1, or tune with W&B sweep agents")
    spaces = {}
    for method, space in (spec.space or {}).items():
        if method not in config.methods:
            raise ConfigError(f"tune.space.{method}: {method!r} is not in this file's methods ({', '.join(config.methods)})")
        if not isinstance(space, dict):
            raise ConfigError(f"tune.space.{method} is {space!r}; it must be a mapping of the method's keys to their ranges, e.g. {{{method}.optim.lr: {{type: log_float, low: 1.0e-5, high: 1.0e-3}}}}")
        flat = flatten_keys(space, f"tune.space.{method}", lambda v: isinstance(v, dict) and "type" in v)
        spaces[method] = {}
        for key, value in flat.items():
            if not key.startswith(f"{method}."):
                raise ConfigError(f"tune.space.{method}.{key}: a method's search space holds keys of its own section ({method}.*), so every method is compared on the same shared stages")
            spaces[method][key] = parameter = from_dict(ParameterSpace, value, f"tune.space.{method}.{key}")
            for sample in parameter.samples():
                try:
                    experiment_from_data(apply_overrides(data, {key: sample}))
                except ConfigError as err:
                    raise ConfigError(f"tune.space.{method}.{key}: {err}") from None
        if not spaces[method]:
            raise ConfigError(f"tune.space.{method} is empty; give it parameters or leave the method out of tune.space")
    return Tune(config.name, data, spec, spaces)


# --- storage -----------------------------------------------------------------------------
def default_storage(out: Path, name: str) -> str:
    return f"sqlite:///{(out / name / 'optuna.db').resolve()}"


def open_storage(url: str):
    """An RDB URL (sqlite:///, postgresql://, mysql://), redis:// (journal), or a path: an
    Optuna journal file, as the `optuna` CLI reads a path. RDB storages keep a heartbeat, so
    a trial whose worker died is failed and its place in the budget taken by another."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalRedisBackend

    if "://" not in url:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        try:
            return JournalStorage(JournalFileBackend(url))  # replays the file: a damaged line fails here
        except ValueError as error:  # (a line cut short by a killed worker is the last, and Optuna skips it)
            raise ConfigError(f"the Optuna journal file {url} cannot be read: {error}; it is damaged or not Optuna's: "
                              "move it away to start the studies afresh there, or give another --storage") from error
    if url.startswith("redis"):
        return JournalStorage(JournalRedisBackend(url))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # SQLite serves several local workers if they wait for its lock rather than fail at once.
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None
    from sqlalchemy.exc import DatabaseError

    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=10, grace_period=60)
    except DatabaseError as error:  # e.g. a file that is not (or no longer) an SQLite database
        reason = str(getattr(error, "orig", None) or error).strip()
        damaged = any(word in reason for word in ("not a database", "malformed"))
        advice = "; it is damaged or not Optuna's: move it away to start the studies afresh there, or give another --storage" if damaged else ""
        raise ConfigError(f"the Optuna storage {url} cannot be opened: {reason}{advice}") from error


def _counts(trial) -> bool:
    """Whether a trial takes a place in the budget: finished, running, or failed by its settings."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING):
        return True
    return trial.state == TrialState.FAIL and _ERROR in trial.user_attrs


def trial_setup(tune: Tune, method: str) -> str:
    """What a trial's value of `method` means: the run its trials share (the name of the resolved
    run at the searched keys' base values: every setting that changes results), the search space
    and the trial seed. A study's trials are comparable only under one setup."""
    from alignbench.experiment import experiment_from_data, resolve_run

    base = experiment_from_data(apply_overrides(tune.data, {"name": f"{tune.name}_trials", "method": method, "seed": tune.spec.trial_seed}))
    space = {key: to_dict(parameter) for key, parameter in sorted(tune.spaces[method].items())}
    return config_hash({"run": resolve_run(base).name, "space": space})


def create_studies(tune: Tune, storage_url: str) -> None:
    """Create every method's study (or check the existing one) before any worker starts. An
    existing study with trials of another objective or setup (`trial_setup`) is refused: its best
    trial would be picked by comparing values that do not measure the same thing."""
    import optuna

    storage = open_storage(storage_url)
    for method in tune.spaces:
        study = optuna.create_study(study_name=tune.study_name(method), storage=storage, direction=tune.spec.objective.direction, load_if_exists=True)
        if study.direction.name.lower() != tune.spec.objective.direction:
            raise ConfigError(f"study {study.study_name!r} in {storage_url} is set to {study.direction.name.lower()}; this tune file says {tune.spec.objective.direction}")
        setup, recorded = trial_setup(tune, method), study.user_attrs
        trials = len(study.get_trials(deepcopy=False))
        differs = [what for what, (old, new) in {
            f"objective (the study's {recorded.get('objective')}, this search's {tune.spec.objective.key})": (recorded.get("objective"), tune.spec.objective.key),
            "trial settings (the base config, the search space or tune.trial_seed)": (recorded.get("setup"), setup),
        }.items() if old is not None and old != new]
        if trials and differs:
            raise ConfigError(f"study {study.study_name!r} in {storage_url} holds {trials} trial(s) of another {' and '.join(differs)}: their values "
                              f"are not comparable with this search's. Give this search another --out or --storage, or delete the study "
                              f"(optuna delete-study --study-name {study.study_name} --storage {storage_url})")
        study.set_user_attr("objective", tune.spec.objective.key)
        study.set_user_attr("setup", setup)


# --- trials ------------------------------------------------------------------------------
class _OverBudget(Exception):
    """This trial was asked for after the study's budget had been taken by others."""


def pruning_observer(trial, key: str):
    """Reports each periodic validation of `key` to Optuna and stops the run if the pruner says so."""
    import optuna

    def observe(row: dict) -> None:
        if key in row and row.get("step") is not None and row[key] is not None and math.isfinite(row[key]):
            trial.report(row[key], step=int(row["step"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {row['step']} with {key}={row[key]:.4f}")

    return observe


def run_trial(trial, tune: Tune, method: str, out: Path, pipeline) -> float:
    """One trial: the method at the trial seed with the sampled settings, on the validation split."""
    from alignbench.experiment import experiment_from_data, resolve_run
    from alignbench.runner import run_one

    c = tune.spec
    counted = sorted(t.number for t in trial.study.get_trials(deepcopy=False) if _counts(t))
    if trial.number not in counted[: c.n_trials]:
        trial.set_user_attr(_OVER_BUDGET, True)
        raise _OverBudget
    run_dir = None
    try:
        values = {key: space.suggest(trial, key) for key, space in tune.spaces[method].items()}
        data = apply_overrides(tune.data, {**values, "name": f"{tune.name}_trials", "method": method, "seed": c.trial_seed})
        if not data.get("tracking", {}).get("project"):
            data = apply_overrides(data, {"tracking.project": tune.name})  # every trial of the tune in one W&B project
        config = experiment_from_data(data)
        spec = resolve_run(config)
        run_dir = out / config.name / spec.name
        trial.set_user_attr("run", str(run_dir))
        result = run_one(config, out, group=tune.study_name(method), pipeline=pipeline, split="val", observers=[pruning_observer(trial, c.objective.key)])
        value = result["metrics"].get(c.objective.key)
        if value is None or not math.isfinite(value):
            raise ValueError(f"the trial's results have no finite {c.objective.key} (it was {value})")
        return float(value)
    except Exception as err:
        import optuna

        if isinstance(err, optuna.TrialPruned):
            if run_dir is not None:
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a pruned trial is not resumed
        else:  # a failure of the trial's own takes its place in the budget, or the search would never end
            trial.set_user_attr(_ERROR, f"{type(err).__name__}: {err}")
        raise
    finally:
        release_freed_memory()  # the trial's policy, data and samples are gone; the worker runs more


def work(tune_file: str, overrides: list[str], out: Path, storage_url: str, worker: int = 0) -> None:
    """Run trials until every method's study has its budget (the loop of one worker)."""
    import optuna

    from alignbench.runner import stage_pipeline

    quiet_libraries()
    freeze_imported_objects()
    tune = load_tune(tune_file, overrides)
    storage = open_storage(storage_url)
    pipeline = stage_pipeline(dataclasses.replace(tune.experiment(), seed=tune.spec.trial_seed), out)  # the trials' seed's stages, as prepare_search built them
    heartbeat = isinstance(storage, optuna.storages.RDBStorage)
    for method in tune.spaces:
        c = tune.spec
        earlier = len(optuna.load_study(study_name=tune.study_name(method), storage=storage).get_trials(deepcopy=False))
        study = optuna.load_study(study_name=tune.study_name(method), storage=storage, sampler=trial_sampler(c.sampler, worker, earlier), pruner=c.pruner.build())
        while True:
            if heartbeat:
                optuna.storages.fail_stale_trials(study)
            else:
                fail_abandoned_trials(study, storage)
            trials = study.get_trials(deepcopy=False)
            if sum(map(_counts, trials)) >= c.n_trials:
                running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
                if any(heartbeat or _local_run(t) is not None for t in running):
                    time.sleep(5)  # another worker's trial may yet fail and leave a place
                    continue
                break
            objective = functools.partial(run_trial, tune=tune, method=method, out=out, pipeline=pipeline)
            report = functools.partial(_log_trial, method=method, key=c.objective.key)
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True, callbacks=[report])


# A trial's run takes its lock within moments of the trial's start (`run_trial`); until then it
# cannot be told from one whose worker is gone.
ABANDONED_AFTER_S = 10.0


def _local_run(trial) -> Path | None:
    """The run folder of a trial, where it is on this machine."""
    run = trial.user_attrs.get("run")
    return Path(run) if run is not None and Path(run).is_dir() else None


def fail_abandoned_trials(study, storage, after_s: float = ABANDONED_AFTER_S) -> None:
    """Journal storages keep no heartbeat: a trial whose worker was killed stayed RUNNING for good
    and kept its place in the budget, so a resumed search ran one trial fewer. A RUNNING trial whose
    run folder is on this machine, started over `after_s` ago, and whose run lock no process holds
    has no worker left: it is failed, not counted, as an RDB storage's heartbeat would fail it. A
    trial of another machine (its folder not here) is left to its own worker."""
    import datetime

    from optuna.trial import TrialState

    from alignbench.runner import run_in_progress

    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        run_dir = _local_run(trial)
        started = trial.datetime_start
        if run_dir is None or started is None or (now - started).total_seconds() < after_s or run_in_progress(run_dir):
            continue
        storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        log(f"{study.study_name} trial {trial.number} was left running by a worker that is gone ({run_dir} is not locked); "
            "failed, and its place in the budget given to a new trial")


def trial_sampler(config: SamplerConfig, worker: int, earlier_trials: int):
    """Worker `worker`'s TPE sampler, in a study that holds `earlier_trials` trials already. A
    search resumed after a kill gets a stream of its own: seeded as a fresh one is, it drew the
    killed search's first points again (a trial that only repeated a finished one's settings)."""
    import optuna

    seed = config.seed + worker if earlier_trials == 0 else (config.seed + worker + 1_000_003 * earlier_trials) % 2**32
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=config.n_startup_trials)


def _log_trial(study, trial, method: str, key: str) -> None:
    log(f"{method} trial {trial.number}: {describe_trial(trial, key)}")


def _worker_process(tune_file: str, overrides: list[str], out: str, storage_url: str, worker: int, threads: int, log_path: str, parent: int) -> None:
    """A spawned worker: its share of the cores, its output to its own log; it dies with the tune
    (a killed tune's workers went on with its trials, and a rerun started more beside them)."""
    follow_parent_process(parent)
    log_file = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_file, 1)
    os.dup2(log_file, 2)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(threads))
    _quiet_optuna()
    work(tune_file, overrides, Path(out), storage_url, worker)


def run_workers(tune_file: str, overrides: list[str], out: Path, storage_url: str, workers: int, tune: Tune) -> None:
    """`workers` local trial processes; this one reports each trial as it ends."""
    import multiprocessing

    import optuna

    if workers == 1:
        return work(tune_file, overrides, out, storage_url)
    logs = out / f"{tune.name}_trials" / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_worker_process, args=(tune_file, list(overrides), str(out), storage_url, k, threads, str(logs / f"worker-{k}.log"), os.getpid()))
        for k in range(workers)
    ]
    for process in processes:
        process.start()
    log(f"{workers} workers started; their logs: {logs}/worker-*.log")
    storage, reported = open_storage(storage_url), set()
    try:
        while any(p.is_alive() for p in processes):
            time.sleep(2)
            for method in tune.spaces:
                for trial in optuna.load_study(study_name=tune.study_name(method), storage=storage).get_trials(deepcopy=False):
                    if trial.state.is_finished() and (method, trial.number) not in reported:
                        reported.add((method, trial.number))
                        log(f"{method} trial {trial.number}: {describe_trial(trial, tune.spec.objective.key)}")
    except BaseException:
        for process in processes:
            process.kill()
        raise
    failed = [k for k, p in enumerate(processes) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"tune worker(s) {failed} exited with an error; see {logs}/worker-{failed[0]}.log")


def describe_trial(trial, key: str) -> str:
    params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    state = trial.state.name
    if state == "COMPLETE":
        return f"{key}={trial.value:.4f}  {params}"
    if state == "PRUNED":
        step = trial.last_step
        return f"pruned at step {step} ({key}={trial.intermediate_values.get(step, float('nan')):.4f})  {params}"
    return f"{state.lower()} {trial.user_attrs.get(_ERROR, '')}  {params}"


# --- the best configuration --------------------------------------------------------------
def best_settings(tune: Tune, storage_url: str) -> dict[str, dict]:
    """Per searched method: its best trial's settings, value and number."""
    import optuna
    from optuna.trial import TrialState

    storage, best = open_storage(storage_url), {}
    for method in tune.spaces:
        study = optuna.load_study(study_name=tune.study_name(method), storage=storage)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            raise ConfigError(f"no trial of {method} finished (see `optuna trials --study-name {study.study_name} --storage {storage_url}`); nothing to choose from")
        trial = study.best_trial
        best[method] = {"params": dict(trial.params), "value": trial.value, "trial": trial.number, "study": study.study_name}
    return best


def write_best_config(tune: Tune, best: dict[str, dict], path: Path) -> Path:
    """The tuned experiment as a runnable, self-contained YAML: every setting resolved, each
    searched method with its best trial's settings, the final seeds."""
    from alignbench.experiment import (
        DRIVER_SECTIONS,
        ExperimentBase,
        experiment_from_data,
    )

    settings = {key: value for found in best.values() for key, value in found["params"].items()}
    data = apply_overrides(tune.data, {**settings, "name": tune.name, "seeds": list(tune.spec.final_seeds), "method": None, "seed": None})
    config = experiment_from_data(data)
    shared = {f.name for f in dataclasses.fields(ExperimentBase)}
    resolved = {k: v for k, v in to_dict(config).items() if k in shared or k in config.methods}
    for section in DRIVER_SECTIONS:
        resolved.pop(section, None)
    lines = [f"# The best settings found by `alignbench tune` ({tune.name}), objective {tune.spec.objective.key} ({tune.spec.objective.direction}) on the validation split:"]
    lines += [f"#   {method}: trial {b['trial']} of study {b['study']}, {tune.spec.objective.key}={b['value']:.4f}, {b['params']}" for method, b in best.items()]
    lines += [f"# Run on the test split with: alignbench sweep {path}   (or: alignbench run {path} method=NAME seed=SEED)", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + yaml.safe_dump(resolved, sort_keys=False))
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tune", help="a shipped tune file's name (tune_dpo, tune_fair) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every trial and final run, e.g. eval.n_val_prompts=128")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (postgresql://..., mysql://..., sqlite:///...) or a journal file path (default: sqlite in OUT/<tune>/optuna.db)")
    parser.add_argument("--n-trials", type=at_least_one, default=None, help="trials per method (default: tune.n_trials)")
    parser.add_argument("--workers", type=at_least_one, default=1, help="trial processes on this machine (default 1)")
    parser.add_argument("--trials-only", action="store_true", help="only work on the studies' trials (for the second and later machines of a shared storage)")


def prepare_search(tune_file: str, overrides: list[str], out: Path, storage: str | None) -> tuple[Tune, str]:
    """Before any worker starts: read the tune file, create every method's study (or check the
    existing one) and build the trial seed's shared stages (SFT, reward models, ...) once, so that
    the workers do not all build them at once. Returns the tune and its storage URL."""
    from alignbench.runner import stage_pipeline

    quiet_libraries()
    tune = load_tune(tune_file, overrides)
    storage_url = storage or default_storage(out, tune.name)
    _quiet_optuna()
    create_studies(tune, storage_url)
    searched = ", ".join(tune.spaces) or "none"
    log(f"tune {tune.name}: {tune.spec.n_trials} trials for each of {searched} on {tune.spec.objective.key} ({tune.spec.objective.direction}); storage {storage_url}")
    if tune.spaces:
        stage_pipeline(dataclasses.replace(tune.experiment(), seed=tune.spec.trial_seed), out).context()
    return tune, storage_url


def main(args) -> None:
    from alignbench.sweep import run_sweep, summary

    out = Path(args.out)
    overrides = list(args.overrides) + ([f"tune.n_trials={args.n_trials}"] if args.n_trials is not None else [])
    # With several workers, what needs torch (reading the experiment, building stages, writing the
    # best config) runs in a forked child: this process only waits for its trial workers and reads
    # the storage, and would otherwise hold torch, transformers, Lightning and the stage models
    # (~0.5 GB) beside them. With one, this process is the worker, and a child would only import
    # torch a second time.
    def step(function, *arguments):
        return in_forked_child(function, *arguments) if args.workers > 1 else function(*arguments)

    tune, storage_url = step(prepare_search, args.tune, overrides, out, args.storage)
    _quiet_optuna()
    if tune.spaces:
        run_workers(args.tune, overrides, out, storage_url, args.workers, tune)
    if args.trials_only:
        return
    best = best_settings(tune, storage_url)
    for method, found in best.items():
        log(f"best {method}: trial {found['trial']} {tune.spec.objective.key}={found['value']:.4f} {found['params']}")
    best_path = step(write_best_config, tune, best, out / tune.name / "best.yaml")
    log(f"best configuration: {best_path}; running it on the final seeds {tune.spec.final_seeds} (test split)")
    runs, result = run_sweep(str(best_path), [], out, args.workers)
    print()
    print(summary(runs, out / result["sweep"]), end="")
    print(f"best configuration: {best_path}")
    for method in tune.spaces:
        print(f"study {tune.study_name(method)}: optuna trials --study-name {tune.study_name(method)} --storage {storage_url}")
    if result["failed"]:
        print(f"FAILED final runs: {', '.join(result['failed'])} (logs under {out / result['sweep']})", file=sys.stderr)
        raise SystemExit(1)


def _quiet_optuna() -> None:
    import logging
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", message=".*is already reported.*")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats
    logging.getLogger("optuna").setLevel(logging.WARNING)
