"""One run: one method, one seed — train, evaluate, write results.

`OUT/<experiment>/<run_name>/metrics.json` is written last and atomically; a run
without it is not finished, and running the same command again resumes it:

- Every `trainer.checkpoint_every` steps, and at the end of every fit, the run saves a
  checkpoint in its `checkpoints/` folder: Lightning's (weights, optimiser, schedule,
  loop and data-loader positions), the method's own state (`on_save_checkpoint`), the
  random states, the budget so far and how much of history.jsonl had been written.
- On resume the method's `train_policy` runs again from the top. Fits that had finished
  are not trained again: each is restored from its end-of-fit checkpoint, so whatever
  the method computes between fits (samples, relabeled data, rounds) comes out as it did.
  The interrupted fit continues from its last checkpoint; history.jsonl is cut back to that
  checkpoint, so no row appears twice; the W&B run resumes (its id is recorded with the
  checkpoints, `checkpoints/run_config.json`, beside the settings the run started with: a
  run whose settings differ from those, or with none recorded, starts again from the
  beginning, under a W&B run of its own).
- A file lock keeps two processes (two sweep workers, a re-run beside a live run) from
  running the same run at once: the second waits, then finds it finished.

Under a distributed strategy (`trainer.devices` > 1 or `trainer.num_nodes` > 1) every rank
runs this same code in lockstep: the shared stages are built on one device (they are cached,
so the other ranks load them), each fit is sharded across the ranks, the budget counts are
summed over them, and only rank 0 writes files and evaluates.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import itertools
import json
import os
import platform
import shutil
import traceback
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ParallelStrategy

from alignbench.config import ConfigError
from alignbench.records import UnreadableResult, environment, file_sha256, read_result, with_content_checksum, write_json_atomic
from alignbench.evaluation import evaluate_at_temperatures
from alignbench.experiment import RunSpec, finished_config_mismatch, output_folder, resolve_run, run_config_dict
from alignbench.log import log, warn
from alignbench.pipeline import Pipeline, RunContext
from alignbench.processes import follow_parent_process, release_freed_memory
from alignbench.seeding import seeded_generator
from alignbench.sources import inference_device
from alignbench.tracking import HistoryLogger, HistoryWriter, make_wandb_logger
from alignbench.training import NonFiniteLossError, ResumableLoader, make_trainer, rng_state, set_rng_state, steps_per_epoch, trainer_fit


class KLMonitor(Callback):
    """Estimates KL(π‖π_ref) on fresh samples from a fixed set of training prompts every
    `kl_every` steps (logged as `train/kl`), and stops training past the KL budget."""

    def __init__(self, context: RunContext, every: int, n_prompts: int, max_kl: float | None):
        self.context, self.every, self.max_kl = context, every, max_kl
        self.prompts = context.train_prompts[:n_prompts]
        self.exceeded = False

    def estimate(self, module, step: int) -> float:
        """The KL on fresh samples, drawn from a stream named by the fit's `step`."""
        from alignbench.evaluation import sample_policy

        responses = sample_policy(module.policy, self.context.reference, self.context.codec, module.asked(self.prompts), self.context.eval_config,
                                  seeded_generator(self.context.seed, "kl", step), reference_prompts=self.prompts)
        return float(np.mean(responses.kl))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        kl = getattr(module, "rollout_kl", None)  # online methods measure the KL of every rollout batch
        if self.every and step % self.every == 0:
            kl = self.estimate(module, step)
            for logger in trainer.loggers:
                logger.log_metrics({"train/kl": kl}, step=step)
        if kl is not None and self.max_kl is not None and kl > self.max_kl:
            log(f"estimated KL {kl:.3f} passed the budget max_kl={self.max_kl} at step {step}; stopping training")
            trainer.should_stop = self.exceeded = True


class PeriodicEvaluation(Callback):
    """Evaluates on the validation split every `eval_every` steps (`val/*` metrics)."""

    def __init__(self, context: RunContext, every: int):
        self.context, self.every = context, every

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step % self.every == 0:
            metrics = module.validate()
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)


