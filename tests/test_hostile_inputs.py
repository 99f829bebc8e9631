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


def test_an_experiment_name_with_a_line_break_is_refused_in_the_yaml(world, capsys):
    experiment = world / "in" / "exp.yaml"
    experiment.write_text('base: quickstart\nname: "exp\\nx"\nmethod: sft\n')
    before = snapshot(world)
    rc, err = run_cli(["run", str(experiment), "--out", str(world / "work" / "out")], capsys)
    assert rc == 2 and "name='exp\\nx' must be a plain folder name" in err and "no line breaks" in err
    assert snapshot(world) == before


def test_an_experiment_named_like_the_stage_cache_is_refused(world, capsys):
    before = snapshot(world)
    rc, err = run_cli(["run", "quickstart", "method=sft", "name=cache", "--out", str(world / "work" / "out")], capsys)
    assert rc == 2 and "name='cache' is the folder of the stage cache under --out" in err
    assert snapshot(world) == before


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
    ("seeds=[0,1,1]", "seeds=[0, 1, 1] lists 1 more than once"),  # three seeds meant, two would run
    ("methods=[dpo,ppo,dpo]", "methods=['dpo', 'ppo', 'dpo'] lists dpo more than once"),
    # each once a numpy, torch or Lightning error, some only after the stages were built
    ("eval.seed=-1", "eval.seed=-1 must be an integer >= 0"),
    ("dpo.optim.weight_decay=-1", "weight_decay=-1.0 must be >= 0"),
    ("reward_model.epochs=0", "reward_model.epochs=0 must be >= 1"),
    # once "row 0: prompt has 6 tokens, more than max_length=4", after the stages were built
    ("dpo.max_length=4", "dpo.max_length=4 must be larger than the world's longest prompt (10 tokens)"),
    ("reward_model.max_length=0", "reward_model.max_length=0 must be larger than the world's longest prompt"),
    ("hir.entropy_weight=-1", "entropy_weight=-1.0 must be >= 0"),
    ("trainer.threads=-1", "trainer.threads=-1 must be >= 0"),
    ("trainer.devices=0", "trainer.devices=0 must be a number of devices >= 1"),
    # each once a Lightning traceback (exit 1) after the stages were built, leaving an empty run folder
    ("trainer.devices=abc", "trainer.devices='abc' must be a number of devices >= 1"),
    ("trainer.devices=[]", "trainer.devices=[] must be a number of devices >= 1"),
    ("trainer.accelerator=foo", "trainer.accelerator='foo' is not known; use one of auto, cpu, cuda, gpu, mps, tpu"),
    ("trainer.strategy=bogus", "trainer.strategy='bogus' is not known; use 'auto' or a Lightning strategy such as ddp"),
])
def test_a_bad_value_on_the_command_line_exits_2_naming_it(world, override, message, capsys):
    before = snapshot(world)
    rc, err = run_cli(["run", "quickstart", "method=dpo", override, "--out", str(world / "work" / "out")], capsys)
    assert rc == 2 and message in err
    assert snapshot(world) == before


@pytest.mark.parametrize("model, reason", [
    ("empty", "holds no config.json"),  # a folder that holds no saved model
    ("world-huge", "couldn't find them in the cached files"),  # neither a world model nor in the hub's cache, offline
])
def test_a_model_that_cannot_be_loaded_exits_2_naming_the_key_and_what_is_accepted(world, model, reason, capsys):
    if model == "empty":
        model = str(world / "in" / model)
        Path(model).mkdir()
    before = snapshot(world)
    rc, err = run_cli(["run", "quickstart", "method=sft", f"model.name={model}", "--out", str(world / "work" / "out")], capsys)
    assert rc == 2 and f"model.name={model!r} cannot be loaded" in err and reason in err, err
    assert "world-small" in err and "save_pretrained" in err and "HF_HUB_OFFLINE is set" in err
    assert snapshot(world) == before  # no run folder left behind


@pytest.mark.parametrize("key", ["model.name", "ai_labeler.model"])
def test_a_model_path_that_does_not_exist_is_refused_as_the_config_loads(world, key, capsys):
    missing = world / "in" / "typo"
    before = snapshot(world)
    rc, err = run_cli(["run", "quickstart", "method=rlaif", f"{key}={missing}", "--out", str(world / "work" / "out")], capsys)
    assert rc == 2 and f"{key}={str(missing)!r}: there is no such file or folder" in err, err
    assert snapshot(world) == before  # nothing built, no run folder made


