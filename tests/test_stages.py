"""The stage layout: every module imports alone, stage builds are versioned, and every setting a
stage reads is in its cache key (so changing it never reuses a stale stage)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"alignbench": "alignbench", "methods": "alignbench.methods", "analysis": "alignbench.analysis"}


def _modules() -> list[str]:
    names = []
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            names.append(".".join([package, *parts]).removesuffix(".__init__"))
    return names


# Imports each module named on the command line first, in a child forked from a parent that has
# imported only third-party libraries: the child starts with no alignbench module loaded, exactly as
# a fresh interpreter would, without paying torch's and transformers' start-up once per module.
_IMPORT_EACH_FIRST = r"""
import importlib, json, os, sys, traceback
for library in sys.argv[1].split(","):
    try:
        importlib.import_module(library)
    except Exception:
        pass  # an optional library that is not installed: the module that needs it says so below
assert not any(name == "alignbench" or name.startswith("alignbench.") for name in sys.modules), "a library imported alignbench"
failed = {}
for module in sys.argv[2:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(module)
            code = 0
        except BaseException:
            os.write(write, traceback.format_exc()[-2000:].encode())
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        error = pipe.read()
    if os.waitpid(pid, 0)[1] != 0:
        failed[module] = error or "the child died"
print(json.dumps(failed))
"""


def _third_party_libraries(modules: list[str]) -> list[str]:
    """The top-level names of the non-standard libraries the project imports anywhere (function-local
    imports included), read from the sources, not imported."""
    import ast

    names = set()
    for path in [p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return sorted(n for n in names if n not in sys.stdlib_module_names and n not in ("alignbench", "__future__", *PACKAGES))


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """No import cycle hides behind an import order: each module is the first one imported."""
    import json

    modules = [m for m in _modules() if m not in ("alignbench.__main__",)]
    assert "alignbench.pipeline" in modules and "alignbench.stages.sft" in modules and "alignbench.methods.base" in modules
    libraries = _third_party_libraries(modules)
    assert {"torch", "lightning", "transformers"} <= set(libraries)
    done = subprocess.run([sys.executable, "-c", _IMPORT_EACH_FIRST, ",".join(libraries), *modules],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failed, next(iter(failed.items()))


def test_the_import_check_catches_a_cycle_that_only_one_import_order_hides(tmp_path):
    """The check above, on two modules that import each other: importing `b` first works, `a` first fails
    (a imports b, which asks a for a name a has not defined yet)."""
    import json

    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic import b\nVALUE = 1\n")
    (package / "b.py").write_text("from cyclic.a import VALUE\n")
    done = subprocess.run([sys.executable, "-c", _IMPORT_EACH_FIRST, "json", "cyclic.a", "cyclic.b"],
                          capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ))
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(failed) == {"cyclic.a"} and "ImportError" in failed["cyclic.a"]


def test_no_module_imports_the_pipeline_or_a_method_from_a_stage():
    """Stages are built by the pipeline and used by methods, never the other way round."""
    import ast

    for path in sorted((ROOT / "alignbench" / "stages").glob("*.py")) + [ROOT / "alignbench" / "sources.py", ROOT / "alignbench" / "stage_cache.py"]:
        tree = ast.parse(path.read_text())
        checked = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and id(node) not in checked:
                assert node.module not in ("alignbench.pipeline", "alignbench.runner", "alignbench.experiment", "alignbench.registry"), (path.name, node.module)
                assert not (node.module or "").startswith("alignbench.methods"), (path.name, node.module)


# --- build versions ----------------------------------------------------------------------
def test_each_stage_records_the_source_it_was_versioned_at():
    """A stage's files changed without its entry in alignbench/stages/versions.py being looked at:
    if the change alters what the stage builds from the same settings, bump its version (old
    caches are then rebuilt); either way record the new hash."""
    from alignbench.stages.versions import BUILD, source_hash

    changed = {stage: source_hash(stage) for stage, build in BUILD.items() if source_hash(stage) != build.sha256}
    assert not changed, f"stage files changed; bump the version if what they build changed, and record the hashes: {changed}"


def test_the_build_version_enters_a_key_from_version_2_so_old_keys_stay():
    from alignbench.config import config_hash
    from alignbench.stage_cache import StageCache, versioned_key

    key = {"sft": {"epochs": 2}}
    assert versioned_key(key, 1) == key and config_hash(versioned_key(key, 1)) == config_hash(key)
    assert versioned_key(key, 3) == {"sft": {"epochs": 2}, "build": 3}
    with pytest.raises(ValueError, match="starts at 1"):
        versioned_key(key, 0)


def test_a_bumped_version_rebuilds_and_an_unchanged_one_reuses(tmp_path):
    from alignbench.stage_cache import StageCache

    builds = []

    def build(tmp: Path) -> dict:
        builds.append(tmp)
        (tmp / "artifact").write_text(str(len(builds)))
        return {"n": len(builds)}

    first, _ = StageCache(tmp_path).stage("toy", {"a": 1}, build)
    again, summary = StageCache(tmp_path).stage("toy", {"a": 1}, build, version=1)  # a new process, same build
    assert again == first and summary["n"] == 1 and len(builds) == 1
    bumped, summary = StageCache(tmp_path).stage("toy", {"a": 1}, build, version=2)
    assert bumped != first and summary["n"] == 2 and (bumped / "artifact").read_text() == "2"
    assert '"build": 2' in (bumped / "key.json").read_text()


def test_a_run_counts_the_seconds_of_the_stages_it_needs_whoever_built_them(tmp_path):
    """budget/wall_s: the run's own time plus the own build seconds of the stages its method reads
    (and those they were built from), the same whether the run built them, or another run (another
    process) did before; the stages of the run context (`excluded`) are not counted."""
    import json
    import time

    from alignbench.stage_cache import StageCache
    from alignbench.training import Budget

    def sleeping(seconds: float, inner=None):
        def build(tmp: Path) -> dict:
            if inner is not None:
                inner()
            time.sleep(seconds)
            (tmp / "artifact").write_text("x")
            return {}
        return build

    def run(cache: StageCache) -> Budget:
        base, _ = cache.stage("base", {"a": 0}, sleeping(0.05))  # what the run context reads
        budget = Budget(excluded=frozenset({base.name}))
        cache.stage("base", {"a": 0}, sleeping(0.05))
        cache.stage("outer", {"a": 1}, sleeping(0.3, inner=lambda: cache.stage("inner", {"a": 2}, sleeping(0.2))))
        return budget

    builder = run(StageCache(tmp_path))  # builds inner inside outer
    _new_process()
    reader = run(StageCache(tmp_path))  # finds both built
    outer = next((tmp_path / "cache").glob("outer-*"))
    summary = json.loads((outer / "stage.json").read_text())
    inner_name = next((tmp_path / "cache").glob("inner-*")).name
    assert summary["seconds"] >= 0.5 and 0.3 <= summary["own_seconds"] < summary["seconds"]
    assert list(summary["built_from"]) == [inner_name] and summary["built_from"][inner_name] >= 0.2
    assert builder.stages() == reader.stages() == {inner_name: summary["built_from"][inner_name], outer.name: summary["own_seconds"]}
    walls = [b.metrics()["budget/wall_s"] for b in (builder, reader)]
    assert all(0.5 <= w < 0.5 + 0.3 for w in walls), walls  # the 0.5 s of builds once, the base stage not at all

    # A resumed run keeps counting from its checkpoint, and a stage read again counts once.
    resumed = Budget(excluded=builder.excluded)
    resumed.load_state_dict(builder.state_dict())
    StageCache(tmp_path).stage("outer", {"a": 1}, sleeping(0.3))
    assert resumed.stages() == builder.stages() and 0.5 <= resumed.metrics()["budget/wall_s"] < 0.5 + 0.3
    old = Budget()
    old.load_state_dict({"human_labels": 1, "ai_labels": 0, "policy_samples": 0, "train_tokens": 0, "wall_s": 7.0})  # a checkpoint from before
    assert old.stages() == {} and 7.0 <= old.metrics()["budget/wall_s"] < 7.3


# --- every setting a stage reads is in its key ------------------------------------------
@pytest.fixture(scope="module")
def world_keys():
    """Keys of every world stage for a config with `overrides`."""
    from alignbench.experiment import load_experiment
    from alignbench.pipeline import Pipeline
    from alignbench.stages import ai_labeler, ai_labels, cai_preference_model, helpful_only, labels, pair_reward_model, reference_samples, reward_models, sft, sl_cai

    def keys(*overrides: str) -> dict[str, dict]:
        config = load_experiment("quickstart", list(overrides))
        p = Pipeline(config, Path("/nonexistent"))
        c = config.constitutional
        return {
            "sft": sft.key(p), "labels": labels.key(p), "reward_models": reward_models.key(p), "reference_samples": reference_samples.key(p, config.seed or 0),
            "ai_labeler": ai_labeler.key(p), "ai_labels": ai_labels.key(p, config.rlaif.n_labels),
            "pair_reward_model": pair_reward_model.key(p, "ai", config.rlaif.n_labels), "human_reward_model": pair_reward_model.key(p, "human", config.rlaif.n_labels),
            "helpful_only": helpful_only.key(p, p.config.helpful_only), "sl_cai": sl_cai.key(p, c, config.seed or 0),
            "cai_preference_model": cai_preference_model.key(p, c, Path("sl_cai-x"), config.seed or 0),
        }

    return keys


# Settings each stage reads (directly, or through a stage it is built from), as overrides.
READS = {
    "sft": ["world.demonstrator.wrong_count=0.5", "model.name=world-mini", "model.init_seed=1", "model.lora.enabled=true", "model.trust_remote_code=true",
            "sft.n_demonstrations=100", "sft.epochs=1", "sft.batch_size=8", "sft.max_length=32", "sft.optim.lr=0.1", "sft.seed=1",
            "trainer.precision=64-true"],
    "labels": ["labels.n_prompts=100", "labels.responses_per_prompt=2", "labels.temperature=0.5", "labels.source=gold", "labels.annotator.flip_rate=0.3",
               "labels.seed=1", "reward_model.holdout_fraction=0.2", "eval.max_new_tokens=8", "sft.seed=1"],
    "reward_models": ["reward_model.epochs=1", "reward_model.batch_size=4", "reward_model.max_length=32", "reward_model.optim.lr=0.1",
                      "reward_model.likelihood=none", "reward_model.safety=false", "reward_model.architecture=sequence_classification reward_model.likelihood=none",
                      "reward_model.holdout_fraction=0.2", "labels.seed=1", "sft.seed=1"],
    "reference_samples": ["eval.temperature=0.7", "eval.top_p=0.9", "eval.max_new_tokens=8", "eval.n_test_prompts=10", "eval.n_val_prompts=10", "eval.seed=1",
                          "seed=1", "sft.seed=1", "eval.batch_size=8"],  # the batch size sets which uniform goes to which row
    "ai_labeler": [f"ai_labeler.{k}" for k in ("model=world-tiny", "n_examples=10", "rating_fraction=0.5", "policy_sample_fraction=0.1", "general_fraction=0.1",
                                             "tie_keep=0.9", "epochs=2", "batch_size=8", "max_length=32", "optim.lr=0.1", "seed=1", "min_answer_mass=0.1")]
                  + ["world.demonstrator.wrong_count=0.5", "eval.max_new_tokens=8", "sft.seed=1"],
    "ai_labels": ["rlaif.n_labels=10", "ai_labeler.seed=1", "labels.seed=1", "sft.seed=1"],
    "pair_reward_model": ["rlaif.n_labels=10", "reward_model.epochs=1", "reward_model.architecture=sequence_classification reward_model.likelihood=none", "ai_labeler.seed=1",
                          "labels.seed=1", "sft.seed=1", "model.lora.enabled=true"],
    "human_reward_model": ["rlaif.n_labels=10", "reward_model.epochs=1", "labels.seed=1", "sft.seed=1"],
    "helpful_only": [f"helpful_only.{k}" for k in ("n_demonstrations=10", "critique_tasks=10", "epochs=1", "batch_size=8", "max_length=32", "optim.lr=0.1", "seed=1")]
                    + ["sft.seed=1"],
    "sl_cai": [f"constitutional.{k}" for k in ("principles=[harmless]", "red_team_prompts=10", "revisions=1", "revision_temperature=0.5",
                                               "helpful_demonstrations=10", "sl_epochs=1", "sl_optim.lr=0.1", "max_length=32", "helpful_only.seed=1")]
              + ["eval.max_new_tokens=8", "seed=1", "sft.seed=1"],
    "cai_preference_model": [f"constitutional.{k}" for k in ("rl_prompts=10", "principles=[harmless]", "human_helpfulness_pairs=10")]
                            + ["reward_model.epochs=1", "ai_labeler.seed=1", "labels.seed=1", "seed=1"],
}
# Settings that change how a stage runs, never what it builds (but for the stages READS lists them under).
NOT_READ = ["trainer.progress_bar=false", "trainer.log_every_n_steps=1", "trainer.threads=1", "model.gradient_checkpointing=true",
            "eval.bootstrap_samples=10", "eval.batch_size=8", "eval.judge=annotator", "tracking.wandb=disabled"]


@pytest.mark.parametrize("stage", list(READS))
def test_every_setting_a_stage_reads_changes_its_key(world_keys, stage):
    base = world_keys()[stage]
    unchanged = [s for s in READS[stage] if world_keys(*s.split())[stage] == base]  # a setting: one override, or several that go together
    assert not unchanged, f"{stage}: its key ignores {unchanged}"
    moved = [s for s in NOT_READ if s not in READS[stage] and world_keys(s)[stage] != base]
    assert not moved, f"{stage}: its key holds {moved}, which do not change what it builds"


# Stage -> stages built from it (directly or through another).
BUILT_FROM = {
    "sft": ["labels", "reward_models", "reference_samples", "ai_labeler", "ai_labels", "pair_reward_model", "human_reward_model", "helpful_only", "sl_cai", "cai_preference_model"],
    "labels": ["reward_models", "ai_labels", "pair_reward_model", "human_reward_model", "cai_preference_model"],
    "ai_labeler": ["ai_labels", "pair_reward_model", "cai_preference_model"],
    "helpful_only": ["sl_cai"],
}


@pytest.mark.parametrize("stage", list(BUILT_FROM))
def test_bumping_a_stages_version_changes_the_keys_of_the_stages_built_from_it(world_keys, monkeypatch, stage):
    """A new build of a stage must not be paired with stages built from its old build."""
    from alignbench.stages import versions

    before = world_keys()
    monkeypatch.setitem(versions.BUILD, stage, versions.BUILD[stage]._replace(version=versions.BUILD[stage].version + 1))
    after = world_keys()
    stale = [name for name in BUILT_FROM[stage] if after[name] == before[name]]
    assert not stale, f"bumping {stage} leaves the keys of {stale} as they were"


def test_the_world_labels_key_holds_the_holdout_fraction_only_away_from_its_old_value(world_keys):
    """The fix that put reward_model.holdout_fraction in the labels key keeps the key of every
    cache built at the old default (0.1), so those labels are reused, not rebuilt."""
    assert "holdout_fraction" not in world_keys()["labels"]
    assert world_keys("reward_model.holdout_fraction=0.2")["labels"]["holdout_fraction"] == 0.2


def test_the_quickstart_stage_keys_are_pinned():
    """Hashes of the quickstart's shared stages. A cache is reused exactly as long as they stay, so
    a change here must be deliberate (a build version bumped, a key fixed) and named in its commit.
    They were the single-file pipeline's (b9c64f4) until sft 2 (packed fine-tuning) rebuilt SFT and
    every stage built from it, and reward_models 3 (shared-prompt, packed training) the reward models;
    then `optim.fused` (AdamW's fused kernel, the same update up to float rounding) entered every
    trained stage's settings, and so every key; then ai_labels 2 (requests batched by length) and
    reward_models 4 (scored in smaller batches, prompts shared); then ai_labeler 3 (long requests
    packed into rows twice as wide) and ai_labels, which embeds it; then labels 2 (the annotator's flips
    reach the ranked pairs) and the reward models and AI labels, which embed the labels key; then sl_cai 3
    (its stage.json records its training tokens)."""
    from alignbench.config import config_hash
    from alignbench.experiment import load_experiment
    from alignbench.pipeline import Pipeline
    from alignbench.stage_cache import versioned_key
    from alignbench.stages import ai_labeler, ai_labels, helpful_only, labels, reference_samples, reward_models, sft, sl_cai
    from alignbench.stages.versions import version

    config = load_experiment("quickstart")
    p = Pipeline(config, Path("/nonexistent"))
    keys = {
        "sft": sft.key(p), "labels": labels.key(p), "reward_models": reward_models.key(p), "reference_samples": reference_samples.key(p, 0),
        "ai_labeler": ai_labeler.key(p), "ai_labels": ai_labels.key(p, 4000), "helpful_only": helpful_only.key(p, p.config.helpful_only),
        "sl_cai": sl_cai.key(p, p.config.constitutional, 0),
    }
    hashes = {name: config_hash(versioned_key(key, version(name))) for name, key in keys.items()}
    assert hashes == {
        "sft": "d8638ff0e725", "labels": "5c6dc13bddfe", "reward_models": "c2391ffdb0dc", "reference_samples": "338056f6f5ee",
        "ai_labeler": "780a50b5676e", "ai_labels": "2508dcd6252a", "helpful_only": "f1f585d39528", "sl_cai": "1b4927bf05bc",
    }


def test_the_dataset_labels_key_holds_what_reading_the_pairs_depends_on():
    from alignbench.experiment import load_experiment
    from alignbench.sources import DatasetSource

    def key(*overrides: str) -> dict:
        return DatasetSource(load_experiment("real_hh_rlhf", list(overrides))).labels_key(None)

    base = key()
    for setting in ("data.preferences.limit=10", "data.max_prompt_tokens=64", "model.name=gpt2", "labels.seed=1", "reward_model.holdout_fraction=0.2"):
        assert key(setting) != base, setting
    assert key("sft.epochs=3") == base  # the pairs are read, not sampled: the SFT policy does not enter


# --- one place for what a method learns from -----------------------------------------------
def test_feedback_is_declared_and_read_through_feedback_of():
    from alignbench.experiment import load_experiment, resolve_run

    spec = resolve_run(load_experiment("quickstart", ["ppo.reward=gold"]), "ppo", 0)
    assert spec.method_class.feedback == "reward"  # the class declaration is not mutated
    assert spec.method_class.feedback_of(spec.method_config) == "gold"
    assert spec.method_class.feedback_of(dataclasses.replace(spec.method_config, reward="proxy")) == "reward"
    dpo = resolve_run(load_experiment("quickstart"), "dpo", 3)
    assert dpo.method_class.feedback_of(dpo.method_config) == "preferences"
    assert dpo.seed == 3 and dpo.method == "dpo" and dpo.name.startswith("dpo-seed3-") and dpo.method_config is dpo.config.dpo


# --- checksums, environment, stale temporary folders, waiting ---------------------------
def _toy_build(builds: list):
    def build(tmp: Path) -> dict:
        builds.append(tmp)
        (tmp / "model").mkdir()
        (tmp / "model" / "weights.bin").write_bytes(bytes(range(256)) * 64)
        (tmp / "rows.jsonl").write_text('{"a": 1}\n')
        return {"n": len(builds)}
    return build


def _new_process():
    """What a new process forgets: which stages it has verified."""
    from alignbench import stage_cache

    stage_cache._VERIFIED.clear()


def test_a_stage_records_the_checksum_of_each_file_and_what_it_was_built_with(tmp_path):
    import hashlib
    import json

    import torch

    from alignbench.stage_cache import StageCache

    directory, summary = StageCache(tmp_path).stage("toy", {"a": 1}, _toy_build([]))
    recorded = json.loads((directory / "stage.json").read_text())
    assert set(recorded["sha256"]) == {"model/weights.bin", "rows.jsonl", "key.json"}
    assert recorded["sha256"]["rows.jsonl"] == hashlib.sha256(b'{"a": 1}\n').hexdigest()
    assert recorded["environment"] == {"threads": torch.get_num_threads(), "device": "cpu", "torch": torch.__version__}
    assert summary["sha256"] == recorded["sha256"]


@pytest.mark.parametrize("damage", ["zeroed", "truncated", "missing", "summary", "checksums"])
def test_a_damaged_stage_is_rebuilt_never_used_and_the_file_is_named(tmp_path, damage, capsys):
    from alignbench.stage_cache import StageCache

    builds = []
    directory, _ = StageCache(tmp_path).stage("toy", {"a": 1}, _toy_build(builds))
    weights = directory / "model" / "weights.bin"
    if damage == "zeroed":
        data = bytearray(weights.read_bytes())
        data[4000:8000] = bytes(4000)
        weights.write_bytes(bytes(data))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "missing":
        weights.unlink()
    elif damage == "summary":
        (directory / "stage.json").write_text('{"n": 1, "sha')
    else:
        (directory / "stage.json").write_text('{"n": 1, "sha256": "corrupt"}')
    _new_process()
    capsys.readouterr()
    again, summary = StageCache(tmp_path).stage("toy", {"a": 1}, _toy_build(builds))
    err = capsys.readouterr().err
    assert again == directory and len(builds) == 2 and summary["n"] == 2
    named = directory / ("stage.json" if damage in ("summary", "checksums") else "model/weights.bin")
    assert "warning: " in err and str(named) in err and ("rebuilt" in err or "rebuilding" in err)
    assert weights.read_bytes() == bytes(range(256)) * 64
    _new_process()
    StageCache(tmp_path).stage("toy", {"a": 1}, _toy_build(builds))
    assert len(builds) == 2  # the rebuilt stage verifies


def test_a_stage_built_before_checksums_gets_them_on_first_reuse(tmp_path):
    import json

    from alignbench.stage_cache import StageCache

    builds = []
    directory, _ = StageCache(tmp_path).stage("toy", {"a": 1}, _toy_build(builds))
    summary = json.loads((directory / "stage.json").read_text())
    recorded = summary.pop("sha256")
    del summary["content_sha256"]
    (directory / "stage.json").write_text(json.dumps(summary))
    _new_process()
    StageCache(tmp_path).stage("toy", {"a": 1}, _toy_build(builds))
    assert len(builds) == 1 and json.loads((directory / "stage.json").read_text())["sha256"] == recorded
    _new_process()
    _, again = StageCache(tmp_path).stage("toy", {"a": 1}, _toy_build(builds))  # its content checksum was recorded too
    assert len(builds) == 1 and again["n"] == 1 and "content_sha256" in again


@pytest.mark.parametrize("edit", [{"n": 7}, {"own_seconds": 1234.5}, {"content_sha256": "0" * 64}])
def test_a_stage_json_whose_numbers_changed_is_rebuilt_naming_it(tmp_path, edit, capsys):
    """stage.json's own numbers (what a build measured, its seconds) are checked as its files are."""
    import json

    from alignbench.stage_cache import StageCache

    builds = []
    directory, _ = StageCache(tmp_path).stage("toy", {"a": 1}, _toy_build(builds))
    summary = json.loads((directory / "stage.json").read_text())
    (directory / "stage.json").write_text(json.dumps({**summary, **edit}, indent=2))
    _new_process()
    capsys.readouterr()
    _, rebuilt = StageCache(tmp_path).stage("toy", {"a": 1}, _toy_build(builds))
    err = capsys.readouterr().err
    assert len(builds) == 2 and rebuilt["n"] == 2
    assert f"{directory / 'stage.json'} has changed since it was written" in err and "rebuilding the stage" in err


def test_temporary_folders_of_dead_builds_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from alignbench.stage_cache import StageCache

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = tmp_path / "cache"
    stale = cache / f".other-0123456789ab.tmp-{dead.pid}"
    live = cache / f".other-0123456789ab.tmp-{os.getppid()}"  # a process that is still running
    for folder in (stale, live):
        (folder / "model").mkdir(parents=True)
    StageCache(tmp_path).stage("toy", {"a": 1}, _toy_build([]))
    assert not stale.exists() and live.exists()


def test_a_process_waiting_for_a_stage_lock_says_what_it_waits_for(tmp_path, capsys):
    import fcntl
    import threading

    from alignbench.config import config_hash
    from alignbench.stage_cache import StageCache

    cache = tmp_path / "cache"
    cache.mkdir()
    lock = cache / f".toy-{config_hash({'a': 1})}.lock"
    holder = open(lock, "w")
    fcntl.flock(holder, fcntl.LOCK_EX)
    release = threading.Timer(0.5, lambda: (fcntl.flock(holder, fcntl.LOCK_UN), holder.close()))
    release.start()
    StageCache(tmp_path).stage("toy", {"a": 1}, _toy_build([]))
    release.join()
    out = capsys.readouterr().out
    assert f"waiting for another process that holds the lock of the toy stage toy-{config_hash({'a': 1})}" in out and str(lock) in out


# --- ALIGNBENCH_STAGE_CACHE: one stage cache for every output folder ------------------------
def test_without_the_variable_each_output_folder_caches_its_stages_in_out_cache(tmp_path, monkeypatch):
    from alignbench.stage_cache import STAGE_CACHE_VARIABLE, StageCache

    monkeypatch.delenv(STAGE_CACHE_VARIABLE, raising=False)
    directory, _ = StageCache(tmp_path / "a").stage("toy", {"a": 1}, _toy_build([]))
    assert directory.parent == tmp_path / "a" / "cache"
    monkeypatch.setenv(STAGE_CACHE_VARIABLE, "")  # empty: unset
    directory, _ = StageCache(tmp_path / "b").stage("toy", {"a": 1}, _toy_build([]))
    assert directory.parent == tmp_path / "b" / "cache"


def test_with_the_variable_two_output_folders_build_a_stage_once_and_verify_it(tmp_path, monkeypatch, capsys):
    """Built once for both output folders, in the variable's folder, with the checksums of any
    stage: a file damaged there is named and the stage rebuilt."""
    from alignbench.stage_cache import STAGE_CACHE_VARIABLE, StageCache

    shared = tmp_path / "stages" / "made-if-missing"
    monkeypatch.setenv(STAGE_CACHE_VARIABLE, str(shared))
    builds = []
    first, _ = StageCache(tmp_path / "a").stage("toy", {"a": 1}, _toy_build(builds))
    _new_process()
    second, summary = StageCache(tmp_path / "b").stage("toy", {"a": 1}, _toy_build(builds))
    assert first == second and first.parent == shared and len(builds) == 1 and summary["n"] == 1
    assert [p.name for p in shared.iterdir() if not p.name.startswith(".")] == [first.name]  # no temporary folder left
    assert not (tmp_path / "a" / "cache").exists() and not (tmp_path / "b" / "cache").exists()
    (first / "rows.jsonl").write_text('{"a": 2}\n')
    _new_process()
    capsys.readouterr()
    StageCache(tmp_path / "c").stage("toy", {"a": 1}, _toy_build(builds))
    assert len(builds) == 2 and f"{first / 'rows.jsonl'} has changed" in capsys.readouterr().err


def test_two_experiments_in_different_output_folders_share_their_stages(tmp_path, monkeypatch, capsys):
    """`alignbench run` into two --out folders with ALIGNBENCH_STAGE_CACHE set: the first builds
    every stage in that folder, the second reuses each of them and builds none, and both give the
    same metrics."""
    import json

    from alignbench.cli import main
    from alignbench.stage_cache import STAGE_CACHE_VARIABLE
    from tests.conftest import TINY_OVERRIDES, stage_folders_in_log

    shared = tmp_path / "stages"
    monkeypatch.setenv(STAGE_CACHE_VARIABLE, str(shared))
    logs, metrics = [], []
    for out in (tmp_path / "a", tmp_path / "b"):
        capsys.readouterr()
        assert main(["run", "quickstart", "method=sft", "tracking.wandb=disabled", "--out", str(out), *TINY_OVERRIDES]) == 0
        logs.append(capsys.readouterr().out)
        (result,) = (out / "quickstart").glob("sft-seed0-*/metrics.json")
        metrics.append({k: v for k, v in json.loads(result.read_text())["metrics"].items() if k != "budget/wall_s"})
        assert not (out / "cache").exists()
    first, second = logs
    stages = sorted(p for p in shared.iterdir() if not p.name.startswith("."))
    assert {p.name.rsplit("-", 1)[0] for p in stages} == {"sft", "labels", "reward_models", "reference_samples"}
    for stage in stages:
        name = stage.name.rsplit("-", 1)[0]
        assert f"building {name} stage -> {stage}" in first and stage_folders_in_log(second, name) == {stage}
    assert " stage -> " not in second  # nothing built twice
    assert metrics[0] == metrics[1]


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_a_stage_cache_variable_that_cannot_be_a_folder_is_refused_naming_it(tmp_path, monkeypatch, capsys, where):
    from alignbench.cli import main
    from alignbench.config import ConfigError
    from alignbench.stage_cache import STAGE_CACHE_VARIABLE, StageCache

    blocker = tmp_path / "stages.txt"
    blocker.write_text("not a folder\n")
    value = str(blocker if where == "file" else blocker / "cache")
    monkeypatch.setenv(STAGE_CACHE_VARIABLE, value)
    capsys.readouterr()
    assert main(["run", "quickstart", "method=sft", "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert f"{STAGE_CACHE_VARIABLE}={value}" in err and "is a file" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages.txt"] and blocker.read_text() == "not a folder\n"  # nothing written
    with pytest.raises(ConfigError, match=STAGE_CACHE_VARIABLE):
        StageCache(tmp_path / "runs")  # the pipeline's cache, outside the command line too