def versions() -> dict[str, str]:
    import lightning
    import transformers

    import alignbench

    return {
        "alignbench": alignbench.__version__, "python": platform.python_version(), "torch": torch.__version__,
        "lightning": lightning.__version__, "transformers": transformers.__version__,
    }


def stage_pipeline(config, out: Path) -> Pipeline:
    """The pipeline of a run's shared stages. They train on one device: every rank of a
    distributed run then loads them from the cache."""
    if config.trainer.distributed:
        config = dataclasses.replace(config, trainer=config.trainer.single_process())
    return Pipeline(config, Path(out))


def is_primary_process() -> bool:
    """The only process, or rank 0 of a distributed run: the one that writes files. (A rank
    that Lightning launched has LOCAL_RANK set; a node other than the first has NODE_RANK.)"""
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


def run_one(
    config, out: Path, method: str | None = None, seed: int | None = None, group: str | None = None, pipeline: Pipeline | None = None,
    split: str = "test", observers: Iterable[Callable[[dict], None]] = (),
) -> dict[str, Any]:
    """Run one method at one seed; returns the metrics.json content. Skips a finished run and
    resumes an interrupted one.

    `split` is the evaluation split of the final metrics: "test" for results, "val" for a
    hyperparameter-search trial (`val/*` metrics; the test split is never evaluated).
    `observers` see every history row as it is logged (Optuna's pruning reads the periodic
    validation through one).
    """
    follow_parent_process()
    spec = resolve_run(config, method, seed)
    config, name = spec.config, spec.name
    run_dir = output_folder(out, config.name, name)
    metrics_path = run_dir / "metrics.json"
    if (finished := finished_result(run_dir, config)) is not None:
        log(f"{config.name}/{name} is finished; skipping (delete {metrics_path} to run it again)")
        return finished
    primary = is_primary_process()
    # Before the run's folder is made: a model or tokenizer that cannot be loaded is a config error
    # that leaves no empty run folder behind (the stages themselves are built later, in the run).
    pipeline = pipeline or stage_pipeline(config, out)
    with _exclusive(run_dir) if primary else nullcontext():
        if (finished := finished_result(run_dir, config)) is not None:  # another process finished it while this one waited
            log(f"{config.name}/{name} was finished by another process; skipping")
            return finished
        return _run(spec, run_dir, Path(out), group, pipeline, split, list(observers), primary)


def finished_result(run_dir: Path, config) -> dict[str, Any] | None:
    """The metrics.json of a finished run of `config` in `run_dir`; None where it has not finished.
    A run's name hashes only its settings that differ from the defaults, so a default changed since
    the run was made is caught here, from the config it recorded, rather than reused."""
    path = run_dir / "metrics.json"
    if not path.exists():
        return None
    try:
        result = read_result(path)
    except UnreadableResult as err:  # the run is made again; `_run` keeps the bad file beside it
        warn(f"{err}; the run is not finished and runs again")
        return None
    changed = finished_config_mismatch(result.get("config", {}), config)
    if changed:
        raise ConfigError(
            f"{path} was made with other values of these settings than this run's: {'; '.join(changed[:5])}. Its name hashes only "
            f"settings that differ from the defaults, so either a default changed since it was made, or the folder holds another "
            f"run's results (copied or moved here). Delete {run_dir} to run it again with today's settings, or set those keys to "
            f"the recorded values to reuse it."
        )
    return result