def test_a_model_folder_alignbench_wrote_itself_fails_with_the_loaders_own_error(tmp_path):
    from alignbench.config import ConfigError
    from alignbench.models import load_pretrained_policy

    with pytest.raises(OSError) as raised:  # no config key named it: not the user's input, so not a ConfigError
        load_pretrained_policy(str(tmp_path / "cache" / "sft-0" / "policy"))
    assert not isinstance(raised.value, ConfigError)
    with pytest.raises(ConfigError, match="ai_labeler.model="):
        load_pretrained_policy(str(tmp_path / "cache" / "sft-0" / "policy"), key="ai_labeler.model")


def test_a_model_with_its_own_code_is_refused_unless_trusted_naming_the_switch(tmp_path):
    import json

    from alignbench.config import ConfigError
    from alignbench.models import load_pretrained_policy

    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "custom_x", "auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}}))
    with pytest.raises(ConfigError, match=r"custom code.*set model\.trust_remote_code=true if you trust that code"):
        load_pretrained_policy(str(folder), key="model.name")  # no code of the folder's is run: it has none to run


# --- damaged files of a finished experiment ----------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny experiment file, its output folder and one finished `sft` run (stages built once)."""
    import yaml

    from alignbench.config import apply_overrides, parse_overrides
    from tests.conftest import TINY_OVERRIDES

    folder = tmp_path_factory.mktemp("hostile")
    data = apply_overrides({}, parse_overrides(TINY_OVERRIDES + ["tracking.wandb=disabled"]))  # the overrides as a YAML file's sections
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "methods": ["sft"], **data}))
    out = folder / "runs"
    assert main(["run", str(path), "method=sft", "--out", str(out)]) == 0
    return path, out


def _run_dir(out: Path, method: str = "sft") -> Path:
    (found,) = (out / "tiny").glob(f"{method}-seed0-*")
    return found


def test_a_finished_run_records_its_environment_and_the_checksums_of_its_files(tiny):
    import json

    import torch

    _, out = tiny
    run_dir = _run_dir(out)
    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["environment"] == {"threads": torch.get_num_threads(), "device": "cpu", "torch": torch.__version__, "accelerator": "cpu"}
    assert result["sha256"] == {name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest() for name in ("samples.jsonl", "history.jsonl")}
    (stage,) = (out / "cache").glob("sft-*")
    assert json.loads((stage / "stage.json").read_text())["environment"]["threads"] == torch.get_num_threads()


def test_a_sweep_worker_records_the_thread_count_the_sweep_gave_it(tiny, tmp_path, monkeypatch):
    import json
    import os
    import subprocess
    import sys

    from alignbench.sweep import _run_environment

    path, out = tiny
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    env = _run_environment(workers=os.cpu_count() or 1, slot=0)
    assert env["OMP_NUM_THREADS"] == "1"
    copy = tmp_path / "runs"
    import shutil

    shutil.copytree(out / "cache", copy / "cache")
    command = [sys.executable, "-m", "alignbench", "run", str(path), "method=sft", "--out", str(copy)]
    assert subprocess.run(command, env=env, capture_output=True).returncode == 0
    result = json.loads((_run_dir(copy) / "metrics.json").read_text())
    assert result["environment"]["threads"] == 1


def test_results_and_plot_skip_a_truncated_metrics_json_naming_it(tiny, tmp_path, capsys):
    import shutil

    _, out = tiny
    folder = tmp_path / "tiny"
    shutil.copytree(_run_dir(out), folder / _run_dir(out).name)
    shutil.copytree(_run_dir(out), folder / "sft-seed0-bad")
    bad = folder / "sft-seed0-bad" / "metrics.json"
    bad.write_bytes(bad.read_bytes()[:100])
    before = snapshot(tmp_path)
    rc = main(["results", str(folder), "--format", "csv"])
    captured = capsys.readouterr()
    assert rc == 0 and f"{bad} cannot be read" in captured.err and "left out" in captured.err
    assert captured.out.startswith("policy") and "warning" not in captured.out
    assert snapshot(tmp_path) == before

    from alignbench.analysis.runs import load_local_runs

    assert [r.name for r in load_local_runs(folder)] == [_run_dir(out).name]


def test_a_samples_file_that_differs_from_its_checksum_is_not_used(tiny, tmp_path, capsys):
    import shutil

    from alignbench.analysis.runs import load_local_runs

    _, out = tiny
    folder = tmp_path / "tiny"
    shutil.copytree(_run_dir(out), folder / _run_dir(out).name)
    samples = folder / _run_dir(out).name / "samples.jsonl"
    samples.write_bytes(samples.read_bytes()[:-50])
    (run,) = load_local_runs(folder)
    assert run.samples_path is None and run.history
    assert f"{samples} has changed since it was written" in capsys.readouterr().err


