"""Optuna search: the tune file's search spaces and objective, pruning on the periodic
validation, the shared trial budget, and end to end on a tiny world with two worker
processes on the default SQLite storage: trials measured on the validation split only, the
best settings written as a runnable experiment and re-run on fresh seeds (test split), and
the stock `optuna` CLI reading the study."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from alignbench.config import ConfigError
from alignbench.tune import Objective, load_tune, pruning_observer, run_trial

# Its runs only use stages: they read and build them in the session's stage cache (conftest.py).
pytestmark = pytest.mark.usefixtures("shared_stage_cache")


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_tune_file_spaces_are_read_per_method_in_either_key_form(tmp_path):
    path = _write(tmp_path / "t.yaml", {"methods": ["sft", "dpo", "cpl"], "tune": {"n_trials": 3, "space": {
        "dpo": {"dpo.beta": {"type": "log_float", "low": 0.01, "high": 1.0}, "dpo": {"epochs": {"type": "int", "low": 1, "high": 3}}},
        "cpl": {"cpl.bias": {"type": "categorical", "choices": [0.5, 1.0]}},
    }}})
    tune = load_tune(str(path))
    assert tune.spec.n_trials == 3 and tune.name == "t"
    assert {m: sorted(s) for m, s in tune.spaces.items()} == {"dpo": ["dpo.beta", "dpo.epochs"], "cpl": ["cpl.bias"]}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    beta, epochs = (tune.spaces["dpo"][k].suggest(trial, k) for k in ("dpo.beta", "dpo.epochs"))
    assert 0.01 <= beta <= 1.0 and epochs in (1, 2, 3) and isinstance(epochs, int)
    assert tune.study_name("dpo") == "t-dpo"


@pytest.mark.parametrize("space, message", [
    ({"dpo": {"dpo.beta": {"type": "log_float", "low": 0.0, "high": 1.0}}}, "tune.space.dpo.dpo.beta.*log_float needs low > 0"),
    ({"dpo": {"dpo.beta": {"type": "float", "low": 1.0, "high": 0.5}}}, "low=1.0 must be < high=0.5"),
    ({"dpo": {"dpo.beta": {"type": "uniform", "low": 0.1, "high": 0.5}}}, "must be one of 'float', 'log_float', 'int', 'categorical'"),
    ({"dpo": {"dpo.beta": {"type": "categorical"}}}, "needs a non-empty 'choices'"),
    ({"dpo": {"dpo.bta": {"type": "float", "low": 0.1, "high": 0.5}}}, "tune.space.dpo.dpo.bta: unknown config key 'dpo.bta'"),
    ({"dpo": {"dpo.beta": {"type": "float", "low": -1.0, "high": 0.5}}}, "tune.space.dpo.dpo.beta: .*beta"),
    ({"dpo": {"ppo.init_kl_coef": {"type": "float", "low": 0.1, "high": 0.5}}}, "holds keys of its own section"),
    ({"ppo": {"ppo.init_kl_coef": {"type": "float", "low": 0.1, "high": 0.5}}}, "'ppo' is not in this file's methods"),
    ({"dpo": {"dpo.beta": {"type": "float", "low": 0.1, "high": 0.5, "step": 0}}}, r"tune.space.dpo.dpo.beta.*step=0(\.0)? must be > 0"),
    ({"dpo": [1, 2]}, r"tune.space.dpo is \[1, 2\]; it must be a mapping of the method's keys to their ranges"),
])
def test_bad_search_spaces_name_the_key_and_what_is_accepted(tmp_path, space, message):
    path = _write(tmp_path / "bad.yaml", {"methods": ["dpo"], "tune": {"space": space}})
    with pytest.raises(ConfigError, match=message):
        load_tune(str(path))


@pytest.mark.parametrize("section, message", [
    ({"objective": {"metric": "eval/win_rat"}}, "objective.metric='eval/win_rat' is not an evaluation metric; use eval/ with one of win_rate, "),
    ({"trial_seed": -5}, r"tune.trial_seed=-5 must be an integer >= 0"),
    ({"final_seeds": [-1]}, r"tune.final_seeds=\[-1\]: a seed must be an integer >= 0"),
    ({"sampler": {"seed": -1}}, r"tune.sampler.seed=-1 must be an integer in \[0, 2\*\*31\)"),
    ({"pruner": {"n_startup_trials": -3}}, "tune.pruner.n_startup_trials=-3 must be >= 0"),
    ({"pruner": {"type": "hyperband", "reduction_factor": 1}}, "tune.pruner.reduction_factor=1 must be >= 2"),
])
def test_bad_tune_settings_are_refused_as_the_file_loads_naming_the_key(tmp_path, section, message):
    path = _write(tmp_path / "bad.yaml", {"methods": ["dpo"], "tune": {**section, "space": {"dpo": {"dpo.beta": {"type": "float", "low": 0.1, "high": 0.5}}}}})
    with pytest.raises(ConfigError, match=message):
        load_tune(str(path))


def test_the_objectives_evaluation_metrics_are_those_the_evaluator_reports():
    import types

    import numpy as np
    import torch

    from alignbench.evaluation import EvalConfig, Evaluator, PolicyResponses
    from alignbench.tune import EVALUATION_METRICS
    from alignbench.world import AssistantWorld

    world = AssistantWorld()
    prompts = world.sample_prompts("test", 4, seed=0)
    texts = [world.ideal_response(p) for p in prompts]
    judge = types.SimpleNamespace(prefer_batch=lambda ps, a, b: np.full(len(ps), 0.5))
    proxy = types.SimpleNamespace(score=lambda ps, ys, harmful: torch.zeros(len(ps)))
    config = EvalConfig(temperature=0.0, bootstrap_samples=10)  # greedy: kl_outside_support too
    evaluator = Evaluator(config, {"test": prompts}, {"test": PolicyResponses([[1]] * 4, texts)}, judge, world=world, proxy=proxy, harmful_of=world.is_harmful)
    metrics, _ = evaluator.evaluate(PolicyResponses([[1]] * 4, texts, np.zeros(4)))
    assert {name.removeprefix("eval/").removesuffix("_ci_low").removesuffix("_ci_high") for name in metrics} == set(EVALUATION_METRICS)


def test_a_trial_that_fails_by_its_own_settings_or_results_takes_its_place_in_the_budget(tmp_path):
    """Failures outside the run itself (a sampled value, a missing objective) counted for nothing,
    and a worker asked for trials without end."""
    from alignbench.tune import _counts

    path = _write(tmp_path / "t.yaml", {"methods": ["dpo"], "tune": {"n_trials": 2, "space": {"dpo": {"dpo.beta": {"type": "float", "low": 0.1, "high": 0.5}}}}})
    tune = load_tune(str(path))

    def suggest(trial, key):
        raise ValueError("no value for you")

    tune.spaces["dpo"]["dpo.beta"].suggest = suggest
    study = optuna.create_study()
    trial = study.ask()
    with pytest.raises(ValueError, match="no value for you"):
        run_trial(trial, tune, "dpo", tmp_path, pipeline=None)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    (failed,) = study.get_trials()
    assert "error" in failed.user_attrs and _counts(failed)


def test_a_study_with_trials_of_another_objective_or_setup_is_refused_and_the_same_search_resumes(tmp_path):
    """Values of another objective (a length where a win rate is searched), or of trials run from
    another base config, search space or trial seed, would be compared as if alike."""
    from alignbench.tune import create_studies

    space = {"dpo": {"dpo.beta": {"type": "float", "low": 0.1, "high": 0.5}}}
    path = _write(tmp_path / "t.yaml", {"name": "t", "methods": ["dpo"], "tune": {"space": space}})
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    create_studies(load_tune(str(path)), storage)
    create_studies(load_tune(str(path), ["tune.objective.metric=eval/length"]), storage)  # no trials yet: the study takes the new objective
    study = optuna.load_study(study_name="t-dpo", storage=storage)
    study.tell(study.ask(), 0.5)
    create_studies(load_tune(str(path), ["tune.objective.metric=eval/length", "tune.n_trials=40", "tune.sampler.seed=3"]), storage)  # more trials, another sampler: the same values
    wider = _write(tmp_path / "wider.yaml", {"name": "t", "methods": ["dpo"], "tune": {"space": {"dpo": {"dpo.beta": {"type": "float", "low": 0.1, "high": 0.9}}}}})
    for file, overrides, what in [(path, ["tune.objective.metric=eval/win_rate"], r"another objective \(the study's val/length, this search's val/win_rate\)"),
                                  (path, ["tune.objective.metric=eval/length", "sft.epochs=1"], "another trial settings"),
                                  (path, ["tune.objective.metric=eval/length", "tune.trial_seed=1"], "another trial settings"),
                                  (wider, ["tune.objective.metric=eval/length"], "another trial settings")]:
        with pytest.raises(ConfigError, match=f"study 't-dpo' in {storage} holds 1 trial\\(s\\) of {what}.*optuna delete-study --study-name t-dpo"):
            create_studies(load_tune(str(file), overrides), storage)


def test_a_worker_runs_its_trials_on_the_trial_seeds_stages(tmp_path, monkeypatch):
    """tune.trial_seed, not the experiment's first seed: the stages prepare_search built."""
    import alignbench.runner
    from alignbench.tune import work

    class Built(Exception):
        pass

    def stage_pipeline(config, out):
        raise Built(config.seed)

    monkeypatch.setattr(alignbench.runner, "stage_pipeline", stage_pipeline)
    path = _write(tmp_path / "t.yaml", {"name": "t", "methods": ["dpo"], "seeds": [0], "tune": {"trial_seed": 7, "space": {"dpo": {"dpo.beta": {"type": "float", "low": 0.1, "high": 0.5}}}}})
    with pytest.raises(Built) as built:
        work(str(path), [], tmp_path, f"sqlite:///{tmp_path / 'optuna.db'}")
    assert built.value.args == (7,)