def run_experiment_runs(config, out: Path, shared: bool = False) -> list[str]:
    """Every (method, seed) run of an experiment that lists `methods` and `seeds` (the quickstart),
    method by method across the seeds, the methods of a seed sharing its stages; finished runs are
    skipped, interrupted ones resumed. A run that fails is reported on stderr (with its traceback,
    unless its settings are the cause) and the others go on; returns the runs that failed, as
    "method (seed S)".

    With `shared`, this process is one of several running the same runs (the quickstart's worker
    processes): it runs only those no other one has taken (`_claim`), so the workers share them out
    as each becomes free, and no core idles while another process still has a seed to finish. A
    seed's stages are built by the first worker that needs them (the stage cache's lock keeps that
    to one). A worker takes the next run of a seed no other worker is on, where there is one: a run
    of that seed may need a stage the other is building, and would wait for it. A run's numbers do
    not depend on which process runs it or after what: it starts from its seed, and reading a stage
    leaves the random state as building it does."""
    pipelines: dict[int, Pipeline] = {}
    failed = []
    todo = [(method, seed, output_folder(out, config.name, resolve_run(config, method, seed).name)) for method in config.methods for seed in config.seeds]
    while todo:
        busy = {seed for _, seed, run_dir in todo if _held_elsewhere(run_dir)} if shared else set()
        method, seed, run_dir = next((run for run in todo if run[1] not in busy), todo[0])
        todo.remove((method, seed, run_dir))
        with _claim(run_dir) if shared else nullcontext(True) as mine:
            if not mine:  # another worker runs it
                continue
            try:
                if seed not in pipelines:
                    pipelines[seed] = stage_pipeline(dataclasses.replace(config, seed=seed), out)  # the seed's stages, shared by its methods
                run_one(config, out, method=method, seed=seed, pipeline=pipelines[seed])
            except Exception as err:  # the other runs go on; a rerun retries this one
                if not isinstance(err, (ConfigError, NonFiniteLossError)):  # not the user's settings: show where
                    traceback.print_exc()
                warn(f"{method} at seed {seed} failed ({type(err).__name__}: {err}); going on with the other runs")
                failed.append(f"{method} (seed {seed})")
            finally:
                release_freed_memory()  # the run's policy, data and samples are gone
    return failed


def _held_elsewhere(run_dir: Path) -> bool:
    """Whether another process holds the run's claim now."""
    return _lock_held(run_dir / ".claim")


@contextmanager
def _claim(run_dir: Path):
    """Whether this process took the run in `run_dir` (True until the block ends) or another one
    holds it (False, at once, without waiting). The OS drops a claim with its process, so a worker
    that dies leaves its run to a rerun, which resumes it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".claim", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def run_in_progress(run_dir: Path) -> bool:
    """Whether a process holds the run's lock now: it is running the run (or waits for one that is)."""
    return _lock_held(run_dir / ".lock")


def _lock_held(path: Path) -> bool:
    """Whether a process holds the lock file `path` now (`_claim`'s or `_exclusive`'s). Only looks:
    a missing file (or folder) is not created, an existing one not truncated."""
    try:
        handle = open(path)
    except FileNotFoundError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