@pytest.mark.parametrize("key, value, problem", [
    ("metrics", None, "metrics is null, not a mapping of metric names to numbers"),
    ("seed", "zero", 'seed is "zero", not an integer'),
    ("seed", 0.7, "seed is 0.7, not an integer"),
    ("config", None, "config is null, not a mapping"),
    ("eval/win_rate", "0.9", 'metrics.eval/win_rate is "0.9", not a number'),
])
def test_a_metrics_json_with_a_value_of_the_wrong_type_is_left_out_naming_it(tiny, tmp_path, key, value, problem, capsys):
    import json
    import shutil

    from alignbench.analysis.runs import load_local_runs

    _, out = tiny
    folder = tmp_path / "tiny"
    run_dir = folder / _run_dir(out).name
    shutil.copytree(_run_dir(out), run_dir)
    result = json.loads((run_dir / "metrics.json").read_text())
    (result["metrics"] if key.startswith("eval/") else result)[key] = value
    (run_dir / "metrics.json").write_text(json.dumps(result))
    before = snapshot(tmp_path)
    rc, err = run_cli(["results", str(folder)], capsys)
    assert rc == 2 and f"{run_dir / 'metrics.json'} is not a run's result ({problem})" in err and "left out" in err
    assert load_local_runs(folder) == [] and snapshot(tmp_path) == before


def test_an_edited_number_in_a_metrics_json_leaves_the_run_out_and_runs_it_again(tiny, tmp_path, capsys):
    """metrics.json records the checksum of its own content: a number changed in it (by hand, or
    damaged on disk: still valid JSON) is caught where it is read, not reported. `results` leaves
    the run out; rerunning the experiment keeps the changed file beside the run made again."""
    import json
    import shutil

    from alignbench.analysis.runs import load_local_runs

    config, out = tiny
    shutil.copytree(out, tmp_path / "runs")
    folder = tmp_path / "runs" / "tiny"
    run_dir = folder / _run_dir(out).name
    path = run_dir / "metrics.json"
    original = json.loads(path.read_text())
    for edit in ({"metrics": {**original["metrics"], "eval/kl": 0.001}}, {"method": "ppo"}, {"seed": 1}, {"content_sha256": None}):
        path.write_text(json.dumps({**original, **edit}, indent=2))
        capsys.readouterr()
        assert load_local_runs(folder) == []
        err = capsys.readouterr().err
        assert f"{path} has changed since it was written (the sha256 of its content is" in err and "left out" in err
    path.write_text(json.dumps(original))  # the same content in another layout reads back
    assert [r.name for r in load_local_runs(folder)] == [run_dir.name]

    path.write_text(json.dumps({**original, "metrics": {**original["metrics"], "eval/kl": 0.001}}))
    rc, err = run_cli(["run", str(config), "method=sft", "--out", str(tmp_path / "runs")], capsys)
    assert rc == 0 and f"{path} has changed since it was written" in err and "runs again" in err
    again = json.loads(path.read_text())["metrics"]
    assert {k: v for k, v in again.items() if k != "budget/wall_s"} == {k: v for k, v in original["metrics"].items() if k != "budget/wall_s"}
    assert json.loads((run_dir / "metrics.json.unreadable").read_text())["metrics"]["eval/kl"] == 0.001


def test_a_metric_that_its_own_samples_contradict_leaves_the_run_out(tiny, tmp_path, capsys):
    """A metrics.json written before results recorded their own checksum, edited or damaged (its
    samples.jsonl still matching the checksum it holds), must not put a number in the table that
    the run's own per-prompt results do not give."""
    import json
    import shutil

    from alignbench.analysis.runs import load_local_runs

    _, out = tiny
    folder = tmp_path / "tiny"
    run_dir = folder / _run_dir(out).name
    shutil.copytree(_run_dir(out), run_dir)
    result = json.loads((run_dir / "metrics.json").read_text())
    del result["content_sha256"]
    true_value = result["metrics"]["eval/gold_reward"]
    result["metrics"]["eval/gold_reward"] = 0.9
    (run_dir / "metrics.json").write_text(json.dumps(result))
    assert load_local_runs(folder) == []
    err = capsys.readouterr().err
    assert f"{run_dir / 'metrics.json'} and its samples.jsonl disagree (eval/gold_reward=0.9 but the mean of samples.jsonl's 'gold_reward' is {true_value:.6g})" in err


def test_a_copy_of_a_run_is_not_counted_as_another_seed(tiny, tmp_path, capsys):
    import shutil

    from alignbench.analysis.runs import load_local_runs

    _, out = tiny
    folder = tmp_path / "tiny"
    run_dir = folder / _run_dir(out).name
    shutil.copytree(_run_dir(out), run_dir)
    shutil.copytree(run_dir, folder / f"{run_dir.name}.bak")
    assert [r.name for r in load_local_runs(folder)] == [run_dir.name]
    assert f"{folder / f'{run_dir.name}.bak'} holds the run {run_dir.name} (its metrics.json says so): a copy of a run under another name" in capsys.readouterr().err
    # the same run in two folders of its own name: which one counts cannot be told
    shutil.copytree(run_dir, folder / "old" / run_dir.name)
    before = snapshot(tmp_path)
    rc, err = run_cli(["results", str(folder)], capsys)
    assert rc == 2 and f"{folder / 'old' / run_dir.name} and {run_dir} hold the same run (tiny/{run_dir.name})" in err
    assert snapshot(tmp_path) == before


