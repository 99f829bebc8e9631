"""A run seed is a full replicate: every stage seed left at None takes it; a pinned stage seed is a
setting. Run names hash only what differs from the defaults, and a finished run made under other
defaults is refused rather than reused."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from alignbench.config import ConfigError
from alignbench.experiment import for_run, load_experiment, resolve_run, run_name
from alignbench.seeding import STAGE_SEEDS, get_dotted


def test_a_run_seed_is_every_stage_seed_unless_one_is_pinned():
    spec = resolve_run(load_experiment("quickstart"), "dpo", 2)
    assert {key: get_dotted(spec.config, key) for key in STAGE_SEEDS} == {key: 2 for key in STAGE_SEEDS}
    assert spec.seed_follows == STAGE_SEEDS
    pinned = resolve_run(load_experiment("quickstart", ["sft.seed=0", "model.init_seed=0"]), "dpo", 2)
    assert pinned.config.sft.seed == 0 and pinned.config.model.init_seed == 0 and pinned.config.labels.seed == 2
    assert "sft.seed" not in pinned.seed_follows and "labels.seed" in pinned.seed_follows
    assert pinned.name != spec.name  # a different experiment: seed 2's stages are not all its own


def test_every_seed_field_of_the_config_is_a_stage_seed_or_fixed_on_purpose():
    """A new stage with a `seed` must join STAGE_SEEDS (a replicate varies it) or this list."""
    from alignbench.experiment import ExperimentConfig

    fixed = {"world.seed", "eval.seed", "seed"}  # the task and the evaluation prompts; the run seed itself

    def seeds(node, prefix=""):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                yield from seeds(value, f"{prefix}{f.name}.")
            elif f.name in ("seed", "init_seed"):
                yield prefix + f.name

    assert set(seeds(ExperimentConfig())) == set(STAGE_SEEDS) | fixed


def test_seed_zero_keeps_the_stage_keys_and_seed_one_has_its_own_stages():
    from alignbench.pipeline import Pipeline
    from alignbench.stages import labels, sft

    config = load_experiment("quickstart")
    zero, one = Pipeline(config, Path("/nonexistent")), Pipeline(dataclasses.replace(config, seed=1), Path("/nonexistent"))
    pinned = Pipeline(load_experiment("quickstart", ["seed=1", "sft.seed=0", "model.init_seed=0"]), Path("/nonexistent"))
    assert sft.key(zero)["sft"]["seed"] == 0 and sft.key(one)["sft"]["seed"] == 1
    assert sft.key(pinned) == sft.key(zero) and labels.key(pinned) != labels.key(zero)
    with pytest.raises(ValueError, match="run seed 1's, not seed 0's"):
        one.context(0)


@pytest.mark.parametrize("override", ["seeds=[0,-1]", "seed=-3", "sft.seed=-1", "labels.seed=1.5"])
def test_a_negative_or_fractional_seed_is_refused_naming_the_key(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace("[", "")):
        load_experiment("quickstart", [override])


def test_a_setting_at_its_default_does_not_change_the_run_name():
    config = load_experiment("quickstart")
    named = run_name(for_run(config, "dpo", 0))
    assert run_name(for_run(load_experiment("quickstart", ["dpo.beta=0.1", "trainer.threads=1"]), "dpo", 0)) == named
    assert run_name(for_run(load_experiment("quickstart", ["dpo.beta=0.2"]), "dpo", 0)) != named
    # an unresolved config names its run as the resolved one does
    assert run_name(dataclasses.replace(config, method="dpo", seed=0)) == named


def test_a_finished_run_made_under_another_default_is_refused_not_reused(tmp_path):
    from alignbench.runner import finished_result
    from alignbench.experiment import run_config_dict

    config = for_run(load_experiment("quickstart"), "dpo", 0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recorded = run_config_dict(config)
    identity = {"experiment": "quickstart", "run_name": "dpo-seed0-x", "method": "dpo", "seed": 0}
    (run_dir / "metrics.json").write_text(json.dumps({**identity, "config": recorded, "metrics": {"eval/win_rate": 0.6}}))
    assert finished_result(run_dir, config)["metrics"] == {"eval/win_rate": 0.6}
    recorded["dpo"]["beta"] = 0.3  # as if dpo.beta's default were 0.3 when the run was made
    recorded["a_field_of_an_older_release"] = 1  # keys one side lacks are not compared
    (run_dir / "metrics.json").write_text(json.dumps({**identity, "config": recorded, "metrics": {}}))
    with pytest.raises(ConfigError, match=r"dpo\.beta: 0\.3 -> 0\.1.*Delete"):
        finished_result(run_dir, config)


def test_results_pool_full_replicates_over_seeds_and_keep_a_pinned_stage_apart(tmp_path):
    from alignbench.analysis.runs import group_runs, load_local_runs
    from alignbench.experiment import run_config_dict

    for overrides, seeds in (([], (0, 1, 2)), (["sft.seed=0"], (0, 1, 2))):
        for seed in seeds:
            spec = resolve_run(load_experiment("quickstart", overrides), "dpo", seed)
            run_dir = tmp_path / "quickstart" / (spec.name + ("-pinned" if overrides else ""))
            run_dir.mkdir(parents=True)
            config = {**run_config_dict(spec.config), "seed_follows": list(spec.seed_follows)}
            (run_dir / "metrics.json").write_text(json.dumps({"experiment": "quickstart", "run_name": run_dir.name, "method": "dpo", "seed": seed,
                                                              "config": config, "metrics": {"eval/win_rate": 0.5 + seed / 10}}))
    groups = group_runs(load_local_runs(tmp_path))
    assert sorted((g.label, tuple(g.seeds)) for g in groups) == [("dpo (sft.seed=0)", (0, 1, 2)), ("dpo (sft.seed=run seed)", (0, 1, 2))]


def test_a_two_seed_quickstart_shares_its_runs_between_two_worker_processes_each_seed_with_its_own_stages(tmp_path, tiny_overrides, monkeypatch):
    from alignbench.cli import main

    out = tmp_path / "runs"
    assert main(["quickstart", "--workers", "2", "--out", str(out), *tiny_overrides, "seeds=[0,1]", "methods=[sft,dpo]"]) == 0
    logs = sorted((out / "quickstart" / "logs").iterdir())
    assert [p.name for p in logs] == ["worker0.log", "worker1.log"]
    started = [line for p in logs for line in p.read_text().splitlines() if re.match(r"\[alignbench\] run quickstart/\S+: method", line)]
    assert sorted(started) == sorted(set(started)) and len(started) == 4  # each run by one worker, once
    # A run's numbers do not depend on which process ran it or after which run: the same quickstart
    # in one process, seed by seed in the other order, from the same stages, gives the same metrics.
    alone = tmp_path / "alone"
    monkeypatch.setenv("ALIGNBENCH_STAGE_CACHE", str(out / "cache"))
    assert main(["quickstart", "--workers", "1", "--out", str(alone), *tiny_overrides, "seeds=[1,0]", "methods=[dpo,sft]"]) == 0
    for path in (out / "quickstart").glob("*/metrics.json"):
        shared, single = (json.loads(p.read_text())["metrics"] for p in (path, alone / "quickstart" / path.parent.name / "metrics.json"))
        assert {k: v for k, v in shared.items() if k.startswith("eval/")} == {k: v for k, v in single.items() if k.startswith("eval/")}
    assert len(list((out / "cache").glob("sft-*"))) == 2 and len(list((out / "cache").glob("reward_models-*"))) == 2
    results = [json.loads(p.read_text()) for p in sorted((out / "quickstart").glob("*/metrics.json"))]
    assert sorted((r["method"], r["seed"]) for r in results) == [("dpo", 0), ("dpo", 1), ("sft", 0), ("sft", 1)]
    for r in results:
        assert r["config"]["sft"]["seed"] == r["seed"] and "sft.seed" in r["config"]["seed_follows"]
    table = (out / "quickstart" / "figures" / "results.csv").read_text().splitlines()
    assert table[0].startswith("policy,experiment,method,seeds,") and all(",2," in row for row in table[1:])  # one row per policy, two seeds each


def test_a_failed_run_leaves_the_quickstart_workers_to_finish_the_others_and_a_rerun_retries_it(tmp_path, tiny_overrides, capsys):
    from alignbench.cli import main

    out = tmp_path / "runs"
    args = ["quickstart", "--workers", "2", "--out", str(out), *tiny_overrides, "seeds=[0,1]", "methods=[sft,dpo,cpl]"]
    # an absurd learning rate drives the DPO loss to NaN: both dpo runs fail, in whichever worker
    assert main([*args, "dpo.optim.lr=1e30", "dpo.optim.grad_clip=0"]) == 1
    assert "alignbench: error: failed: worker" in capsys.readouterr().err
    logs = "".join(p.read_text() for p in (out / "quickstart" / "logs").iterdir())
    assert "dpo at seed 0 failed (NonFiniteLossError" in logs and "dpo at seed 1 failed (NonFiniteLossError" in logs

    def finished():
        return sorted((r["method"], r["seed"]) for r in (json.loads(p.read_text()) for p in (out / "quickstart").glob("*/metrics.json")))

    assert finished() == [("cpl", 0), ("cpl", 1), ("sft", 0), ("sft", 1)]  # the runs after the failed ones too
    assert (out / "quickstart" / "figures" / "results.md").exists()  # the table of what finished
    assert main(args) == 0  # with a sane learning rate: only the dpo runs are left to run
    assert finished() == [("cpl", 0), ("cpl", 1), ("dpo", 0), ("dpo", 1), ("sft", 0), ("sft", 1)]
    logs = "".join(p.read_text() for p in (out / "quickstart" / "logs").iterdir())
    assert logs.count("run quickstart/sft-seed0") == 1  # run once, skipped on the rerun


def test_a_run_one_worker_holds_is_left_to_it_and_free_again_once_it_lets_go(tmp_path):
    from alignbench.runner import _claim

    with _claim(tmp_path / "run") as first, _claim(tmp_path / "run") as second:
        assert first and not second  # two open lock files, as two processes hold them
    with _claim(tmp_path / "run") as again:
        assert again