@contextmanager
def _exclusive(run_dir: Path):
    """Hold the run's lock (released by the OS however the process ends, SIGKILL included)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another process is running {run_dir}; waiting for it to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _run(spec: RunSpec, run_dir: Path, out: Path, group, pipeline, split: str, observers, primary: bool) -> dict[str, Any]:
    config, name = spec.config, spec.name
    context = pipeline.context(config.seed)
    checkpoints = Checkpoints(run_dir / "checkpoints", primary)
    resume = checkpoints.resume_point()
    history_path = run_dir / "history.jsonl"
    resolved = {**run_config_dict(config), "seed_follows": list(spec.seed_follows)}  # results pool these runs over seeds
    if primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        if (run_dir / "metrics.json").exists():  # unreadable (finished_result said so): kept, not overwritten
            kept = next(path for n in itertools.count() if not (path := run_dir / ("metrics.json.unreadable" + (f".{n}" if n else ""))).exists())
            os.replace(run_dir / "metrics.json", kept)
            log(f"moved the unreadable {run_dir / 'metrics.json'} to {kept.name}")
        (run_dir / "samples.jsonl").unlink(missing_ok=True)
        if resume is None:  # nothing to resume from: partial files are started afresh
            history_path.unlink(missing_ok=True)
            checkpoints.clear()
        elif (problem := checkpoints.config_problem(config) or history_problem(history_path, resume.history)) is not None:
            # Trained under other settings (a default changed since), or its rows would be lost or
            # wrong in a resumed run's history: run it again whole.
            warn(f"{problem}; {config.name}/{name} starts again from the beginning, not from {resume}")
            history_path.unlink(missing_ok=True)
            checkpoints.clear()
            resume = None
        else:
            truncate_history(history_path, resume.history)
            log(f"resuming {config.name}/{name} from {resume}")
        if resume is None:
            checkpoints.record_config(resolved)
    history = HistoryWriter(history_path)
    wandb_logger = make_wandb_logger(config.tracking, run_dir=run_dir, experiment=config.name, run_name=name, method=config.method, group=group, resolved_config=resolved,
                                     run_id=checkpoints.wandb_run_id())
    loggers = [HistoryLogger(history, observers=observers)] + ([wandb_logger] if wandb_logger is not None else [])
    failed = True
    try:
        L.seed_everything(config.seed, verbose=False)
        module = spec.method_class(spec.method_config, context)
        log(f"run {config.name}/{name}: method {config.method}, seed {config.seed}")
        final_step = train(module, context, config, loggers, checkpoints, resume) if spec.method_class.trains else 0
        # (The metric names say the split: eval/* for test, val/* for validation.)
        result = {"experiment": config.name, "run_name": name, "method": config.method, "seed": config.seed, "config": resolved}
        if not primary:  # rank 0 evaluates and writes the results
            failed = False
            return {**result, "metrics": {}, "versions": versions()}
        device = inference_device(config.trainer)
        move_for_evaluation(module, context, device)
        responses = module.respond(context.evaluator.prompts[split], seeded_generator(config.seed, "policy", split), desc=f"evaluating {config.method} ({split})")
        metrics, records = context.evaluator.evaluate(responses, split=split, prefix="eval" if split == "test" else split)
        metrics.update(context.rm_metrics)
        metrics.update(context.budget.metrics())
        budget_stages = context.budget.stages()  # the stages whose build seconds budget/wall_s counts
        if split == "test" and config.eval.temperatures:  # after the budget: these samples are evaluation's
            metrics.update(evaluate_at_temperatures(module, context, config.seed))
        final_train = {k: v for row in history.rows() for k, v in row.items() if k.startswith("train/")}
        metrics.update(final_train)
        loggers[0].observers = []  # they watch training; these are the results
        for logger in loggers:
            logger.log_metrics(metrics, step=final_step)
        if wandb_logger is not None:
            wandb_logger.experiment.summary.update(metrics)
        with open(run_dir / "samples.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        # What the numbers also depend on (threads, device; not in the run's name), and the checksums
        # of the files written beside metrics.json.
        result = {**result, "metrics": metrics, "budget_stages": budget_stages, "versions": versions(), "environment": environment(device, config.trainer.accelerator),
                  "sha256": {name: file_sha256(run_dir / name) for name in ("samples.jsonl", "history.jsonl") if (run_dir / name).exists()}}
        result = with_content_checksum(result)
        write_json_atomic(run_dir / "metrics.json", result)
        checkpoints.clear()  # only an unfinished run needs them
        failed = False
        return result
    finally:
        if wandb_logger is not None and primary:
            import wandb

            wandb.finish(exit_code=1 if failed else 0)


def move_for_evaluation(module, context: RunContext, device: torch.device | str) -> None:
    """Put the trained policy (and the frozen reference) on the run's device for the final
    evaluation: after a fit on a GPU, Lightning moves the module back to the CPU."""
    module.to(device)
    if isinstance(context.reference, torch.nn.Module) and any(True for _ in context.reference.parameters()):
        context.reference.to(device)


# --- resume ------------------------------------------------------------------------------
@dataclass
class ResumePoint:
    """Where an interrupted run continues: after `completed_fits` whole fits, inside fit
    number `completed_fits` from `mid_fit` (a Lightning checkpoint) if there is one."""

    completed_fits: int
    mid_fit: Path | None
    history: dict
    """How much of history.jsonl the checkpoint covers (see `truncate_history`)."""

    def __str__(self) -> str:
        where = f"step {self.history.get('global_step')} of fit {self.completed_fits + 1}" if self.mid_fit else f"the end of fit {self.completed_fits}"
        return f"its checkpoint at {where}"


# Test-only (tests/test_resume.py): SIGKILL the run right after its N-th mid-fit checkpoint is put
# in place, the window in which a kill once lost the step's history row.
KILL_AFTER_CHECKPOINT = "ALIGNBENCH_TEST_KILL_AFTER_CHECKPOINT"


class Checkpoints:
    """A run's resume files: `fit-NNN-last.ckpt`, Lightning's latest checkpoint inside fit NNN,
    and `fit-NNN-end.pt`, the state at the end of fit NNN. Both carry the runner's state
    under RUN_STATE. Only the primary process writes them."""

    RUN_STATE = "alignbench_run"
    CONFIG = "run_config.json"
    WANDB_ID = "wandb_run_id"  # a key of CONFIG beside the run's settings

    def __init__(self, directory: Path, primary: bool = True):
        self.directory, self.primary = directory, primary
        self._pending_mid: tuple[Path, Path] | None = None  # (written, its place) until `promote_mid`
        self._promoted = 0

    def mid_path(self, fit: int) -> Path:
        return self.directory / f"fit-{fit:03d}-last.ckpt"

    def end_path(self, fit: int) -> Path:
        return self.directory / f"fit-{fit:03d}-end.pt"

    def resume_point(self) -> ResumePoint | None:
        """The latest checkpoint that loads. One that does not (truncated, damaged) is set aside
        (`*.unreadable`), with everything saved after it, and the run falls back to the checkpoint
        before it, or starts afresh; the log says which."""
        completed, history = 0, None
        while self.end_path(completed).exists():
            state = self._readable(self.end_path(completed))
            if state is None:
                break
            completed, history = completed + 1, state["history"]
        saved = [p for p in self.directory.glob("fit-*") if p.name.endswith(("-last.ckpt", "-end.pt"))] if self.directory.exists() else []
        for later in sorted(saved):
            fit = int(later.name.split("-")[1])
            if fit > completed or (fit == completed and later.name.endswith("-end.pt")):  # after the damaged one: built on it
                self._set_aside(later, "it was saved after a checkpoint that cannot be read")
        mid = self.mid_path(completed)
        if mid.exists():
            state = self._readable(mid)
            if state is not None:
                return ResumePoint(completed, mid, state["history"])
        if completed:
            return ResumePoint(completed, None, history)
        return None

    def _readable(self, path: Path) -> dict | None:
        """The runner's state in checkpoint `path`; None (the file set aside, and said so) where it cannot be read."""
        try:
            return self.load(path)[self.RUN_STATE]
        except Exception as err:  # noqa: BLE001 -- torch.load raises many types for a damaged file
            self._set_aside(path, f"it cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})")
            return None

    def _set_aside(self, path: Path, why: str) -> None:
        if not path.exists():
            return
        warn(f"resume checkpoint {path} is not used: {why}; the run continues from the checkpoint before it, or from the start")
        if self.primary:
            os.replace(path, path.with_name(path.name + ".unreadable"))

    @staticmethod
    def load(path: Path) -> dict:
        return torch.load(path, map_location="cpu", weights_only=True)

    def record_config(self, resolved: dict) -> None:
        """The resolved run config the checkpoints are taken under (`run_config.json`), and a new
        W&B run id for this start of the run (`wandb_run_id`)."""
        if self.primary:
            write_json_atomic(self.directory / self.CONFIG, {**resolved, self.WANDB_ID: uuid.uuid4().hex[:16]})

    def wandb_run_id(self) -> str | None:
        """The W&B id of the run these checkpoints continue: a resumed run continues its W&B run,
        while a run started again (here or in another folder, or after its folder was deleted) gets
        a W&B run of its own, not the old one's history under its new rows. None where none is
        recorded (checkpoints of an earlier version; a rank that does not write them)."""
        try:
            recorded = json.loads((self.directory / self.CONFIG).read_text())
        except (OSError, ValueError):
            return None
        return recorded.get(self.WANDB_ID) if isinstance(recorded, dict) else None

    def config_problem(self, config) -> str | None:
        """Why the checkpoints cannot continue a run of `config`: taken under other settings (a
        run's name hashes only the settings that differ from the defaults, so a default changed
        since leaves the name as it was), or with no config recorded beside them."""
        path = self.directory / self.CONFIG
        try:
            recorded = json.loads(path.read_text())
        except FileNotFoundError:
            return f"{self.directory} records no run config to check them against ({self.CONFIG})"
        except (OSError, ValueError) as err:
            return f"{path} cannot be read ({err})"
        changed = finished_config_mismatch(recorded, config) if isinstance(recorded, dict) else ["the whole config"]
        if changed:
            return f"the checkpoints in {self.directory} were taken under other settings (defaults changed since?): {'; '.join(changed[:5])}"
        return None

    def save_mid(self, trainer, fit: int) -> None:
        """Lightning's checkpoint (every rank takes part; rank 0 writes), taken in a step's
        `on_train_batch_end`. It is renamed into place by `promote_mid`, once Lightning has written
        that step's history row: renamed at once, a kill before the row was written resumed after
        the step and lost its row for good."""
        path = self.mid_path(fit)
        tmp = path.with_name(path.name + ".tmp")
        if self.primary:
            path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp, weights_only=False)  # optimiser and loop state too
        if self.primary:
            self._pending_mid = (tmp, path)

    def promote_mid(self) -> None:
        """Put the checkpoint `save_mid` took in place (the step's history row is written by now)."""
        pending, self._pending_mid = self._pending_mid, None
        if pending is None:
            return
        os.replace(*pending)
        self._promoted += 1
        if os.environ.get(KILL_AFTER_CHECKPOINT) == str(self._promoted):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

    def save_end(self, fit: int, module, run_state: dict) -> None:
        if not self.primary:
            return
        checkpoint = {"state_dict": module.state_dict(), self.RUN_STATE: run_state}
        module.on_save_checkpoint(checkpoint)  # the method's own state, as in Lightning's checkpoints
        path = self.end_path(fit)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
        self.mid_path(fit).unlink(missing_ok=True)

    def clear(self) -> None:
        if self.primary:
            shutil.rmtree(self.directory, ignore_errors=True)


