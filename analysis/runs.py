"""The runs of one experiment, from its directory or from the W&B API, and how they differ.

A figure needs to know which runs are the same policy at different seeds and which differ in a
setting (a swept β, a model size, a temperature). Each run's resolved config says so: runs of a
method whose flattened configs differ in some keys (other than the seed) are different
*variants*, labelled by those keys (`dpo (beta=0.5)`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignbench.analysis.tables import find_run_dirs

from alignbench.config import ConfigError

# Keys that say how a run was executed or tracked, or which run of a sweep it is: never a
# setting that tells two policies apart.
_NOT_A_SETTING = ("name", "method", "methods", "seed", "seeds", "tracking", "trainer")
BASELINES = ("sft", "best_of_n", "best_of_n_gold")


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

    def setting(self, key: str, default: Any = None) -> Any:
        return self.settings.get(key, default)


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to hashable leaves (lists become tuples)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = tuple(value) if isinstance(value, list) else value
    return flat


def _settings(config: dict) -> dict[str, Any]:
    return {k: v for k, v in flatten(config).items() if k.split(".")[0] not in _NOT_A_SETTING}


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_local_runs(directory: Path) -> list[Run]:
    """Every finished run (with a metrics.json) under an experiment directory."""
    runs = []
    for run_dir in find_run_dirs(Path(directory)):
        result = json.loads((run_dir / "metrics.json").read_text())
        samples = run_dir / "samples.jsonl"
        runs.append(Run(
            experiment=result["experiment"], name=result["run_name"], method=result["method"], seed=int(result["seed"]),
            config=result.get("config", {}), metrics=result.get("metrics", {}), history=_read_jsonl(run_dir / "history.jsonl"),
            samples_path=samples if samples.exists() else None, settings=_settings(result.get("config", {})),
        ))
    return runs


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

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.runs})


def group_runs(runs: list[Run], ignore: Callable[[str, str], bool] = lambda key, method: False) -> list[Group]:
    """Group each method's runs by their settings, leaving out keys where `ignore(key, method)`.

    The label is the method, plus the settings that differ between its groups (`dpo (beta=0.5)`).
    Groups come in method order, then in the order of their differing values.
    """
    groups: list[Group] = []
    for method in method_order(r.method for r in runs):
        mine = [r for r in runs if r.method == method]
        keys = sorted({k for r in mine for k in r.settings if not ignore(k, method)})
        varying = [k for k in keys if len({_hashable(r.settings.get(k)) for r in mine}) > 1]
        by_setting: dict[tuple, list[Run]] = {}
        for r in mine:
            by_setting.setdefault(tuple(_hashable(r.settings.get(k)) for k in varying), []).append(r)
        for values in sorted(by_setting, key=setting_order):
            differing = dict(zip(varying, values))
            label = method if not varying else f"{method} (" + ", ".join(f"{_short_key(k, method)}={_format_value(v)}" for k, v in differing.items()) + ")"
            groups.append(Group(method, label, sorted(by_setting[values], key=lambda r: r.seed), differing))
    return groups


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def setting_order(values: tuple) -> tuple:
    """A sort key for tuples of setting values: numbers in numeric order, then anything else as text."""
    return tuple((0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v)) for v in values)


def single_experiment(runs: list[Run], where: str) -> list[Run]:
    """The runs, checked to be of one experiment (figures compare runs of one experiment)."""
    names = sorted({r.experiment for r in runs})
    if len(names) > 1:
        raise ConfigError(f"{where} holds runs of {len(names)} experiments ({', '.join(names)}); plot one experiment's directory, e.g. {where}/{names[0]}")
    return runs
