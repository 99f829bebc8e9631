"""Resuming a run killed part-way: the history cut back to a checkpoint, a data loader that
continues mid-epoch, and end to end, PPO (killed inside its fit) and rejection sampling
(killed in its second round, so the first is restored rather than retrained) killed with
SIGKILL in a subprocess and run again end with the metrics and history of an uninterrupted
run, in one W&B run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from alignbench.runner import truncate_history
from alignbench.training import ResumableLoader

# Its runs only use stages: they read and build them in the session's stage cache (conftest.py).
pytestmark = pytest.mark.usefixtures("shared_stage_cache")


def test_history_is_cut_back_to_the_checkpoint_keeping_its_pending_training_row(tmp_path):
    rows = [{"step": 0, "train/loss": 1.0}, {"step": 2, "val/win_rate": 0.5}]
    after = [{"step": 1, "train/loss": 0.9}, {"step": 3, "val/win_rate": 0.6}, {"step": 2, "train/loss": 0.8}]
    path = tmp_path / "history.jsonl"
    before = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(before + "".join(json.dumps(r) + "\n" for r in after) + '{"step": 3, "trai')  # a row cut by the kill
    # the checkpoint was taken in step 1's callbacks; Lightning then wrote step 1's training row
    truncate_history(path, {"bytes": len(before.encode()), "pending_step": 1})
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows + after[:1]
    truncate_history(path, {"bytes": len(before.encode()), "pending_step": None})
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows


def test_resumable_loader_continues_the_interrupted_epoch_in_order():
    def loader():
        return DataLoader(list(range(20)), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(7))

    uninterrupted = ResumableLoader(loader())
    epochs = [[b.tolist() for b in uninterrupted] for _ in range(2)]
    first = ResumableLoader(loader())
    list(first)  # epoch 1
    seen = []
    for i, batch in enumerate(first):  # epoch 2, interrupted after 3 batches
        seen.append(batch.tolist())
        first.trained_batches = i + 1
        if i == 2:
            break
    state = first.state_dict()
    resumed = ResumableLoader(loader())
    resumed.load_state_dict(state)
    rest = [b.tolist() for b in resumed]
    assert seen + rest == epochs[1] and seen + rest != epochs[0]
    assert len(resumed) == len(uninterrupted) == 7


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, shared_stage_cache):
    """A tiny experiment file (stages built once, in this process) and its output folder."""
    from alignbench.experiment import load_experiment
    from alignbench.pipeline import Pipeline
    from tests.conftest import TINY_OVERRIDES

    folder = tmp_path_factory.mktemp("resume")
    overrides = TINY_OVERRIDES + [
        "ppo.iterations=6", "rejection_sampling.rounds=3", "rejection_sampling.kl_every=2", "eval.eval_every=2",
        "trainer.checkpoint_every=1", "tracking.wandb=disabled",
    ]
    from alignbench.config import apply_overrides, parse_overrides

    data = apply_overrides({}, parse_overrides(overrides))  # the overrides as a YAML file's sections
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "uninterrupted", "methods": ["ppo"], **data}))
    out = folder / "runs"
    Pipeline(load_experiment(str(path)), out).context(0)
    return path, out


def _killed_part_way(path: Path, out: Path, method: str, checkpoint: str, sig: int = signal.SIGKILL, name: str = "resumed") -> subprocess.CompletedProcess:
    """Start `alignbench run` and send it `sig` as soon as `checkpoint` is written; returns the
    process, ended, its stderr read."""
    # Its own W&B service (WANDB_SERVICE is set once this process has used W&B): a service
    # shared with this process would keep the killed run's id in use.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "alignbench", "run", str(path), f"method={method}", f"name={name}", "tracking.wandb=offline", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if list((out / name).glob(f"{method}-*/checkpoints/{checkpoint}")):
            process.send_signal(sig)
            break
        time.sleep(0.02)
    _, stderr = process.communicate(timeout=300)
    if sig == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed part-way"
    return subprocess.CompletedProcess(command, process.returncode, None, stderr)


def _run_dir(out: Path, experiment: str, method: str) -> Path:
    (found,) = (out / experiment).glob(f"{method}-seed0-*")
    return found


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


# dpo killed after its only fit's end checkpoint (in its final KL estimate or evaluation): restored
# without a trainer, its module's step reads 0, which once seeded the KL estimate and stamped the
# results row.
@pytest.mark.parametrize("method, checkpoint", [("ppo", "fit-000-last.ckpt"), ("rejection_sampling", "fit-001-last.ckpt"), ("dpo", "fit-000-end.pt")])
def test_a_run_killed_part_way_resumes_and_ends_as_an_uninterrupted_run(experiment, method, checkpoint, capsys):
    from alignbench.cli import main

    path, out = experiment
    assert main(["run", str(path), f"method={method}", "--out", str(out)]) == 0
    reference = _run_dir(out, "uninterrupted", method)

    _killed_part_way(path, out, method, checkpoint)
    run_dir = _run_dir(out, "resumed", method)
    assert not (run_dir / "metrics.json").exists() and (run_dir / "history.jsonl").exists()
    capsys.readouterr()
    assert main(["run", str(path), f"method={method}", "name=resumed", "tracking.wandb=offline", "--out", str(out)]) == 0
    assert "resuming resumed/" in capsys.readouterr().out

    expected = json.loads((reference / "metrics.json").read_text())["metrics"]
    got = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert set(got) == set(expected)
    for key, value in expected.items():
        if key != "budget/wall_s":
            assert got[key] == (value if value is None else pytest.approx(value, rel=1e-5, abs=1e-6)), key  # None: NaN
    # every row once, in order: none lost, none repeated
    rows, reference_rows = _history(run_dir), _history(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in reference_rows]
    for row, reference_row in zip(rows[:-1], reference_rows[:-1]):
        assert row.keys() == reference_row.keys()
        assert all(row[k] == pytest.approx(reference_row[k], rel=1e-5, abs=1e-6) for k in row), row
    # the second process resumed the first one's W&B run rather than starting another
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in wandb_runs}) == 1
    assert not (run_dir / "checkpoints").exists()  # a finished run keeps none


def test_each_start_of_a_run_gets_a_wandb_run_of_its_own_and_a_resumed_run_keeps_its_own(tmp_path):
    """A run started again (its checkpoints taken under other settings, its folder deleted, or the
    same run in another --out folder) must not continue the old start's W&B run: the old history
    would sit under the new rows. The id is made when a run starts and kept with its checkpoints."""
    from alignbench.runner import Checkpoints
    from alignbench.tracking import _stable_run_id

    checkpoints = Checkpoints(tmp_path / "checkpoints")
    assert checkpoints.wandb_run_id() is None  # none recorded: the stable id, as before
    checkpoints.record_config({"dpo": {"beta": 0.1}})
    first = checkpoints.wandb_run_id()
    assert first and first == Checkpoints(tmp_path / "checkpoints").wandb_run_id()  # a resumed run reads the same
    checkpoints.clear()
    checkpoints.record_config({"dpo": {"beta": 0.1}})
    assert checkpoints.wandb_run_id() not in (None, first, _stable_run_id("e", "dpo-seed0-x"))


# --- a damaged resume checkpoint ------------------------------------------------------
def _checkpoints(tmp_path, files: dict[str, int | str]):
    """Checkpoints whose files hold a run state with history mark `bytes` (an int) or are damaged ('cut')."""
    from alignbench.runner import Checkpoints

    checkpoints = Checkpoints(tmp_path / "checkpoints")
    checkpoints.directory.mkdir()
    for name, mark in files.items():
        path = checkpoints.directory / name
        torch.save({Checkpoints.RUN_STATE: {"history": {"bytes": mark if mark != "cut" else 0, "pending_step": None}}, "state_dict": {"w": torch.ones(64)}}, path)
        if mark == "cut":
            path.write_bytes(path.read_bytes()[:100])
    return checkpoints


def test_a_damaged_mid_fit_checkpoint_falls_back_to_the_end_of_the_fit_before(tmp_path, capsys):
    checkpoints = _checkpoints(tmp_path, {"fit-000-end.pt": 10, "fit-001-last.ckpt": "cut"})
    point = checkpoints.resume_point()
    assert point.completed_fits == 1 and point.mid_fit is None and point.history["bytes"] == 10
    err = capsys.readouterr().err
    assert f"resume checkpoint {checkpoints.directory / 'fit-001-last.ckpt'} is not used: it cannot be read" in err
    assert (checkpoints.directory / "fit-001-last.ckpt.unreadable").exists()


def test_a_damaged_end_of_fit_checkpoint_falls_back_and_sets_aside_what_came_after(tmp_path, capsys):
    checkpoints = _checkpoints(tmp_path, {"fit-000-end.pt": 10, "fit-001-end.pt": "cut", "fit-002-last.ckpt": 30})
    point = checkpoints.resume_point()
    assert point.completed_fits == 1 and point.mid_fit is None and point.history["bytes"] == 10
    assert sorted(p.name for p in checkpoints.directory.iterdir()) == ["fit-000-end.pt", "fit-001-end.pt.unreadable", "fit-002-last.ckpt.unreadable"]
    assert "fit-001-end.pt is not used: it cannot be read" in capsys.readouterr().err


def test_a_damaged_first_checkpoint_starts_the_run_afresh(tmp_path, capsys):
    checkpoints = _checkpoints(tmp_path, {"fit-000-last.ckpt": "cut"})
    assert checkpoints.resume_point() is None
    assert "fit-000-last.ckpt is not used" in capsys.readouterr().err


def test_the_final_evaluation_runs_on_the_runs_device():
    """After a fit on a GPU Lightning moves the module back to the CPU; the runner moves the policy
    and the reference to the run's device before evaluating (here the meta device stands in for it)."""
    from types import SimpleNamespace

    from alignbench.runner import move_for_evaluation
    from alignbench.sources import inference_device

    module, reference = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    move_for_evaluation(module, SimpleNamespace(reference=reference), "meta")
    assert module.weight.device.type == "meta" and reference.weight.device.type == "meta"
    assert inference_device(SimpleNamespace(accelerator="cpu")).type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert inference_device(SimpleNamespace(accelerator="gpu")).type == expected


