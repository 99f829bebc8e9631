"""Sweeps: the expansion of methods x seeds x grid x zip (deduplicated), `base:` files, the
`--key=value` form a W&B agent passes, the shipped head-to-head sweep and W&B sweep config,
and end to end on a tiny world: a failed run is retried then reported (non-zero exit), and a
finished run is skipped when the sweep runs again."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from alignbench.config import ConfigError, to_dict
from alignbench.experiment import load_experiment, run_config_dict, run_name
from alignbench.sweep import expand

# Its runs only use stages: they read and build them in the session's stage cache (conftest.py).
pytestmark = pytest.mark.usefixtures("shared_stage_cache")


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def sweep_file(tmp_path):
    return _write(tmp_path / "grid.yaml", {
        "name": "grid", "methods": ["sft", "dpo", "ppo"], "seeds": [0, 1],
        "sweep": {
            "grid": {"dpo.beta": [0.05, 0.5], "eval.temperature": [0.7, 1.0]},
            "zip": {"ppo": {"init_kl_coef": [0.01, 0.2]}, "ppo.iterations": [40, 20]},
        },
    })


def test_runs_are_methods_times_seeds_times_grid_product_times_zip_each_once(sweep_file):
    runs, spec = expand(str(sweep_file))
    assert spec.max_retries == 1
    # per seed: sft varies with eval.temperature only (2), dpo with beta x temperature (4),
    # ppo with temperature x the zipped pairs (4) -- the other values do not touch them
    assert len(runs) == 2 * (2 + 4 + 4)
    assert len({r.name for r in runs}) == len(runs)
    ppo = [r for r in runs if r.method == "ppo" and r.seed == 1]
    assert sorted((r.config.ppo.init_kl_coef, r.config.ppo.iterations, r.config.eval.temperature) for r in ppo) == [
        (0.01, 40, 0.7), (0.01, 40, 1.0), (0.2, 20, 0.7), (0.2, 20, 1.0),  # zipped: paired, never crossed
    ]
    dpo = [r for r in runs if r.method == "dpo" and r.seed == 0]
    assert sorted((r.config.dpo.beta, r.config.eval.temperature) for r in dpo) == [(0.05, 0.7), (0.05, 1.0), (0.5, 0.7), (0.5, 1.0)]
    assert {r.seed for r in runs} == {0, 1} and all(r.config.seed == r.seed and r.config.method == r.method for r in runs)
    # a run's name is that of `alignbench run` with the same overrides; its label names what it varies
    run = dpo[0]
    assert run.name == run_name(load_experiment(str(sweep_file), run.argv)) and run.name.startswith("dpo-seed0-")
    assert run.label == f"dpo beta={run.config.dpo.beta} eval.temperature={run.config.eval.temperature}"
    assert {r.label for r in runs if r.method == "sft"} == {"sft eval.temperature=0.7", "sft eval.temperature=1.0"}


def test_command_line_overrides_apply_to_every_run_and_the_grid_wins(sweep_file):
    runs, _ = expand(str(sweep_file), ["dpo.beta=0.3", "eval.n_test_prompts=100", "seeds=[4]"])
    assert {r.seed for r in runs} == {4} and all(r.config.eval.n_test_prompts == 100 for r in runs)
    assert {r.config.dpo.beta for r in runs if r.method == "dpo"} == {0.05, 0.5}


@pytest.mark.parametrize("sweep, message", [
    ({"zip": {"dpo.beta": [0.1, 0.2], "dpo.epochs": [1]}}, "sweep.zip lists must all have one length"),
    ({"grid": {"dpo.bta": [0.1]}}, "unknown config key 'dpo.bta'; did you mean 'dpo.beta'"),
    ({"grid": {"dpo.beta": ["high"]}}, "config key 'dpo.beta' must be a number"),
    ({"grid": {"seed": [1, 2]}}, "top-level 'methods' and 'seeds'"),
    ({"grid": {"dpo.beta": 0.1}}, "sweep.grid.dpo.beta must be a list"),
    ({"grid": {"dpo.beta": []}}, "empty list"),
    ({"max_retries": -1}, "sweep.max_retries=-1 must be >= 0"),
    ({"grids": {}}, "unknown config key 'sweep.grids'"),
    # each once expanded quietly to fewer runs than the file asks for
    ({"grid": {"ppo.clip_range": [0.1, 0.2]}}, "sweep.grid.ppo.clip_range: no run of this sweep reads this key (methods: dpo)"),
    ({"grid": {"dpo.beta": [0.1], "dpo": {"beta": [0.2]}}}, "sweep.grid: dpo.beta is given twice (as a dotted key and inside its section)"),
    ({"grid": {"dpo.beta": [0.1, 0.1]}}, "sweep.grid.dpo.beta=[0.1, 0.1] lists 0.1 more than once"),
])
def test_bad_sweep_sections_name_the_key(tmp_path, sweep, message):
    path = _write(tmp_path / "bad.yaml", {"methods": ["dpo"], "sweep": sweep})
    with pytest.raises(ConfigError, match=re.escape(message)):
        expand(str(path))


def test_base_file_is_merged_under_the_sweep_and_its_own_sweep_is_not_inherited(tmp_path):
    _write(tmp_path / "parent.yaml", {"name": "parent", "methods": ["dpo"], "dpo": {"beta": 0.3, "epochs": 2}, "sweep": {"grid": {"dpo.beta": [1.0]}}})
    child = _write(tmp_path / "child.yaml", {"base": "parent.yaml", "dpo": {"epochs": 3}, "seeds": [5]})
    config = load_experiment(str(child))
    assert (config.name, config.dpo.beta, config.dpo.epochs, config.seeds) == ("child", 0.3, 3, [5])
    runs, _ = expand(str(child))
    assert [(r.method, r.seed, r.config.dpo.beta) for r in runs] == [("dpo", 5, 0.3)]
    _write(tmp_path / "parent.yaml", {"base": "child.yaml"})
    with pytest.raises(ConfigError, match="'base' loops back"):
        load_experiment(str(child))


def test_head_to_head_is_every_registered_method_on_three_seeds_with_the_quickstart_settings():
    from alignbench.registry import METHODS

    quickstart, head_to_head = load_experiment("quickstart"), load_experiment("head_to_head")
    assert sorted(head_to_head.methods) == sorted(METHODS) and head_to_head.seeds == [0, 1, 2]
    for section in ("world", "model", "sft", "labels", "reward_model", "eval", "dpo", "ppo"):  # same stages, same caches
        assert to_dict(getattr(head_to_head, section)) == to_dict(getattr(quickstart, section)), section
    runs, _ = expand("head_to_head")
    assert len(runs) == len(head_to_head.methods) * 3 and all(r.config.name == "head_to_head" for r in runs)


def _resolved_by_cli(monkeypatch, argv: list[str]):
    """What `alignbench run ...` resolves, without running it."""
    import alignbench.runner
    from alignbench.cli import main

    seen = {}
    def fake_run_one(config, out):
        seen["config"] = config
        return {"experiment": config.name, "run_name": "-", "metrics": {}}

    monkeypatch.setattr(alignbench.runner, "run_one", fake_run_one)
    main(argv)
    return seen["config"]


def test_dash_dash_key_value_resolves_exactly_like_key_value(monkeypatch):
    plain = _resolved_by_cli(monkeypatch, ["run", "head_to_head", "method=dpo", "seed=2", "dpo.beta=0.25", "dpo.optim.lr=3e-5", "ppo.kl_controller=adaptive"])
    dashed = _resolved_by_cli(monkeypatch, ["run", "head_to_head", "--method=dpo", "--seed=2", "--dpo.beta=0.25", "--dpo.optim.lr=3e-5", "--ppo.kl_controller=adaptive"])
    assert run_config_dict(plain) == run_config_dict(dashed) and run_name(plain) == run_name(dashed)
    assert (dashed.dpo.beta, dashed.dpo.optim.lr, dashed.ppo.kl_controller, dashed.seed) == (0.25, 3e-5, "adaptive", 2)


def test_wandb_sweep_config_runs_alignbench_run_with_each_parameter(monkeypatch):
    """The agent runs the config's `command` with ${args} -> --key=value for every parameter."""
    from alignbench.experiment import is_wandb_sweep, shipped_experiments

    path = Path(__file__).parents[1] / "experiments" / "wandb_sweep.yaml"
    sweep = yaml.safe_load(path.read_text())
    assert is_wandb_sweep(sweep) and "wandb_sweep" not in shipped_experiments()
    with pytest.raises(ConfigError, match="W&B sweep config"):
        load_experiment(str(path))
    command = [c for c in sweep["command"] if c != "${env}"]
    assert command[:2] == ["alignbench", "run"] and command[-1] == "${args}"
    sample = {}
    for key, spec in sweep["parameters"].items():  # one value from each parameter's range
        sample[key] = spec["values"][-1] if "values" in spec else spec["min"]
    argv = command[1:-1] + [f"--{k}={v}" for k, v in sample.items()]
    config = _resolved_by_cli(monkeypatch, argv)
    for key, value in sample.items():
        node = config
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value, key
    assert sweep["metric"]["name"].startswith("val/")  # searched on validation, reported on test
    assert config.eval.eval_every > 0  # so the validation metric is logged during training