def history_mark(path: Path | None, pending_step: int | None = None) -> dict:
    """The size and checksum of history.jsonl now; `pending_step`: Lightning logs a step's
    training metrics after the step's callbacks, so a checkpoint taken in one is followed by that row."""
    data = path.read_bytes() if path is not None and path.exists() else b""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pending_step": pending_step}


def history_problem(path: Path, mark: dict) -> str | None:
    """What keeps history.jsonl from being cut back to a checkpoint's mark: the rows the checkpoint
    covers are missing or changed since (checkpoints written before the mark held a checksum are
    checked for length only). None where it can be."""
    data = path.read_bytes()[: mark["bytes"]] if path.exists() else b""
    if len(data) < mark["bytes"]:
        return f"{path} holds {len(data)} bytes, fewer than the {mark['bytes']} its checkpoint covers"
    if "sha256" in mark and hashlib.sha256(data).hexdigest() != mark["sha256"]:
        return f"{path} has changed since its checkpoint was taken"
    return None


def truncate_history(path: Path, mark: dict) -> None:
    """Cut history.jsonl back to a checkpoint: the rows written before it, plus the pending
    training row of its step if that was written (the run resumes after that step)."""
    if not path.exists():
        return
    data = path.read_bytes()
    kept, rest = data[: mark["bytes"]], data[mark["bytes"] :]
    if mark.get("pending_step") is not None:
        for line in rest.splitlines(keepends=True):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                break
            if not line.endswith(b"\n") or row.get("step") != mark["pending_step"]:
                break
            kept += line
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(kept)
    os.replace(tmp, path)


