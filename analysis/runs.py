"""The runs of one experiment, from its directory or from the W&B API, and how they differ.

A figure needs to know which runs are the same policy at different seeds and which differ in a
setting (a swept β, a model size, a temperature). Each run's resolved config says so: runs of a
method whose flattened configs differ in some keys (other than the seed) are different
*variants*, labelled by those keys (`dpo (beta=0.5)`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alignbench.analysis.stats import Interval, metric_interval, replicate_interval, two_level_replicates
from alignbench.config import ConfigError, flatten
from alignbench.log import warn
from alignbench.records import UnreadableResult, checksum_problems, read_result
from alignbench.stage_cache import CACHE_FOLDER


def find_run_dirs(directory: Path) -> list[Path]:
    """The folders of every finished run (holding a `metrics.json`) under `directory`, sorted by
    path; the stage cache is not a run."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"results directory not found: {directory}")
    return [path.parent for path in sorted(directory.rglob("metrics.json")) if CACHE_FOLDER not in path.relative_to(directory).parts]


# Runs are pooled over seeds only where their whole resolved config agrees except these: the seed
# itself, which run of a sweep it is (the experiment's name is kept apart as `Run.experiment`), how
# it was tracked, and trainer settings that only say how progress is shown or saved. Every other
# key, trainer.threads, precision and device included (they change the numbers), tells policies apart.
_NOT_A_SETTING = ("name", "method", "methods", "seed", "seeds", "seed_follows", "tracking")
_NOT_A_SETTING_KEYS = ("trainer.progress_bar", "trainer.log_every_n_steps", "trainer.checkpoint_every")
BASELINES = ("sft", "best_of_n", "best_of_n_gold")

# The samples.jsonl column that holds each evaluation metric per test prompt (written by
# alignbench/evaluation.py's Evaluator: `win` against the SFT reference's sample, 1/2 for a tie).
PER_PROMPT = {
    "eval/win_rate": "win", "eval/gold_reward": "gold_reward", "eval/gold_helpfulness": "gold_helpfulness",
    "eval/gold_harmlessness": "gold_harmlessness", "eval/proxy_reward": "proxy_reward", "eval/kl": "kl",
}


@dataclass
class Run:
    """One finished run: its resolved config, final metrics, logged history and samples."""

    experiment: str
    name: str
    method: str
    seed: int
    config: dict[str, Any]
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    samples_path: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    """The flattened config minus the keys that never tell policies apart (seed, tracking, ...)."""
    folder: Path | None = None
    """The run's folder; None for a run read from W&B."""

    def setting(self, key: str, default: Any = None) -> Any:
        return self.settings.get(key, default)

    def _sample_columns(self) -> _SampleColumns:
        """What the figures read of samples.jsonl, read once (`_SampleColumns`)."""
        if not hasattr(self, "_columns"):
            self._columns = _SampleColumns.read(self.samples_path)
        return self._columns

    def per_prompt(self, key: str) -> np.ndarray | None:
        """The metric `key` (e.g. eval/gold_reward) on each test prompt, from samples.jsonl; None where
        the run has no such column or the column's mean is not the run's reported value (a KL given
        in closed form, such as best-of-n's, has no per-prompt values)."""
        column = PER_PROMPT.get(key)
        columns = self._sample_columns()
        mean = columns.mean(column) if column is not None else None
        reported = self.metrics.get(key)
        if mean is None or reported is None or not _agrees(mean, reported):
            return None
        return np.array(columns.columns[column], dtype=float)

    def prompts_digest(self) -> str | None:
        """A digest of the test prompts in samples.jsonl, in order (paired comparisons need equal ones)."""
        return self._sample_columns().prompts_digest


