"""The `alignbench` command line.

User errors (bad config keys, values, files, method names) print one message naming
what is wrong and what is accepted, and exit with status 2 — no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

from alignbench.config import ConfigError, at_least_one
from alignbench.log import quiet_libraries
from alignbench.processes import in_forked_child

EXIT_USER_ERROR = 2

_MODULE_COMMANDS = [
    ("sweep", "alignbench.sweep", "methods x seeds x a grid of overrides, in worker processes; skips finished runs"),
    ("tune", "alignbench.tune", "an Optuna search over each method's hyperparameters (validation split), then the best config on fresh seeds"),
    ("plot", "alignbench.analysis.plot", "paper-style figures and tables of an experiment directory into DIR/figures/"),
    ("judge-report", "alignbench.judge_report", "each judge's agreement with gold, position bias and label cost"),
]


def _quiet_environment() -> None:
    # No network at run time: W&B offline unless configured, HF telemetry off; and keep
    # third-party warnings that mean nothing to a user off the console.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*predefined.*")
    warnings.filterwarnings("ignore", message=".*transfer_batch_to_device.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _print_results(directory: Path, fmt: str) -> None:
    """One row per policy: runs grouped by their whole config except the seed (analysis/tables.py)."""
    from alignbench.analysis.tables import print_results

    try:
        text = print_results(directory, fmt)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    print(text, end="")


# Commands that read --out only (or not at all): they may run with a --out that is not a folder.
_NOT_WRITING_OUT = ("results", "methods")
_READS_RESULTS_ONLY = ("results", "plot")  # commands that load no model (tests/test_plots.py checks that they import no torch or transformers)


def check_out_folder(out: str) -> None:
    """--out must be a folder or a path where one can be made: a file there (or in its way) is a
    ConfigError now rather than a traceback after the stages were built."""
    if not out.strip():  # Path("") is the working directory: the stages and runs would land there
        raise ConfigError("--out is empty; give it a folder (it is made if missing), e.g. --out runs, the default")
    path = Path(out)
    for part in [path, *path.parents]:
        if part.exists():
            if not part.is_dir():
                what = f"--out {out}" if part == path else f"--out {out}: {part}"
                raise ConfigError(f"{what} is a file, not a folder; give --out a folder (it is made if missing), e.g. --out runs")
            return


def warn_unread_overrides(overrides: list[str], methods: list[str]) -> None:
    from alignbench.experiment import unread_overrides
    from alignbench.log import warn

    for key in unread_overrides(overrides, methods):
        warn(f"{key} is not read: it is an option of {key.split('.')[0]}, and this runs {', '.join(methods)}")


def cmd_run(args) -> None:
    from alignbench.experiment import for_run, load_experiment, run_name
    from alignbench.processes import freeze_imported_objects
    from alignbench.runner import run_one

    freeze_imported_objects()
    config = load_experiment(args.experiment, args.overrides)
    run_config = for_run(config)
    name = run_name(run_config)
    warn_unread_overrides(args.overrides, [run_config.method])
    if args.expect_run_name and name != args.expect_run_name:
        # A sweep names each run before starting its process; the names differ when alignbench
        # or the experiment file changed since. Running anyway would finish a run the sweep does
        # not know, and the sweep's rerun would add a second row for it.
        raise ConfigError(
            f"this run resolves to {name}, but the sweep that started it expects "
            f"{args.expect_run_name}: alignbench or the experiment file changed while the sweep ran; rerun the sweep"
        )
    result = run_one(config, Path(args.out))
    metrics = result["metrics"]
    keys = [k for k in metrics if k.startswith("eval/") and not k.endswith(("_ci_low", "_ci_high"))]
    for key in keys:
        ci = f" [{metrics.get(key + '_ci_low', float('nan')):.3f}, {metrics.get(key + '_ci_high', float('nan')):.3f}]" if key + "_ci_low" in metrics else ""
        print(f"{key:28s} {metrics[key]:.4f}{ci}")
    print(f"results: {Path(args.out) / result['experiment'] / result['run_name']}")


def _quickstart_plan(experiment: str, overrides: list[str]) -> tuple[str, list[int], bool, int]:
    """The experiment's name, seeds, whether it trains distributed, and the machine's GPU count;
    loading it checks the whole config (a ConfigError names what is wrong)."""
    quiet_libraries()
    import torch

    from alignbench.experiment import load_experiment

    config = load_experiment(experiment, overrides)
    warn_unread_overrides(overrides, [config.method] if config.method else list(config.methods))
    return config.name, list(config.seeds), config.trainer.distributed, torch.cuda.device_count() if torch.cuda.is_available() else 0


def cmd_quickstart(args) -> int:
    started = time.perf_counter()
    # The parent of worker processes only waits for them, then writes the table and figures:
    # loading the experiment in a child keeps torch out of it, and ~450 MB off the quickstart's memory.
    if args.workers != 1 and not args.worker:
        name, seeds, distributed, gpus = in_forked_child(_quickstart_plan, args.experiment, list(args.overrides))
    else:
        name, seeds, distributed, gpus = _quickstart_plan(args.experiment, list(args.overrides))
    # One process per core at most: three one-thread processes on two cores do the same work in the
    # same time as two (measured), and each holds ~0.9 GB.
    workers = args.workers or min(len(seeds), os.cpu_count() or 1)
    if workers > 1 and len(seeds) > 1 and not distributed and not args.worker:
        from alignbench.sweep import run_quickstart_workers

        folder = Path(args.out) / name
        failed = [f"worker {slot} (its log: {folder / 'logs' / f'worker{slot}.log'})"
                  for slot in run_quickstart_workers(args.experiment, list(args.overrides), Path(args.out), folder, workers, gpus=gpus)]
    else:
        quiet_libraries()
        from alignbench.experiment import load_experiment
        from alignbench.processes import freeze_imported_objects
        from alignbench.runner import run_experiment_runs

        freeze_imported_objects()
        failed = run_experiment_runs(load_experiment(args.experiment, args.overrides), Path(args.out), shared=args.worker)
    if not args.worker and any((Path(args.out) / name).glob("*/metrics.json")):  # a worker leaves the table and figures to the parent
        print()
        _print_results(Path(args.out) / name, "md")
        from alignbench.analysis.plot import plot_directory

        figures = plot_directory(Path(args.out) / name)
        print(f"quickstart finished in {time.perf_counter() - started:.0f}s; results in {Path(args.out) / name}, "
              f"{len(figures)} figure files in {Path(args.out) / name / 'figures'}")
    if failed:
        print(f"alignbench: error: failed: {'; '.join(failed)}. Run the same command again to retry what did not finish "
              "(finished runs are kept)", file=sys.stderr)
        return 1
    return 0


def cmd_results(args) -> None:
    _print_results(Path(args.directory), args.format)


def cmd_methods(args) -> None:
    from alignbench.config import describe
    from alignbench.registry import METHODS

    for name, cls in METHODS.items():
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        print(f"{name}: {doc[0] if doc else ''}")
        print(f"    needs_reference={cls.needs_reference} feedback={cls.feedback} trains={cls.trains}")
        for key, type_name, default, field_doc in describe(cls.config_class, prefix=name):
            print(f"    {key} ({type_name}) = {default!r}  {field_doc}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignbench", description="Compare alignment methods head to head.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--out", default="runs", help="output directory (default: runs)")
        p.set_defaults(func=func)
        return p

    p = add("quickstart", cmd_quickstart, "world -> SFT -> reward models -> every method and baseline -> evaluation -> table")
    p.add_argument("--experiment", default="quickstart", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=at_least_one, default=None,
                   help="processes sharing the runs of all seeds (default: one per seed, at most one per CPU core; 1: all in this process)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set for each worker process
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p = add("run", cmd_run, "one run: one method, one seed (dotted key=value or --key=value overrides)")
    p.add_argument("experiment", help="a shipped experiment name (quickstart) or a YAML path")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method=dpo dpo.beta=0.2")
    p.add_argument("--expect-run-name", default=None, help=argparse.SUPPRESS)  # set by `alignbench sweep`
    p = add("results", cmd_results, "the results table of an experiment directory")
    p.add_argument("directory")
    p.add_argument("--format", choices=["md", "csv", "latex"], default="md")
    add("methods", cmd_methods, "the registered methods and their configs")
    # Commands that live in their own modules: each has `add_arguments(parser)` and
    # `main(args)`, and keeps heavy imports inside `main` so that building the parser is cheap.
    for name, module_name, help_text in _MODULE_COMMANDS:
        module = importlib.import_module(module_name)
        p = add(name, module.main, help_text)
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # W&B agents pass --key=value: whatever argparse does not know becomes an override.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = list(args.overrides) + unknown
    _quiet_environment()
    # The libraries are quieted where they are loaded: by the quickstart, sweep and tune in their
    # workers (their parents may load none), and never by the commands that read results only
    # (importing transformers to quiet it cost `alignbench results` ~0.4 s of its 2.3 and ~20 MB).
    if args.command not in ("quickstart", "sweep", "tune") + _READS_RESULTS_ONLY:
        quiet_libraries()
    try:
        if args.command not in _NOT_WRITING_OUT:
            check_out_folder(args.out)
            from alignbench.stage_cache import stage_cache_folder

            stage_cache_folder(Path(args.out))  # a bad ALIGNBENCH_STAGE_CACHE is refused before anything is written
        code = args.func(args)  # a command returns nothing, or its exit status
    except ConfigError as err:
        print(f"alignbench: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FileNotFoundError as err:
        print(f"alignbench: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RuntimeError as err:
        # A loss became NaN (alignbench.training, imported by whatever trained: not imported here, so
        # that a command that trains nothing loads no torch).
        training = sys.modules.get("alignbench.training")
        if training is None or not isinstance(err, training.NonFiniteLossError):
            raise
        print(f"alignbench: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("alignbench: interrupted; finished runs are kept, rerun to finish the rest", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
