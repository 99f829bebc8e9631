"""Hostile inputs (issue 21), one test per case: each asserts the exit code, the message, and that
nothing outside --out changed (nor, where a cache exists, anything in it). In-process through
`alignbench.cli.main`, which returns the exit code."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from alignbench.cli import main


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> sha256), and every folder (-> 'dir')."""
    found = {}
    for path in sorted(Path(root).rglob("*")):
        key = str(path.relative_to(root))
        found[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.err


@pytest.fixture
def world(tmp_path):
    """A folder holding an input file area and --out; the test's whole tree is compared after."""
    (tmp_path / "in").mkdir()
    (tmp_path / "work").mkdir()
    return tmp_path


@pytest.mark.parametrize("name", ["../../escape", "/tmp/alignbench-escape-abs", "a/b", "..", "", " x"])
def test_an_experiment_name_that_would_leave_out_is_refused_in_the_yaml(world, name, capsys):
    experiment = world / "in" / "exp.yaml"
    experiment.write_text(f"base: quickstart\nname: {name!r}\nmethod: sft\n")
    before = snapshot(world)
    rc, err = run_cli(["run", str(experiment), "--out", str(world / "work" / "out")], capsys)
    assert rc == 2
    assert f"name={name!r} must be a plain folder name" in err and "inside --out" in err
    assert snapshot(world) == before
    assert not Path("/tmp/alignbench-escape-abs").exists()


def test_an_absolute_experiment_name_on_the_command_line_is_refused(world, capsys):
    target = world / "elsewhere"
    before = snapshot(world)
    rc, err = run_cli(["run", "quickstart", "method=sft", f"name={target}", "--out", str(world / "work" / "out")], capsys)
    assert rc == 2 and f"name={str(target)!r} must be a plain folder name" in err
    assert snapshot(world) == before and not target.exists()


def test_an_output_folder_that_a_symlink_takes_outside_out_is_refused(world):
    from alignbench.config import ConfigError
    from alignbench.experiment import output_folder

    out = world / "work" / "out"
    out.mkdir(parents=True)
    (out / "quickstart").symlink_to(world / "in", target_is_directory=True)
    with pytest.raises(ConfigError, match="not a folder inside --out"):
        output_folder(out, "quickstart", "sft-seed0-abc")
    assert output_folder(out, "other", "sft-seed0-abc") == out / "other" / "sft-seed0-abc"


@pytest.mark.parametrize("where", ["out", "parent"])
def test_out_pointing_at_a_file_is_refused(world, where, capsys):
    blocker = world / "work" / "results.txt"
    blocker.write_text("not a folder\n")
    out = blocker if where == "out" else blocker / "runs"
    before = snapshot(world)
    rc, err = run_cli(["run", "quickstart", "method=sft", "--out", str(out)], capsys)
    assert rc == 2 and f"--out {out}" in err and "is a file, not a folder" in err
    assert snapshot(world) == before


def test_an_empty_experiment_file_is_refused_naming_it(world, capsys):
    experiment = world / "in" / "empty.yaml"
    experiment.write_text("# nothing here yet\n")
    before = snapshot(world)
    rc, err = run_cli(["run", str(experiment), "--out", str(world / "work" / "out")], capsys)
    assert rc == 2 and f"{experiment} is empty" in err
    assert snapshot(world) == before


def _sampling_and_learning_rate_keys() -> list[tuple[str, list]]:
    """Every temperature, learning rate and top_p of the experiment config, with values it must refuse."""
    from alignbench.config import describe
    from alignbench.experiment import ExperimentConfig

    cases = []
    for key, type_name, _, _ in describe(ExperimentConfig):
        leaf = key.split(".")[-1]
        if leaf.endswith("temperatures"):
            cases.append((key, [[-0.5], [float("nan")], [float("inf")]]))
        elif leaf.endswith("temperature") and type_name == "float":
            cases.append((key, [-0.5, float("nan"), float("inf")]))
        elif leaf == "lr" or leaf.endswith("_lr"):
            cases.append((key, [0.0, -1e-4, float("nan"), float("inf")]))
        elif leaf == "top_p":
            cases.append((key, [0.0, 1.5, float("nan")]))
    return cases


def test_every_temperature_learning_rate_and_top_p_is_checked_naming_its_key():
    from alignbench.config import ConfigError, apply_overrides
    from alignbench.experiment import experiment_from_data

    cases = _sampling_and_learning_rate_keys()
    keys = {key for key, _ in cases}
    assert {"eval.temperature", "eval.temperatures", "labels.temperature", "eval.top_p", "sft.optim.lr", "ppo.value_lr", "dpo.optim.lr"} <= keys
    accepted = []
    for key, values in cases:
        for value in values:
            try:
                experiment_from_data(apply_overrides({"name": "x"}, {key: value}))
            except ConfigError as err:
                leaf = key.split(".")[-1]
                assert leaf in str(err), (key, value, str(err))
            else:
                accepted.append((key, value))
    assert accepted == []


@pytest.mark.parametrize("override, message", [
    ("eval.temperature=.nan", "config key 'eval.temperature' must be a finite number"),
    ("labels.temperature=-1", "labels.temperature=-1.0 must be > 0"),
    ("dpo.optim.lr=.inf", "config key 'dpo.optim.lr' must be a finite number"),
    ("dpo.optim.lr=0", "lr=0.0 must be a positive number"),
    ("eval.top_p=0", "eval.top_p=0.0 must be in (0, 1]"),
    ("seed=-1", "seed=-1: a seed must be an integer >= 0"),
])
def test_a_bad_value_on_the_command_line_exits_2_naming_it(world, override, message, capsys):
    before = snapshot(world)
    rc, err = run_cli(["run", "quickstart", "method=dpo", override, "--out", str(world / "work" / "out")], capsys)
    assert rc == 2 and message in err
    assert snapshot(world) == before