def test_a_kill_right_after_a_checkpoint_is_put_in_place_loses_no_history_row(experiment, capsys):
    """The resume race of issue 21: a kill between the mid-fit checkpoint's rename and the step's
    history row lost that row for good. The test-only hook kills the run at that exact moment."""
    from alignbench.cli import main
    from alignbench.runner import KILL_AFTER_CHECKPOINT

    path, out = experiment
    assert main(["run", str(path), "method=ppo", "--out", str(out)]) == 0
    reference = _run_dir(out, "uninterrupted", "ppo")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", KILL_AFTER_CHECKPOINT: "2"}
    command = [sys.executable, "-m", "alignbench", "run", str(path), "method=ppo", "name=raced", "--out", str(out)]
    assert subprocess.run(command, env=env, capture_output=True, timeout=600).returncode == -signal.SIGKILL
    run_dir = _run_dir(out, "raced", "ppo")
    assert (run_dir / "checkpoints" / "fit-000-last.ckpt").exists() and not (run_dir / "metrics.json").exists()
    assert main(["run", str(path), "method=ppo", "name=raced", "--out", str(out)]) == 0
    assert "resuming raced/" in capsys.readouterr().out
    assert [r["step"] for r in _history(run_dir)] == [r["step"] for r in _history(reference)]


