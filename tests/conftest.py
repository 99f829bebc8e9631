"""Test isolation: nothing is written outside a temporary directory, nothing needs the network."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Set when pytest imports this file, before it collects the test modules: huggingface_hub, datasets
# and matplotlib read these variables once, when they are first imported, and many test modules
# import them (through transformers) as they are collected, before any fixture runs. Set later, in
# a fixture, they came too late: in-process the hub was online and datasets' and matplotlib's caches
# went to ~/.cache. The first process to import this file makes the home and removes it at exit;
# the processes it starts (xdist's workers, CLI subprocesses, spawned workers that import this
# file) inherit it.
_OWNS_HOME = "ALIGNBENCH_TESTS_HOME" not in os.environ
_HOME = Path(tempfile.mkdtemp(prefix="alignbench-tests-home-")) if _OWNS_HOME else Path(os.environ["ALIGNBENCH_TESTS_HOME"])
if _OWNS_HOME:  # at exit, also when a script imports this file for TINY_OVERRIDES, outside pytest
    _OWNER = os.getpid()  # a forked child that exits through atexit must not remove it under its parent
    atexit.register(lambda: os.getpid() == _OWNER and shutil.rmtree(_HOME, ignore_errors=True))
ISOLATED_ENVIRONMENT = {
    "ALIGNBENCH_TESTS_HOME": str(_HOME),
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HOME": str(_HOME / "hf"),
    "HF_DATASETS_CACHE": str(_HOME / "hf" / "datasets"),
    "MPLCONFIGDIR": str(_HOME / "mpl"),
    "WANDB_DIR": str(_HOME / "wandb"),
    "WANDB_CACHE_DIR": str(_HOME / "wandb-cache"),
    "WANDB_CONFIG_DIR": str(_HOME / "wandb-config"),
    "WANDB_DATA_DIR": str(_HOME / "wandb-data"),
    "XDG_CACHE_HOME": str(_HOME / "cache"),
    "TOKENIZERS_PARALLELISM": "false",
}
# ALIGNBENCH_STAGE_CACHE too: the tests' stages go in temporary folders, never in a user's stage cache.
_UNSET = ("WANDB_MODE", "WANDB_API_KEY", "ALIGNBENCH_STAGE_CACHE")
_SAVED_ENVIRONMENT = {key: os.environ.get(key) for key in (*ISOLATED_ENVIRONMENT, *_UNSET)}
# Once, by the process that made the home: the processes it starts inherit the result, and a second
# import in the same process (`from tests.conftest import TINY_OVERRIDES`: pytest imported this file
# as `conftest`) must not unset what a fixture has set since (ALIGNBENCH_STAGE_CACHE, for one).
if _OWNS_HOME:
    os.environ.update(ISOLATED_ENVIRONMENT)
    for _key in _UNSET:
        os.environ.pop(_key, None)

TINY_OVERRIDES = [
    "seeds=[0]",  # the quickstart's three seeds run in processes of their own: tests/test_seeds.py runs two
    "model.name=world-tiny",
    "sft.n_demonstrations=600", "sft.epochs=1", "sft.batch_size=32",
    "labels.n_prompts=60", "labels.responses_per_prompt=3",
    "reward_model.epochs=1", "reward_model.batch_size=8",
    "eval.n_test_prompts=64", "eval.n_val_prompts=32", "eval.bootstrap_samples=200", "eval.max_new_tokens=12",
    "dpo.kl_every=5", "dpo.kl_prompts=16", "hir.prompts_per_round=100", "hir.kl_prompts=16",
    "cpl.kl_prompts=16", "cpl_kl.kl_prompts=16",
    "ipo.kl_prompts=16", "slic.kl_prompts=16", "simpo.kl_prompts=16", "orpo.kl_prompts=16", "kto.kl_prompts=16",
    "rejection_sampling.prompts_per_round=50", "rejection_sampling.samples_per_prompt=2", "rejection_sampling.kl_prompts=16",
    "rest.prompts_per_round=50", "rest.samples_per_prompt=2", "rest.kl_prompts=16",
    "ppo.iterations=3", "ppo.batch_size=16", "ppo.minibatch_size=8",
    "grpo.iterations=2", "grpo.batch_size=4", "grpo.minibatch_size=8", "rloo.iterations=2", "rloo.batch_size=4", "rloo.minibatch_size=8",
    "reinforce_pp.iterations=2", "reinforce_pp.batch_size=16", "reinforce_pp.minibatch_size=8",
    "online_dpo.iterations=2", "online_dpo.batch_size=8", "online_dpo.minibatch_size=8",
    "ai_labeler.model=world-tiny", "ai_labeler.n_examples=300",
    "rlaif.n_labels=40", "rlaif.iterations=2", "rlaif.batch_size=16", "rlaif.minibatch_size=8",
    "rlhf_one_rm.n_labels=40", "rlhf_one_rm.iterations=2", "rlhf_one_rm.batch_size=16", "rlhf_one_rm.minibatch_size=8",
    "rlaif_direct.iterations=2", "rlaif_direct.batch_size=16", "rlaif_direct.minibatch_size=8",
    "helpful_only.n_demonstrations=200", "helpful_only.critique_tasks=100", "helpful_only.epochs=1",
    "constitutional.helpful_only.n_demonstrations=200", "constitutional.helpful_only.critique_tasks=100", "constitutional.helpful_only.epochs=1",
    "constitutional.red_team_prompts=40", "constitutional.helpful_demonstrations=40", "constitutional.sl_epochs=1",
    "constitutional.rl_prompts=40", "constitutional.human_helpfulness_pairs=30",
    "constitutional.iterations=2", "constitutional.batch_size=16", "constitutional.minibatch_size=8",
    "trainer.progress_bar=false", "trainer.log_every_n_steps=1",
]


def pytest_unconfigure(config):
    for key, value in _SAVED_ENVIRONMENT.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def pytest_configure(config):
    """pytest-xdist's workers (`-n 2` in pyproject.toml) run one torch thread each, and so do the
    CLI subprocesses they start (they inherit the variables): two workers of two threads each on
    two cores thrash. A run without workers keeps torch's default."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(variable, "1")
        import sys

        if "torch" in sys.modules:  # imported before this hook: the variable came too late for it
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True, scope="session")
def isolated_environment() -> Path:
    """The temporary home that this pytest process's caches and configs go in (set at import, above)."""
    return _HOME


