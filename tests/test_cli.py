"""Every CLI entry point, and every kind of bad input: a clear message and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from alignbench.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alignbench", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "quickstart", "method=dpo", "dpo.betta=0.2"], "did you mean 'dpo.beta'"),
        (["run", "quickstart", "method=dpo", "sft.epochs=two"], "'sft.epochs' must be an integer"),
        (["run", "quickstart", "method=dpo", "dpo.beta=-1"], "beta=-1"),
        (["run", "quickstart", "method=dpq"], "did you mean 'dpo'"),
        (["run", "quickstart", "eval.judge=humans"], "eval.judge"),
        (["run", "no_such_experiment"], "no experiment named 'no_such_experiment'"),
        (["run", "missing.yaml"], "experiment file not found: missing.yaml"),
        (["run", "quickstart", "dpo.beta"], "bad override 'dpo.beta'"),
        (["run", "quickstart"], "choose one with method=NAME"),
        (["run", "quickstart", "method=sft", "reward_model.architecture=sequence_classification"], "set reward_model.likelihood=none"),
        (["judge-report", "quickstart", "--pairs", "-5"], "--pairs=-5 must be >= 1"),
        (["judge-report", "quickstart", "--pairs", "0"], "--pairs=0 must be >= 1"),
    ],
)
def test_bad_input_names_the_problem_and_exits_2(args, expected, tmp_path, capsys):
    assert main([*args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("metrics.json")) and not (tmp_path / "cache").exists()  # no stage built either


@pytest.mark.parametrize("args", [["quickstart", "--workers", "0"], ["sweep", "frontier", "--workers", "-3", "--dry-run"],
                                  ["tune", "tune_dpo", "--workers", "0"], ["tune", "tune_dpo", "--n-trials", "0"]])
def test_a_count_option_below_one_exits_2_naming_it(args, tmp_path, capsys):
    """quickstart --workers 0 used to run the default number of workers (0 is false)."""
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    option = next(a for a in args if a in ("--workers", "--n-trials"))
    assert f"argument {option}: {args[args.index(option) + 1]} must be >= 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_an_empty_out_is_refused_not_read_as_the_working_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "quickstart", "method=sft", "--out="]) == 2
    assert "--out is empty; give it a folder" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_quickstart_parent_of_worker_processes_loads_no_torch(tmp_path):
    """The parent only waits for its worker processes, then writes the table and figures: it loads the
    experiment in a forked child, so that torch, transformers and Lightning (~450 MB) are not held a
    fourth time while the seeds run. A bad config is still refused at once, by the parent, with status 2."""
    code = textwrap.dedent("""
        import json, os, sys
        import alignbench.sweep

        def workers_started(experiment, overrides, out, folder, workers, gpus=None):
            print(json.dumps({"torch": "torch" in sys.modules, "workers": workers}), flush=True)
            os._exit(0)

        alignbench.sweep.run_quickstart_workers = workers_started
        from alignbench.cli import main
        sys.exit(main(["quickstart", "--out", sys.argv[1]]))
    """)
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # one worker per seed, at most one per core
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"torch": False, "workers": min(3, os.cpu_count() or 1)}
    bad = run_cli("quickstart", "dpo.beta=abc", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "config key 'dpo.beta' must be a number, got 'abc'" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad" / "quickstart").exists()


def test_malformed_yaml_names_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmethods: [dpo\nseeds: [0]\n")
    assert main(["run", str(bad), "--out", str(tmp_path)]) == 2
    assert "invalid YAML" in capsys.readouterr().err


def test_results_of_a_missing_directory_is_a_user_error(tmp_path, capsys):
    assert main(["results", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_methods_lists_every_registered_method_with_its_options(capsys):
    from alignbench.registry import METHODS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert f"{name}:" in out
    assert "dpo.beta (float) = 0.1" in out


def test_every_shipped_experiment_loads_and_validates():
    from alignbench.experiment import load_experiment, shipped_experiments

    shipped = shipped_experiments()
    assert "quickstart" in shipped
    for name in shipped:
        config = load_experiment(name)
        assert config.methods


def test_key_value_and_dash_dash_forms_resolve_identically():
    from alignbench.config import to_dict
    from alignbench.experiment import load_experiment

    a = load_experiment("quickstart", ["dpo.beta=0.3", "eval.n_test_prompts=100"])
    b = load_experiment("quickstart", ["--dpo.beta=0.3", "--eval.n_test_prompts=100"])
    assert to_dict(a) == to_dict(b)
    assert a.dpo.beta == 0.3


def test_an_option_of_a_method_that_does_not_run_is_named(capsys):
    """`alignbench run quickstart method=dpo ppo.clip_range=0.9` runs dpo as if ppo.clip_range were
    not given: accepted (a sweep sets many methods' options), and named on stderr."""
    from alignbench.cli import warn_unread_overrides
    from alignbench.experiment import unread_overrides

    overrides = ["method=dpo", "dpo.beta=0.2", "ppo.clip_range=0.9", "--grpo.group_size=4", "eval.seed=1", "sft.lr=1e-3"]
    assert unread_overrides(overrides, ["dpo"]) == ["ppo.clip_range", "grpo.group_size"]  # sft and eval are shared sections
    assert unread_overrides(overrides, ["dpo", "ppo", "grpo"]) == []
    warn_unread_overrides(overrides, ["dpo"])
    err = capsys.readouterr().err
    assert "ppo.clip_range is not read: it is an option of ppo, and this runs dpo" in err
    assert "grpo.group_size is not read" in err and "dpo.beta" not in err


def test_console_script_runs_from_another_directory(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "alignbench", "methods"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "dpo" in proc.stdout


def test_an_installed_wheel_would_hold_every_module_and_shipped_experiment():
    """The README installs editable, which finds every module in the checkout; a wheel (`pip install
    .`, or from an index) holds only the packages pyproject.toml lists and their package data. A
    subpackage missing there (alignbench.stages was, from 2aed578 on) breaks every
    non-editable install at its first run while the tests pass."""
    tomllib = pytest.importorskip("tomllib")
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    setuptools_config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, folders, data = set(setuptools_config["packages"]), setuptools_config["package-dir"], setuptools_config["package-data"]

    def folder_of(package: str) -> Path:  # setuptools' rule: the longest mapped parent, then one folder per name
        parent = max((p for p in folders if package == p or package.startswith(p + ".")), key=len)
        return root / folders[parent] / Path(*package[len(parent):].split(".")[1:])

    found = set()
    for top, folder in folders.items():
        for init in (root / folder).rglob("__init__.py"):
            found.add(".".join([top, *init.parent.relative_to(root / folder).parts]))
    assert found - listed == set(), f"packages with modules that a wheel would leave out: {sorted(found - listed)}"
    shipped = {p.resolve() for p in (root / folders["alignbench.experiments"]).rglob("*.yaml")}
    packaged = {p.resolve() for package, patterns in data.items() for pattern in patterns for p in folder_of(package).glob(pattern)}
    assert shipped - packaged == set(), f"shipped experiments that a wheel would leave out: {sorted(map(str, shipped - packaged))}"
    for package in listed:  # a listed package without a folder makes the build fail
        assert folder_of(package).is_dir(), package


def test_a_folder_named_like_a_shipped_experiment_does_not_hide_it(tmp_path, monkeypatch):
    """`--out .` writes ./quickstart/; `alignbench run quickstart` from there still means the shipped file."""
    from alignbench.experiment import find_experiment, shipped_experiments

    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").mkdir()
    assert find_experiment("quickstart") == shipped_experiments()["quickstart"]
    shipped_experiments().clear()  # a caller's copy: the list read once a process stays whole
    assert find_experiment("quickstart") == shipped_experiments()["quickstart"]
    (tmp_path / "mine.yaml").write_text("name: mine\n")
    assert find_experiment("mine.yaml").resolve() == (tmp_path / "mine.yaml").resolve()


def test_released_memory_goes_back_to_the_system():
    # What the quickstart's worker processes do between runs and stage builds: freed small tensors
    # stay in the C heap (RSS unchanged) until release_freed_memory trims it.
    import torch

    from alignbench.processes import release_freed_memory

    def rss_mb() -> float:
        return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc and glibc's malloc_trim")
    tensors = [torch.ones(2048) for _ in range(20000)]  # 8 KB each: ~160 MB from malloc's heap
    held = rss_mb()
    del tensors
    release_freed_memory()
    assert rss_mb() < held - 100


def test_the_imports_objects_are_frozen_once_and_later_cycles_still_collected():
    # What a process does before its first run: the garbage collector stops walking the imported
    # libraries' objects, and still frees the reference cycles a run leaves (its trainer, models).
    import gc
    import weakref

    from alignbench import processes

    processes.freeze_imported_objects()
    frozen = gc.get_freeze_count()
    assert frozen > 0

    class Node:
        pass

    node = Node()
    node.self = node  # a cycle: only the collector frees it
    alive = weakref.ref(node)
    processes.freeze_imported_objects()  # once per process: this node is not frozen
    # (not `==`: a frozen object freed since, by another thread of this pytest worker say, leaves the count)
    assert gc.get_freeze_count() <= frozen
    del node
    gc.collect()
    assert alive() is None


@pytest.mark.usefixtures("shared_stage_cache")
def test_a_library_run_leaves_the_callers_objects_unfrozen_and_the_run_command_freezes_them(tmp_path, tiny_overrides):
    # runner.run_one may run inside a notebook, whose objects must stay collectable; the
    # `alignbench run` command freezes the libraries' objects before its run. A fresh process:
    # this one's freeze count depends on which tests ran in it before.
    script = textwrap.dedent(f"""
        import gc, sys
        from pathlib import Path
        from alignbench.cli import main
        from alignbench.experiment import load_experiment
        from alignbench.runner import run_one

        overrides = sys.argv[1:]
        run_one(load_experiment("quickstart", overrides + ["method=sft"]), Path({str(tmp_path / "library")!r}))
        assert gc.get_freeze_count() == 0, gc.get_freeze_count()
        assert main(["run", "quickstart", "method=sft", *overrides, "--out", {str(tmp_path / "command")!r}]) == 0
        assert gc.get_freeze_count() > 0
        print("both ran")
    """)
    done = subprocess.run([sys.executable, "-c", script, *tiny_overrides], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("both ran"), done.stderr[-3000:]
    assert len(list(tmp_path.glob("*/quickstart/*/metrics.json"))) == 2


def test_the_tests_run_offline_with_every_cache_in_a_temporary_home(isolated_environment):
    """The libraries read these settings once, when first imported (which collecting the test
    modules does): tests/conftest.py must have set them before, not in a fixture."""
    import datasets
    import matplotlib
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    home = isolated_environment.resolve()
    for folder in (constants.HF_HOME, constants.HF_HUB_CACHE, datasets.config.HF_DATASETS_CACHE, matplotlib.get_configdir()):
        assert Path(folder).resolve().is_relative_to(home), folder