def test_a_resumed_search_does_not_draw_the_killed_searchs_first_points_again():
    from alignbench.tune import SamplerConfig, trial_sampler

    def first_draw(sampler, earlier_failures: int = 0) -> float:
        study = optuna.create_study(sampler=sampler)
        for _ in range(earlier_failures):  # trials of a killed search
            study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
        return study.ask().suggest_float("beta", 0.0, 1.0)

    config = SamplerConfig(seed=0, n_startup_trials=5)
    assert first_draw(trial_sampler(config, 1, 0)) == first_draw(optuna.samplers.TPESampler(seed=1))  # a fresh search as before
    assert first_draw(trial_sampler(config, 0, 1), earlier_failures=1) != first_draw(trial_sampler(config, 0, 0))


def test_a_final_seed_listed_twice_is_refused_before_the_search(tmp_path):
    path = _write(tmp_path / "bad.yaml", {"methods": ["dpo"], "tune": {"final_seeds": [100, 100], "space": {"dpo": {"dpo.beta": {"type": "float", "low": 0.1, "high": 0.5}}}}})
    with pytest.raises(ConfigError, match=r"tune.final_seeds=\[100, 100\] lists a seed more than once"):
        load_tune(str(path))


@pytest.mark.parametrize("kind", ["not a database", "cut in half", "journal"])
def test_a_damaged_study_storage_is_a_config_error_naming_it_and_is_left_as_it_was(tmp_path, kind):
    from alignbench.tune import open_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if kind == "journal":
        path = tmp_path / "studies.log"
        path.write_text('{"op_code": 0, "worker_id"\nnot json\n')
        url = str(path)
    else:
        path = tmp_path / "optuna.db"
        url = f"sqlite:///{path}"
        if kind == "not a database":
            path.write_text("not an SQLite file\n")
        else:
            study = optuna.create_study(study_name="t-dpo", storage=open_storage(url))
            for _ in range(20):
                trial = study.ask()
                study.tell(trial, trial.suggest_float("beta", 0.0, 1.0))
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=rf"{url} cannot be (opened|read): .*damaged or not Optuna's: move it away"):
        open_storage(url)
    assert path.read_bytes() == before