@pytest.mark.parametrize("damage", ["deleted", "edited", "config changed", "config missing"])
def test_a_history_changed_since_the_checkpoint_runs_the_run_again_from_the_start(experiment, damage, capsys):
    """Resuming keeps the rows the checkpoint covers: deleted or edited, they would be lost or wrong
    in the finished history (and an edit would be sealed by its checksum), so the run starts over.
    So does a run whose checkpoints were taken under other settings than today's (a default changed
    since: the run's name hashes only settings that differ from the defaults), or with none recorded:
    resumed, it would mix two configs."""
    from alignbench.cli import main
    from alignbench.runner import KILL_AFTER_CHECKPOINT

    path, out = experiment
    assert main(["run", str(path), "method=ppo", "--out", str(out)]) == 0
    reference = _run_dir(out, "uninterrupted", "ppo")
    name = f"history-{damage.replace(' ', '-')}"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", KILL_AFTER_CHECKPOINT: "2"}
    command = [sys.executable, "-m", "alignbench", "run", str(path), "method=ppo", f"name={name}", "--out", str(out)]
    assert subprocess.run(command, env=env, capture_output=True, timeout=600).returncode == -signal.SIGKILL
    run_dir = _run_dir(out, name, "ppo")
    history = run_dir / "history.jsonl"
    recorded = run_dir / "checkpoints" / "run_config.json"
    if damage == "config changed":
        config = json.loads(recorded.read_text())
        config["ppo"]["clip_range"] = 0.9  # as if ppo.clip_range's default had been 0.9 when the run began
        recorded.write_text(json.dumps(config))
        problem = "taken under other settings (defaults changed since?): ppo.clip_range: 0.9 -> 0.2"
    elif damage == "config missing":
        recorded.unlink()
        problem = "records no run config to check them against"
    elif damage == "deleted":
        history.unlink()
        problem = "holds 0 bytes, fewer than the"
    else:
        text = history.read_text()
        digit = next(i for i, c in enumerate(text) if c.isdigit() and text[i - 1] == ".")
        history.write_text(text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1:])
        problem = "has changed since its checkpoint was taken"
    capsys.readouterr()
    assert main(["run", str(path), "method=ppo", f"name={name}", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert problem in err and (damage.startswith("config") or f"{history} {problem}" in err) and f"{name}/{run_dir.name} starts again from the beginning" in err
    rows, reference_rows = _history(run_dir), _history(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in reference_rows]
    for row, reference_row in zip(rows[:-1], reference_rows[:-1]):
        assert all(row[k] == pytest.approx(reference_row[k], rel=1e-5, abs=1e-6) for k in row), row


def test_ctrl_c_in_training_exits_130_saying_so_and_the_run_resumes(experiment, capsys):
    """Lightning turns Ctrl-C in a fit into exit status 1, silently; alignbench's own handling
    (the message, status 130, the W&B run finished) must still be reached."""
    from alignbench.cli import main

    path, out = experiment
    ended = _killed_part_way(path, out, "ppo", "fit-000-last.ckpt", sig=signal.SIGINT, name="interrupted")
    assert ended.returncode == 130 and "alignbench: interrupted; finished runs are kept" in ended.stderr
    run_dir = _run_dir(out, "interrupted", "ppo")
    assert not (run_dir / "metrics.json").exists()
    capsys.readouterr()
    assert main(["run", str(path), "method=ppo", "name=interrupted", "tracking.wandb=offline", "--out", str(out)]) == 0
    assert "resuming interrupted/" in capsys.readouterr().out
