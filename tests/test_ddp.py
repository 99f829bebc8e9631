"""Scale-out from config: `alignbench run` of DPO as a 2-process DDP run on CPU (gloo; Lightning
starts the second rank by re-running the command, so it runs as a subprocess of the test, not
of pytest) follows the same loss curve as one process at the same global batch, writes its
files once, and counts the budget of both ranks.

The one-process reference runs under `trainer.strategy=ddp` too: both then draw their batches
from Lightning's DistributedSampler, so each step of the two runs sees the same examples
(a plain single-device run shuffles with its own generator: the same data, in another order).
With two responses per labelled prompt every prompt has one pair, so the mean of the two
ranks' losses is exactly the global batch's and the runs agree to float precision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Its runs only use stages: they read and build them in the session's stage cache (conftest.py).
pytestmark = pytest.mark.usefixtures("shared_stage_cache")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, shared_stage_cache):
    from alignbench.experiment import load_experiment
    from alignbench.pipeline import Pipeline
    from tests.conftest import TINY_OVERRIDES

    folder = tmp_path_factory.mktemp("ddp")
    data: dict = {"name": "ddp", "methods": ["dpo"]}
    for override in TINY_OVERRIDES + ["labels.responses_per_prompt=2", "dpo.kl_every=2", "tracking.wandb=disabled", "trainer.accelerator=cpu"]:
        key, value = override.split("=", 1)
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    path = folder / "ddp.yaml"
    path.write_text(yaml.safe_dump(data))
    out = folder / "runs"
    Pipeline(load_experiment(str(path)), out).context(0)  # the shared stages, once
    return path, out


def _run(path: Path, out: Path, name: str, *overrides: str) -> tuple[dict, list[dict], str]:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "alignbench", "run", str(path), "--out", str(out), f"name={name}", "trainer.strategy=ddp", *overrides]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (metrics,) = (out / name).glob("dpo-seed0-*/metrics.json")
    history = [json.loads(line) for line in (metrics.parent / "history.jsonl").read_text().splitlines()]
    return json.loads(metrics.read_text())["metrics"], history, done.stdout + done.stderr


def test_two_process_ddp_follows_the_loss_curve_of_one_process_at_the_same_global_batch(experiment):
    path, out = experiment
    one, one_history, _ = _run(path, out, "one_process", "trainer.devices=1", "dpo.batch_size=8")
    two, two_history, log = _run(path, out, "two_processes", "trainer.devices=2", "dpo.batch_size=4")
    assert "MEMBER: 2/2" in log  # two ranks took part

    def curve(history, key):
        return [(row["step"], row[key]) for row in history if key in row]

    loss_one, loss_two = curve(one_history, "train/loss"), curve(two_history, "train/loss")
    assert len(loss_one) >= 5 and [s for s, _ in loss_one] == [s for s, _ in loss_two]  # rank 1 writes no rows
    for (step, a), (_, b) in zip(loss_one, loss_two):
        assert b == pytest.approx(a, abs=1e-4), step
    assert abs(loss_one[-1][1] - loss_one[0][1]) > 1e-4  # the curve moves: the policy is being trained
    kl_one, kl_two = curve(one_history, "train/kl"), curve(two_history, "train/kl")
    assert kl_one and [s for s, _ in kl_one] == [s for s, _ in kl_two]
    assert all(b == pytest.approx(a, abs=1e-4) for (_, a), (_, b) in zip(kl_one, kl_two))  # same weights along the way
    for key in ("eval/win_rate", "eval/gold_reward", "eval/kl", "eval/length"):
        assert two[key] == pytest.approx(one[key], abs=1e-4), key
    # each rank counted its own shard; the run reports both
    assert two["budget/train_tokens"] == one["budget/train_tokens"] > 0
    assert two["budget/human_labels"] == one["budget/human_labels"] > 0