def test_the_objective_is_measured_on_the_validation_split_and_trials_run_in_one_process(tmp_path):
    assert Objective("eval/win_rate").key == "val/win_rate" and Objective("val/kl", "minimize").key == "val/kl"
    assert Objective("budget/wall_s", "minimize").key == "budget/wall_s"
    with pytest.raises(ValueError, match="must be a contract metric"):
        Objective("win_rate")
    path = _write(tmp_path / "ddp.yaml", {"methods": ["dpo"], "trainer": {"devices": 2, "strategy": "ddp"}})
    with pytest.raises(ConfigError, match="each trial in one process"):
        load_tune(str(path))


def test_periodic_validation_is_reported_and_a_trial_below_the_median_is_pruned():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    first = study.ask()
    observe = pruning_observer(first, "val/win_rate")
    for step, value in ((2, 0.55), (4, 0.6)):
        observe({"step": step, "val/win_rate": value})
    observe({"step": 3, "train/loss": 0.5})  # rows without the objective are not reported
    study.tell(first, 0.6)
    assert study.trials[0].intermediate_values == {2: 0.55, 4: 0.6}
    second = study.ask()
    observe = pruning_observer(second, "val/win_rate")
    observe({"step": 2, "val/win_rate": 0.56})  # at least the median of step 2: goes on
    with pytest.raises(optuna.TrialPruned, match="pruned at step 4"):
        observe({"step": 4, "val/win_rate": 0.58})  # its best so far is below step 4's median