# --- end to end on a tiny world ------------------------------------------------------------
def test_a_failed_run_is_retried_then_reported_and_a_finished_run_is_skipped(tmp_path, capsys):
    from alignbench.cli import main
    from tests.conftest import TINY_OVERRIDES

    # dpo at an absurd learning rate reaches a NaN loss in every attempt; sft just evaluates
    path = _write(tmp_path / "failing.yaml", {
        "name": "failing", "methods": ["sft", "dpo"], "seeds": [0], "tracking": {"wandb": "disabled"},
        "sweep": {"grid": {"dpo.optim.lr": [1.0e30]}, "max_retries": 1},
    })
    out = tmp_path / "runs"
    argv = ["sweep", str(path), "--workers", "2", "--out", str(out), *TINY_OVERRIDES, "dpo.optim.grad_clip=0"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    status = json.loads((out / "failing" / "sweep.json").read_text())
    runs = {r["method"]: r for r in status["runs"]}
    assert runs["sft"]["status"] == "finished" and runs["sft"]["attempts"] == 1
    assert runs["dpo"]["status"] == "failed" and runs["dpo"]["attempts"] == 2 and runs["dpo"]["exit_code"] == 1
    assert status["failed"] == [runs["dpo"]["run_name"]]
    assert runs["dpo"]["run_name"] in captured.err and "FAILED after retries" in captured.err
    log = Path(runs["dpo"]["log"]).read_text()
    assert log.count("--- attempt") == 2 and "at training step" in log
    assert "| eval/win_rate" in captured.out and "| sft" in captured.out  # the finished run's table

    with pytest.raises(SystemExit):
        main(argv + ["sweep.max_retries=0"])
    again = json.loads((out / "failing" / "sweep.json").read_text())
    runs = {r["method"]: r for r in again["runs"]}
    assert runs["sft"]["attempts"] == 0 and runs["sft"]["status"] == "finished"  # skipped: not started again
    assert runs["dpo"]["attempts"] == 1 and runs["dpo"]["status"] == "failed"
    assert "2 runs, 1 finished, 1 to run" in capsys.readouterr().out
    # a finished run whose metrics.json was cut short is listed as one to run, naming the file
    metrics = out / "failing" / runs["sft"]["run_name"] / "metrics.json"
    metrics.write_text(metrics.read_text()[:100])
    assert main([*argv, "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert f"to run    {runs['sft']['run_name']}" in captured.out and f"{metrics} cannot be read" in captured.err


def test_runs_that_share_a_worker_process_give_the_numbers_each_gives_alone(tmp_path):
    """A sweep's worker process runs its runs one after another; the second one's metrics must
    be those it has in a process of its own (here: run in this one, after whatever tests ran
    before), and each run's output must go to its own log."""
    from alignbench.cli import main
    from tests.conftest import TINY_OVERRIDES

    path = _write(tmp_path / "pair.yaml", {"name": "pair", "methods": ["dpo", "rejection_sampling"], "seeds": [0], "tracking": {"wandb": "disabled"}})
    out = tmp_path / "runs"
    main(["sweep", str(path), "--workers", "1", "--out", str(out), *TINY_OVERRIDES])
    status = json.loads((out / "pair" / "sweep.json").read_text())
    assert [r["status"] for r in status["runs"]] == ["finished", "finished"]
    names = {r["method"]: r["run_name"] for r in status["runs"]}
    worker_log = (out / "pair" / "logs" / "worker0.log").read_text()
    pids = {line.split()[3] for line in worker_log.splitlines() if ": running " in line}
    assert len(pids) == 1 and all(f"running {name}" in worker_log for name in names.values())  # one process ran both
    for method, name in names.items():
        run_log = (out / "pair" / name / "run.log").read_text()
        assert "eval/win_rate" in run_log and f"results: {out / 'pair' / name}" in run_log
        assert all(other not in run_log for other in names.values() if other != name)
    assert "eval/win_rate" not in worker_log

    alone = tmp_path / "alone"
    assert main(["run", str(path), "method=rejection_sampling", *TINY_OVERRIDES, "--out", str(alone)]) == 0
    timing = ("budget/wall_s", "budget/stage_s")
    in_worker, by_itself = (json.loads((folder / "pair" / names["rejection_sampling"] / "metrics.json").read_text()) for folder in (out, alone))
    assert {k: v for k, v in in_worker["metrics"].items() if k not in timing} == {k: v for k, v in by_itself["metrics"].items() if k not in timing}


@pytest.mark.usefixtures("shared_stage_cache")
def test_the_sweep_parent_of_worker_processes_loads_no_torch(tmp_path, tiny_overrides):
    """The parent only hands runs to its workers and waits: it loads the configs and builds the
    shared stages in a forked child, so that torch, transformers and Lightning (~400 MB) are not
    held beside the workers for the whole sweep. A bad config is still refused at once, by the
    parent, with status 2 and no traceback."""
    import subprocess
    import sys
    import textwrap

    path = _write(tmp_path / "pair.yaml", {"name": "pair", "methods": ["sft", "dpo"], "seeds": [0], "tracking": {"wandb": "disabled"}})
    code = textwrap.dedent("""
        import json, os, sys
        import alignbench.sweep

        def worker_started(self, env, log_path):
            loaded = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "lightning", "numpy", "pandas"})
            print(json.dumps({"loaded": loaded}), flush=True)
            os._exit(0)

        alignbench.sweep._SweepWorker.__init__ = worker_started
        from alignbench.cli import main
        sys.exit(main(["sweep", *sys.argv[1:]]))
    """)
    done = subprocess.run([sys.executable, "-c", code, str(path), "--out", str(tmp_path / "runs"), *tiny_overrides], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"loaded": []}
    assert "sweep pair: 2 runs, 0 finished, 2 to run" in done.stdout  # the child's plan reached the parent
    bad = subprocess.run([sys.executable, "-m", "alignbench", "sweep", str(path), "dpo.beta=abc", "--out", str(tmp_path / "bad"), *tiny_overrides],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "config key 'dpo.beta' must be a number, got 'abc'" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad" / "pair").exists()


def test_a_worker_killed_in_a_run_or_waiting_for_one_reports_the_run_as_failed_by_its_signal(tmp_path):
    """A worker process that dies (the OOM killer, a kill -9) ends its run as a failed attempt that
    the sweep retries in a fresh process: the exit status is the signal's, never a hang or a crash
    of the sweep, whether it died in the run or before it was given one."""
    import os
    import signal
    import time

    from alignbench.sweep import _SweepWorker

    for given_a_run_first in (True, False):
        worker = _SweepWorker(dict(os.environ), tmp_path / "worker.log")
        if given_a_run_first:
            worker.start("a-run", ["methods"], tmp_path / "run.log")
        worker.process.kill()
        worker.process.wait()
        if not given_a_run_first:
            worker.start("a-run", ["methods"], tmp_path / "run.log")  # into a closed pipe: no exception
        deadline = time.monotonic() + 30
        while (status := worker.poll()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == -signal.SIGKILL


def test_a_sweep_run_whose_config_resolves_differently_refuses_to_start(tmp_path, capsys):
    """`alignbench sweep` passes each worker the run name it expects; a worker whose config now
    resolves to another name (alignbench or the file changed mid-sweep) must not run, or the
    sweep's rerun would add a second row for the same method and seed."""
    from alignbench.cli import main
    from tests.conftest import TINY_OVERRIDES

    path = _write(tmp_path / "one.yaml", {"name": "one", "methods": ["sft"], "seeds": [0], "tracking": {"wandb": "disabled"}})
    out = tmp_path / "runs"
    code = main(["run", str(path), "method=sft", "seed=0", *TINY_OVERRIDES, "--out", str(out), "--expect-run-name", "sft-seed0-00000000"])
    assert code == 2
    err = capsys.readouterr().err
    assert "expects sft-seed0-00000000" in err and "rerun the sweep" in err
    assert not out.exists() or not list(out.rglob("metrics.json"))


def test_the_forked_child_that_reads_the_experiment_dies_with_its_parent(tmp_path):
    """The quickstart's, sweep's and tune's parents read the experiment and build the stages in a
    forked child (`in_forked_child`); a parent killed meanwhile left that child building, an orphan."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    script = textwrap.dedent("""
        import os, sys, time
        from alignbench.processes import in_forked_child

        def child(path):
            with open(path, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(120)

        in_forked_child(child, sys.argv[1])
    """)
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", script, str(pid_file)])
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait()

    def alive(pid: int) -> bool:
        try:
            state = next(line for line in open(f"/proc/{pid}/status") if line.startswith("State:"))
        except (FileNotFoundError, ProcessLookupError):
            return False
        return "Z" not in state.split()[1]  # a zombie has died; only its parent's reaping is left

    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the forked child outlived its parent")