@dataclass(frozen=True)
class _SampleColumns:
    """Of a run's samples.jsonl, what the figures use: each `PER_PROMPT` column that every row has
    (its values in row order) and the digest of the prompts. The rows themselves are not kept: a
    sweep's figures read every run's, and the texts of 2,048 prompts and responses took ~2 MB of
    Python objects a run, held until the last figure."""

    columns: dict[str, list[Any]]
    prompts_digest: str | None

    def mean(self, column: str) -> float | None:
        """The column's mean; None where there is no such column or a value is not a finite number."""
        cells = self.columns.get(column)
        if not cells or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in cells):
            return None
        values = np.array(cells, dtype=float)
        return float(values.mean()) if np.isfinite(values).all() else None

    @classmethod
    def read(cls, path: Path | None) -> _SampleColumns:
        rows = _read_jsonl(path) if path is not None else []
        if not rows:
            return cls({}, None)
        columns = {column: [row[column] for row in rows] for column in PER_PROMPT.values() if all(column in row for row in rows)}
        digest = hashlib.sha256("\n".join(str(row.get("prompt", "")) for row in rows).encode()).hexdigest()[:16]
        return cls(columns, digest)


def _agrees(mean: float, reported: float) -> bool:
    """Whether a per-prompt column's mean is the run's reported metric (float32 sums differ from
    float64 ones in the 8th digit)."""
    return abs(mean - reported) <= 1e-6 * max(1.0, abs(reported))


def _settings(config: dict) -> dict[str, Any]:
    # A stage seed that followed the run seed (`seed_follows`, written by the runner) is the seed,
    # not a setting: seed 1 with its own SFT policy is a replicate of seed 0 with its own. A
    # pinned stage seed (`sft.seed: 0` at every run seed) is a setting like any other.
    follows = set(config.get("seed_follows") or ())
    return {k: "run seed" if k in follows else v for k, v in flatten(config).items()
            if k.split(".")[0] not in _NOT_A_SETTING and k not in _NOT_A_SETTING_KEYS}


def _read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file ([] where there is none); ValueError names the file and line
    of a row that is not a JSON object."""
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number} is not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {number} is not a JSON object")
        rows.append(row)
    return rows


def load_local_runs(directory: Path) -> list[Run]:
    """Every finished run (with a metrics.json) under an experiment directory. Left out, each with a
    warning naming the file: a run whose metrics.json cannot be read, or whose metrics disagree
    with its own samples.jsonl, and a copy of a run in a folder of another name. A history.jsonl or
    samples.jsonl that differs from the checksum its metrics.json recorded, or cannot be read, is
    not used. Two folders that hold the same run are refused (ConfigError): which one counts
    cannot be told."""
    runs, folders = [], {}
    for run_dir in find_run_dirs(Path(directory)):
        try:
            run = _load_run(run_dir)
        except UnreadableResult as err:
            warn(f"{err}; that run is left out (run it again to replace it)")
            continue
        if (run.experiment, run.name) in folders:
            raise ConfigError(
                f"{folders[run.experiment, run.name]} and {run_dir} hold the same run ({run.experiment}/{run.name}): "
                "it would count twice, as if it were two seeds; move one of the two folders out of this directory"
            )
        folders[run.experiment, run.name] = run_dir
        runs.append(run)
    return runs


def _load_run(run_dir: Path) -> Run:
    """One run's folder as a Run; UnreadableResult where it is not a run that can be counted."""
    result = read_result(run_dir / "metrics.json")
    name, method, seed = result["run_name"], result["method"], result["seed"]
    if run_dir.name != name:
        raise UnreadableResult(f"{run_dir} holds the run {name} (its metrics.json says so): a copy of a run under another name")
    recorded = result.get("sha256") or {}
    intact = {}
    for file in ("history.jsonl", "samples.jsonl"):
        path = run_dir / file
        problems = checksum_problems(run_dir, {file: recorded[file]}) if file in recorded else []
        if problems:
            warn(f"{problems[0]}; its run's {file} is not used")
        intact[file] = path if path.exists() and not problems else None
    try:
        history = _read_jsonl(intact["history.jsonl"]) if intact["history.jsonl"] is not None else []
    except ValueError as err:
        warn(f"{err}; its run's curves are left out")
        history = []
    config = result.get("config", {})
    run = Run(experiment=result["experiment"], name=name, method=method, seed=seed, config=config, metrics=result["metrics"],
              history=history, samples_path=intact["samples.jsonl"], settings=_settings(config), folder=run_dir)
    if run.samples_path is not None:
        try:
            columns = run._sample_columns()
        except ValueError as err:
            warn(f"{err}; its run's samples are not used")
            run.samples_path, run._columns = None, _SampleColumns({}, None)
        else:
            disagree = [f"{key}={run.metrics[key]:.6g} but the mean of samples.jsonl's {column!r} is {mean:.6g}"
                        for key, column in PER_PROMPT.items() if (mean := columns.mean(column)) is not None
                        and run.metrics.get(key) is not None and not _agrees(mean, run.metrics[key])]
            if disagree:
                raise UnreadableResult(f"{run_dir / 'metrics.json'} and its samples.jsonl disagree ({'; '.join(disagree[:3])}): one of them was edited or damaged")
    return run