def test_a_trial_asked_for_past_the_budget_is_not_run(tmp_path):
    path = _write(tmp_path / "t.yaml", {"methods": ["dpo"], "tune": {"n_trials": 1, "space": {"dpo": {"dpo.beta": {"type": "float", "low": 0.1, "high": 0.5}}}}})
    tune = load_tune(str(path))
    study = optuna.create_study()
    study.tell(study.ask(), 0.5)  # the budget of one trial is spent
    late = study.ask()
    with pytest.raises(Exception) as raised:
        run_trial(late, tune, "dpo", tmp_path, pipeline=None)
    assert type(raised.value).__name__ == "_OverBudget" and late.user_attrs == {"over_budget": True}


def test_tune_with_two_workers_on_sqlite_then_the_best_config_on_fresh_seeds(tmp_path, capsys):
    from alignbench.cli import main
    from alignbench.experiment import load_experiment
    from tests.conftest import TINY_OVERRIDES

    path = _write(tmp_path / "tiny_tune.yaml", {
        "name": "tiny_tune", "methods": ["dpo"], "eval": {"eval_every": 2}, "tracking": {"wandb": "disabled"},
        "tune": {
            "n_trials": 4, "final_seeds": [7], "sampler": {"seed": 0, "n_startup_trials": 2}, "pruner": {"type": "median", "n_startup_trials": 1},
            "space": {"dpo": {"dpo.beta": {"type": "log_float", "low": 0.01, "high": 1.0}, "dpo.optim.lr": {"type": "categorical", "choices": [1.0e-5, 3.0e-3]}}},
        },
    })
    out = tmp_path / "runs"
    assert main(["tune", str(path), "--workers", "2", "--out", str(out), *TINY_OVERRIDES, "dpo.kl_every=0"]) == 0
    printed = capsys.readouterr().out

    storage = f"sqlite:///{(out / 'tiny_tune' / 'optuna.db').resolve()}"
    study = optuna.load_study(study_name="tiny_tune-dpo", storage=storage)
    trials = study.get_trials()
    assert len(trials) == 4 and {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert complete and all(t.intermediate_values for t in trials)  # every trial reported its periodic validation
    for trial in complete:  # measured on the validation split; the test split never evaluated
        metrics = json.loads((Path(trial.user_attrs["run"]) / "metrics.json").read_text())["metrics"]
        assert trial.value == pytest.approx(metrics["val/win_rate"])
        assert not any(key.startswith("eval/") for key in metrics)

    best = load_experiment(str(out / "tiny_tune" / "best.yaml"))
    assert (best.dpo.beta, best.dpo.optim.lr) == (study.best_params["dpo.beta"], study.best_params["dpo.optim.lr"])
    assert best.seeds == [7] and best.model.name == "world-tiny"
    (final,) = (out / "tiny_tune").glob("dpo-seed7-*/metrics.json")
    assert "eval/win_rate" in json.loads(final.read_text())["metrics"]  # re-run on the fresh seed, test split
    assert "| eval/win_rate" in printed and "optuna trials --study-name tiny_tune-dpo" in printed

    optuna_cli = str(Path(sys.executable).with_name("optuna"))  # the stock console script
    cli = subprocess.run([optuna_cli, "trials", "--study-name", "tiny_tune-dpo", "--storage", storage, "-f", "json"], capture_output=True, text=True, timeout=120, check=False)
    assert cli.returncode == 0, cli.stderr
    assert sorted(t["number"] for t in json.loads(cli.stdout)) == [0, 1, 2, 3]
    cli = subprocess.run([optuna_cli, "best-trial", "--study-name", "tiny_tune-dpo", "--storage", storage, "-f", "json"], capture_output=True, text=True, timeout=120, check=False)
    assert cli.returncode == 0 and json.loads(cli.stdout)["number"] == study.best_trial.number


def test_the_tune_parent_of_trial_workers_loads_no_torch(tmp_path, tiny_overrides):
    """With several trial workers the parent only waits for them and reads the storage: it reads the
    tune file, builds the trial seed's stages and writes the best config in forked children, so that
    torch, transformers, Lightning and the stage models (~0.5 GB) are not held beside the workers for
    the whole search. A bad config is still refused by the parent, with status 2 and no traceback."""
    import textwrap

    path = _write(tmp_path / "t.yaml", {
        "name": "t", "methods": ["dpo"], "tracking": {"wandb": "disabled"},
        "tune": {"n_trials": 1, "final_seeds": [7], "space": {"dpo": {"dpo.beta": {"type": "float", "low": 0.1, "high": 0.5}}}},
    })
    code = textwrap.dedent("""
        import json, os, sys
        import optuna
        import alignbench.sweep, alignbench.tune

        def loaded():
            return sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "lightning"})

        def workers_run(tune_file, overrides, out, storage_url, workers, tune):
            print(json.dumps({"when the workers start": loaded()}), flush=True)
            for method, spaces in tune.spaces.items():  # the workers' trials, as they would leave them
                study = optuna.load_study(study_name=tune.study_name(method), storage=storage_url)
                trial = study.ask()
                for key, space in spaces.items():
                    space.suggest(trial, key)
                study.tell(trial, 0.5)

        def final_sweep(experiment, overrides, out, workers):
            import yaml
            with open(experiment) as best:  # the best config, which a child wrote
                print(json.dumps({"at the final sweep": loaded(), "beta": yaml.safe_load(best)["dpo"]["beta"]}), flush=True)
            os._exit(0)

        alignbench.tune.run_workers = workers_run
        alignbench.sweep.run_sweep = final_sweep
        from alignbench.cli import main
        sys.exit(main(["tune", *sys.argv[1:]]))
    """)
    out = tmp_path / "runs"
    done = subprocess.run([sys.executable, "-c", code, str(path), "--workers", "2", "--out", str(out), *tiny_overrides], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert reports[0] == {"when the workers start": []}
    assert reports[1]["at the final sweep"] == [] and 0.1 <= reports[1]["beta"] <= 0.5
    bad = subprocess.run([sys.executable, "-m", "alignbench", "tune", str(path), "dpo.beta=abc", "--workers", "2", "--out", str(tmp_path / "bad"), *tiny_overrides],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "config key 'dpo.beta' must be a number, got 'abc'" in bad.stderr and "Traceback" not in bad.stderr


def test_a_trial_left_running_in_a_journal_by_a_killed_worker_is_failed_and_a_live_one_kept(tmp_path):
    """Journal storages have no heartbeat: a killed worker's trial stayed RUNNING for good and
    kept its place in the budget. Its run lock, which the OS dropped with the worker, tells."""
    import fcntl

    from alignbench.tune import _counts, fail_abandoned_trials, open_storage

    storage = open_storage(str(tmp_path / "journal.log"))
    study = optuna.create_study(study_name="t-dpo", storage=storage)
    trials = {}
    for name in ("killed", "alive", "elsewhere"):
        trial = study.ask()
        run_dir = tmp_path / "runs" / name
        if name != "elsewhere":  # another machine's run: its folder is not here
            run_dir.mkdir(parents=True)
            (run_dir / ".lock").touch()
        trial.set_user_attr("run", str(run_dir))
        trials[name] = trial.number
    with open(tmp_path / "runs" / "alive" / ".lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # its worker runs it
        fail_abandoned_trials(study, storage, after_s=60)  # too young to tell: all kept
        assert [t.state.name for t in study.get_trials()] == ["RUNNING"] * 3
        fail_abandoned_trials(study, storage, after_s=0)
        states = {name: study.get_trials()[number].state.name for name, number in trials.items()}
    assert states == {"killed": "FAIL", "alive": "RUNNING", "elsewhere": "RUNNING"}
    assert not _counts(study.get_trials()[trials["killed"]])  # its place in the budget is free