def test_a_samples_file_without_a_checksum_and_a_line_that_is_not_json_is_not_used_naming_the_line(tiny, tmp_path, capsys):
    """Runs made before metrics.json recorded checksums have none to check their samples against."""
    import json
    import shutil

    from alignbench.analysis.runs import load_local_runs

    _, out = tiny
    folder = tmp_path / "tiny"
    run_dir = folder / _run_dir(out).name
    shutil.copytree(_run_dir(out), run_dir)
    result = json.loads((run_dir / "metrics.json").read_text())
    del result["sha256"], result["content_sha256"]
    (run_dir / "metrics.json").write_text(json.dumps(result))
    samples = run_dir / "samples.jsonl"
    lines = samples.read_text().splitlines()
    samples.write_text("\n".join([*lines[:3], '{"prompt": "cut sh', *lines[3:]]) + "\n")
    (run,) = load_local_runs(folder)
    assert run.samples_path is None and run.per_prompt("eval/win_rate") is None
    assert f"{samples} line 4 is not JSON" in capsys.readouterr().err
    assert main(["results", str(folder)]) == 0


def test_results_files_are_readable_as_the_umask_allows_not_only_by_their_owner(tmp_path):
    import os
    import stat

    from alignbench.records import write_json_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "metrics.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o644


def test_a_finished_run_with_a_truncated_metrics_json_runs_again_and_keeps_the_bad_file(tiny, tmp_path, capsys):
    import json
    import shutil

    path, out = tiny
    copy = tmp_path / "runs"
    shutil.copytree(out, copy)
    run_dir = _run_dir(copy)
    good = json.loads((run_dir / "metrics.json").read_text())
    bad = (run_dir / "metrics.json").read_bytes()[:200]
    (run_dir / "metrics.json").write_bytes(bad)
    cache = snapshot(copy / "cache")
    rc, err = run_cli(["run", str(path), "method=sft", "--out", str(copy)], capsys)
    assert rc == 0 and f"{run_dir / 'metrics.json'} cannot be read" in err
    assert (run_dir / "metrics.json.unreadable").read_bytes() == bad
    # damaged again: the first bad file is kept too
    (run_dir / "metrics.json").write_bytes(bad[:50])
    assert run_cli(["run", str(path), "method=sft", "--out", str(copy)], capsys)[0] == 0
    assert (run_dir / "metrics.json.unreadable").read_bytes() == bad and (run_dir / "metrics.json.unreadable.1").read_bytes() == bad[:50]
    again = json.loads((run_dir / "metrics.json").read_text())
    assert {k: v for k, v in again["metrics"].items() if k != "budget/wall_s"} == {k: v for k, v in good["metrics"].items() if k != "budget/wall_s"}
    assert snapshot(copy / "cache") == cache


def test_a_damaged_cached_sft_model_is_rebuilt_not_used(tiny, tmp_path, capsys):
    """Issue 21's case: zeros in the middle of the cached SFT model.safetensors. The stage is named
    in a warning and rebuilt; the run's numbers are those of the undamaged stage."""
    import json
    import shutil

    from alignbench import stage_cache

    path, out = tiny
    copy = tmp_path / "runs"
    shutil.copytree(out, copy)
    shutil.rmtree(_run_dir(copy))
    (stage,) = (copy / "cache").glob("sft-*")
    (weights,) = stage.rglob("model.safetensors")
    intact = weights.read_bytes()
    data = bytearray(intact)
    middle = len(data) // 2
    data[middle : middle + len(data) // 4] = bytes(len(data) // 4)
    weights.write_bytes(bytes(data))
    stage_cache._VERIFIED.clear()  # as in a new process
    rc, err = run_cli(["run", str(path), "method=sft", "--out", str(copy)], capsys)
    assert rc == 0 and f"cached stage {stage} is damaged: {weights} has changed" in err and "rebuilt, not used" in err
    assert weights.read_bytes() == intact
    expected = json.loads((_run_dir(out) / "metrics.json").read_text())["metrics"]
    got = json.loads((_run_dir(copy) / "metrics.json").read_text())["metrics"]
    assert {k: v for k, v in got.items() if k != "budget/wall_s"} == {k: v for k, v in expected.items() if k != "budget/wall_s"}