def load_wandb_runs(path: str, api: Any = None) -> list[Run]:
    """Every finished run of a W&B project `ENTITY/PROJECT`, through the W&B public API.

    The config logged by alignbench is the run's resolved config (so `method` and `seed` are in
    it), the summary holds the final metrics and the history the logged steps. Samples stay
    local, so head-to-head comparisons need the experiment directory.
    """
    if not re.fullmatch(r"[^/\s]+/[^/\s]+", path or ""):
        raise ConfigError(f"--wandb {path!r} must be ENTITY/PROJECT (e.g. my-team/quickstart)")
    if api is None:
        import wandb

        api = wandb.Api(timeout=60)
    try:
        found = list(api.runs(path))
    except Exception as err:  # noqa: BLE001 -- the W&B client raises several unrelated types for an unknown or unreachable project
        raise ConfigError(f"cannot read the W&B project {path!r}: {err}") from None
    runs = []
    for remote in found:
        if getattr(remote, "state", "finished") != "finished":
            continue
        config = dict(remote.config)
        method = config.get("method") or getattr(remote, "job_type", None)
        if method is None or config.get("seed") is None:
            continue  # not an alignbench run
        summary = {k: v for k, v in dict(remote.summary_metrics).items() if not k.startswith("_") and _is_number(v)}
        history = []
        for row in remote.scan_history():
            step = row.get("trainer/global_step", row.get("_step"))
            history.append({"step": step, **{k: v for k, v in row.items() if not k.startswith(("_", "trainer/")) and _is_number(v)}})
        runs.append(Run(
            experiment=config.get("name", path.split("/")[1]), name=remote.name, method=method, seed=int(config["seed"]),
            config=config, metrics=summary, history=history, samples_path=None, settings=_settings(config),
        ))
    return runs


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def method_order(methods: Iterable[str]) -> list[str]:
    """Baselines first (SFT, best-of-n), then the methods alphabetically."""
    methods = set(methods)
    return [m for m in BASELINES if m in methods] + sorted(methods - set(BASELINES))


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    return str(value)


def _short_key(key: str, method: str) -> str:
    return key.removeprefix(f"{method}.")


@dataclass
class Group:
    """Runs of one method that share every setting outside `ignore` (so: the seeds of one policy,
    or of one curve whose x-axis is an ignored key)."""

    method: str
    label: str
    runs: list[Run]
    differing: dict[str, Any]  # the settings that tell this group apart from its method's others
    experiment: str = ""

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.runs})


def group_runs(runs: list[Run], ignore: Callable[[str, str], bool] = lambda key, method: False) -> list[Group]:
    """Group each method's runs by their settings, leaving out keys where `ignore(key, method)`:
    with nothing ignored, the runs of a group differ in their seed only (issue 21).

    The label is the method, plus the settings that differ between its groups (`dpo (beta=0.5)`),
    and the experiment's name first where the runs come from several (`quickstart: dpo`).
    Groups come in experiment order, method order, then in the order of their differing values.
    """
    groups: list[Group] = []
    experiments = sorted({r.experiment for r in runs})
    for experiment in experiments:
        prefix = f"{experiment}: " if len(experiments) > 1 else ""
        for method in method_order(r.method for r in runs if r.experiment == experiment):
            mine = [r for r in runs if r.method == method and r.experiment == experiment]
            keys = sorted({k for r in mine for k in r.settings if not ignore(k, method)})
            varying = [k for k in keys if len({_hashable(r.settings.get(k)) for r in mine}) > 1]
            by_setting: dict[tuple, list[Run]] = {}
            for r in mine:
                by_setting.setdefault(tuple(_hashable(r.settings.get(k)) for k in varying), []).append(r)
            for values in sorted(by_setting, key=setting_order):
                differing = dict(zip(varying, values))
                label = method if not varying else f"{method} (" + ", ".join(f"{_short_key(k, method)}={_format_value(v)}" for k, v in differing.items()) + ")"
                groups.append(Group(method, prefix + label, sorted(by_setting[values], key=lambda r: r.seed), differing, experiment))
    return groups