@pytest.fixture(scope="session")
def session_stage_cache(tmp_path_factory) -> Path:
    """One stage cache folder for the whole pytest run: the tiny SFT policy, labels, reward models,
    AI labeler ... are built once in it, by whichever test needs them first (`shared_stage_cache`).
    pytest-xdist's workers share it too: their temporary folders have a common parent, and a stage
    is built under a lock, so a worker that asks for a stage another is building waits for it."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.getbasetemp().parent / "stage-cache"
        folder.mkdir(exist_ok=True)
        return folder
    return tmp_path_factory.mktemp("stage-cache")


@pytest.fixture(scope="module")
def shared_stage_cache(session_stage_cache):
    """For a test module whose runs only *use* stages: ALIGNBENCH_STAGE_CACHE names the session's
    stage cache while the module runs, so its output folders (and subprocesses, which inherit the
    variable) reuse what earlier modules built. A module opts in with
    `pytestmark = pytest.mark.usefixtures("shared_stage_cache")`, and so does each of its module
    fixtures that builds stages (fixtures of one scope are set up in the order they are asked for).

    Not for a test that looks for stages in `OUT/cache`, counts stage folders, or damages or deletes
    a stage's files: a stage is verified once per process (stage_cache._VERIFIED), so a file damaged
    in the shared cache would be handed unchecked to every later test. Such a test keeps a private
    cache: monkeypatch.delenv(STAGE_CACHE_VARIABLE) gives it `OUT/cache` again. (Nor does a run in
    the shared cache touch every stage a private run builds: where a reward model exists, the labels
    it was trained on are not read.)"""
    from alignbench.stage_cache import STAGE_CACHE_VARIABLE

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(STAGE_CACHE_VARIABLE, str(session_stage_cache))
        yield session_stage_cache


def stage_folders_in_log(log: str, stage: str) -> set[Path]:
    """The folders of stage `stage` that a run's log names as built (`building sft stage -> DIR`)
    or reused (`reusing cached sft stage DIR (built in 3s)`): the stages the run used, in whichever
    stage cache they are."""
    import re

    built = re.findall(rf"building {re.escape(stage)} stage -> (\S+)", log)
    reused = re.findall(rf"reusing cached {re.escape(stage)} stage (\S+) \(built in", log)
    return {Path(folder) for folder in built + reused}


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY_OVERRIDES)


@pytest.fixture
def tiny_gpt2():
    """A seeded 2-layer GPT-2 over 32 token ids, built without a download.

    Dropout off so results do not depend on the mode; initializer_range 0.5 gives peaked,
    prompt-dependent distributions, so greedy decoding does not just repeat one token.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=32, n_embd=32, n_layer=2, n_head=2, n_positions=64, initializer_range=0.5,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def world():
    from alignbench.world import AssistantWorld

    return AssistantWorld()


@pytest.fixture(scope="module")
def codec(world):
    from alignbench.models import TextCodec, build_world_tokenizer

    return TextCodec(build_world_tokenizer(world.vocabulary()))