class FitState(Callback):
    """The runner's part of one fit: resume checkpoints every `every` steps, the random states
    put back where a resumed fit continues, and the budget counts summed over the ranks."""

    def __init__(self, fitter: Fitter, fit: int, every: int):
        self.fitter, self.fit, self.every = fitter, fit, every
        self.loader = None  # the fit's train loader, once the trainer says how many ranks there are
        self._budget_at_start: dict | None = None
        self._budget_to_save: dict | None = None
        self._rng_to_restore: dict | None = None

    @property
    def budget(self):
        return self.fitter.context.budget

    def on_train_start(self, trainer, module):
        self._budget_at_start = self.budget.state_dict()

    def global_budget(self, trainer) -> dict:
        """The budget with this fit's counts summed over the ranks (each counted its own shard)."""
        state = self.budget.state_dict()
        if trainer.world_size > 1:
            start = self._budget_at_start
            delta = torch.tensor([state[k] - start[k] for k in self.budget.COUNTS], dtype=torch.float64, device=trainer.strategy.root_device)
            delta = trainer.strategy.reduce(delta, reduce_op="sum").cpu()
            state.update({k: start[k] + int(d) for k, d in zip(self.budget.COUNTS, delta.tolist())})
        return state

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.fitter.checkpoints is not None:
            self.fitter.checkpoints.promote_mid()  # the previous step's history row is written by now
        if self._rng_to_restore is not None:  # right where the checkpointed run went on
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if isinstance(self.loader, ResumableLoader):
            self.loader.trained_batches = batch_idx + 1
        if self.every and trainer.global_step % self.every == 0 and not trainer.should_stop:
            self._budget_to_save = self.global_budget(trainer)  # every rank takes part in the sum
            self.fitter.checkpoints.save_mid(trainer, self.fit)

    def on_save_checkpoint(self, trainer, module, checkpoint):
        # The step Lightning will log this step's training row at (it has not yet).
        pending = trainer.fit_loop.epoch_loop._batches_that_stepped + self.fitter.step_offset
        checkpoint[Checkpoints.RUN_STATE] = {
            "fit": self.fit, "budget": self._budget_to_save or self.budget.state_dict(), "rng": rng_state(),
            "history": {**history_mark(self.fitter.history_path, pending), "global_step": trainer.global_step},
        }

    def on_load_checkpoint(self, trainer, module, checkpoint):
        state = checkpoint[Checkpoints.RUN_STATE]
        self.budget.load_state_dict(state["budget"])
        self._budget_at_start = self.budget.state_dict()
        self._rng_to_restore = state["rng"]

    def on_train_end(self, trainer, module):
        if self.fitter.checkpoints is not None:
            self.fitter.checkpoints.promote_mid()  # the last step's row is written
        self.budget.load_state_dict(self.global_budget(trainer))