# --- values per seed and per prompt, and their intervals ------------------------------------------
@dataclass
class SeedValues:
    """One metric of one policy: values [S, P] per seed (sorted) and per test prompt, or [S, 1]
    (the runs' reported values) where per-prompt values are missing (W&B runs, old runs, a KL in
    closed form)."""

    seeds: list[int]
    values: np.ndarray
    per_prompt: bool
    prompts: list[str | None]  # each seed's prompt digest (None without samples)

    def subset(self, seeds: list[int]) -> SeedValues:
        rows = [self.seeds.index(s) for s in seeds]
        return SeedValues(list(seeds), self.values[rows], self.per_prompt, [self.prompts[i] for i in rows])


def seed_values(runs: list[Run], key: str) -> SeedValues | None:
    """`key` of runs that differ only in seed, as SeedValues; None where no run reports it."""
    runs = sorted((r for r in runs if r.metrics.get(key) is not None and np.isfinite(r.metrics[key])), key=lambda r: r.seed)
    if not runs:
        return None
    per_prompt = [r.per_prompt(key) for r in runs]
    if all(v is not None for v in per_prompt) and len({len(v) for v in per_prompt}) == 1:
        return SeedValues([r.seed for r in runs], np.stack(per_prompt), True, [r.prompts_digest() for r in runs])
    return SeedValues([r.seed for r in runs], np.array([[float(r.metrics[key])] for r in runs]), False, [r.prompts_digest() for r in runs])


def policy_interval(runs: list[Run], key: str, n_boot: int = 1000, level: float = 0.95):
    """Mean of `key` over the runs (seeds of one policy) with its 95% interval: the two-level
    bootstrap over seeds and prompts where every seed has per-prompt values; the t-interval over
    the seeds' reported values where some do not (every seed's value carries its own evaluation
    noise, so it covers the same two sources); for one seed, the bootstrap over its prompts, or
    the interval the run recorded (evaluation noise only)."""

    values = seed_values(runs, key)
    if values is None:
        return Interval(math.nan, math.nan, math.nan, "none", 0)
    if not values.per_prompt and len(values.seeds) == 1:
        return metric_interval([r.metrics for r in runs if r.metrics.get(key) is not None], key)
    estimate = float(values.values.mean())
    return replicate_interval(estimate, two_level_replicates(values.values, n_boot), len(values.seeds), level, values.per_prompt)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def setting_order(values: tuple) -> tuple:
    """A sort key for tuples of setting values: numbers in numeric order, then anything else as text."""
    return tuple((0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v)) for v in values)


def single_experiment(runs: list[Run], where: str) -> list[Run]:
    """The runs, checked to be of one experiment (figures compare runs of one experiment)."""
    names = sorted({r.experiment for r in runs})
    if len(names) > 1:
        homes = {name: {r.folder.parent for r in runs if r.experiment == name and r.folder is not None} for name in names}
        own = [home for name in names if len(homes[name]) == 1 for home in homes[name]
               if not any(home in homes[other] for other in names if other != name)]
        hint = (f"plot one experiment's directory, e.g. {own[0]}" if own else
                "move each experiment's runs to a directory of its own and plot that")
        raise ConfigError(f"{where} holds runs of {len(names)} experiments ({', '.join(names)}); {hint}")
    return runs