class Fitter:
    """One Lightning fit with the run's loggers and callbacks; methods that iterate (rounds)
    call it once per round, and steps keep counting across rounds in the history.

    Resuming (`resume`), the fits before the resume point are restored from their
    end-of-fit checkpoints instead of trained, and nothing is logged until the run gets
    past the point its checkpoint was taken (those rows are already in history.jsonl)."""

    def __init__(self, module, context: RunContext, config, loggers, checkpoints: Checkpoints | None = None, resume: ResumePoint | None = None):
        self.module, self.context, self.config, self.loggers = module, context, config, loggers
        mc = module.config
        if mc.max_kl is not None and not mc.kl_every and not hasattr(module, "rollout_kl"):
            raise ConfigError(f"max_kl={mc.max_kl} needs a KL measured while training, but kl_every=0 and {module.name} measures none; "
                              "set kl_every > 0 or remove max_kl")
        self.kl_monitor = KLMonitor(context, mc.kl_every, mc.kl_prompts, mc.max_kl)
        self.step_offset = self.last_fit_steps = 0
        self.checkpoints, self.resume = checkpoints, resume
        self.fits = 0
        self.replaying = resume is not None
        self.history_logger = next((lg for lg in loggers if isinstance(lg, HistoryLogger)), None)
        self.history_path = self.history_logger.writer.path if self.history_logger is not None else None

    def __call__(self, datamodule, epochs: int) -> None:
        fit, self.fits = self.fits, self.fits + 1
        resume = self.resume
        if resume is not None and fit < resume.completed_fits:
            self._restore_end_of_fit(fit)
            if fit == resume.completed_fits - 1 and resume.mid_fit is None:
                self.replaying = False
            return
        checkpoint = resume.mid_fit if resume is not None and resume.mid_fit is not None and fit == resume.completed_fits else None
        self.replaying = False
        mc = self.module.config
        if self.history_logger is not None:
            self.history_logger.step_offset = self.step_offset
        data = datamodule.train_dataloader()
        # Under manual optimisation (PPO) the method clips gradients itself; Lightning refuses to.
        grad_clip = mc.optim.grad_clip if self.module.automatic_optimization else 0.0
        callbacks = [self.kl_monitor]
        if self.config.eval.eval_every:
            callbacks.append(PeriodicEvaluation(self.context, self.config.eval.eval_every))
        fit_state = FitState(self, fit, self.config.trainer.checkpoint_every if self.checkpoints is not None else 0)

        def trainer_for(total: int):
            return make_trainer(self.config.trainer, max_steps=total, max_epochs=epochs, grad_clip=grad_clip, loggers=self.loggers, callbacks=callbacks + [fit_state])

        trainer = trainer_for(max(1, len(data) * epochs))
        sharded = isinstance(trainer.strategy, ParallelStrategy)  # DDP, FSDP, DeepSpeed: a DistributedSampler
        if sharded:  # the schedule's length is each rank's number of steps
            trainer = trainer_for(max(1, steps_per_epoch(data, trainer.world_size) * epochs))
        if sharded:
            # Each rank computes its shard's values; logged, `train/*` must be the whole batch's,
            # as in one process: the mean over the ranks.
            self.module.log = functools.partial(type(self.module).log, self.module, sync_dist=True)
        # One process: a loader that resumes mid-epoch. Sharded: the plain DataLoader, which Lightning
        # gives a DistributedSampler (a fit resumed mid-epoch replays that epoch from its start).
        loader = fit_state.loader = data if sharded else ResumableLoader(data)
        trainer_fit(trainer, self.module, train_dataloaders=loader, ckpt_path=checkpoint, weights_only=True)
        self.last_fit_steps = trainer.global_step
        self.step_offset += trainer.global_step
        if self.checkpoints is not None:
            self.checkpoints.save_end(fit, self.module, self.state())

    def state(self) -> dict:
        """The runner's state at the end of a fit (with the method's, it is all a resumed run needs)."""
        return {
            "step_offset": self.step_offset, "last_fit_steps": self.last_fit_steps, "kl_exceeded": self.kl_monitor.exceeded,
            "budget": self.context.budget.state_dict(), "rng": rng_state(), "history": history_mark(self.history_path),
        }

    def _restore_end_of_fit(self, fit: int) -> None:
        checkpoint = Checkpoints.load(self.checkpoints.end_path(fit))
        self.module.load_state_dict(checkpoint["state_dict"])
        self.module.on_load_checkpoint(checkpoint)
        state = checkpoint[Checkpoints.RUN_STATE]
        self.step_offset, self.last_fit_steps = state["step_offset"], state["last_fit_steps"]
        if self.history_logger is not None:
            self.history_logger.step_offset = self.step_offset - self.last_fit_steps
        self.kl_monitor.exceeded = state["kl_exceeded"]
        self.context.budget.load_state_dict(state["budget"])
        set_rng_state(state["rng"])

    @property
    def stopped_by_kl_budget(self) -> bool:
        return self.kl_monitor.exceeded

    def log(self, metrics: dict[str, float]) -> None:
        """Log at the last step of the last fit (the history logger adds earlier fits' steps)."""
        if self.replaying:
            return
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.last_fit_steps)


def train(module, context: RunContext, config, loggers, checkpoints: Checkpoints | None = None, resume: ResumePoint | None = None) -> int:
    """Train `module` (resuming from `resume`); returns the step of its last fit, at which the
    results are logged. Not `module.global_step`: a run resumed after its last fit restores that
    fit from its checkpoint without a trainer, and the module's step would read 0."""
    fit = Fitter(module, context, config, loggers, checkpoints, resume)
    module.train_policy(fit)
    # The KL at the end of training, whatever the step (the eval KL is on the test split).
    if module.config.kl_every:
        fit.log({"train/kl": fit.kl_monitor.estimate(module, fit.last_fit_steps)})
    return fit.last_fit_steps
