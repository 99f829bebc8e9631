"""One run: one method, one seed — train, evaluate, write results.

`OUT/<experiment>/<run_name>/metrics.json` is written last and atomically; a run
without it is not finished and is started again by the next invocation.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from alignbench.experiment import for_run, method_config, run_config_dict, run_name
from alignbench.pipeline import Pipeline, RunContext, log
from alignbench.seeding import seeded_generator
from alignbench.registry import get_method
from alignbench.tracking import HistoryLogger, HistoryWriter, make_wandb_logger, write_json_atomic
from alignbench.training import make_trainer


class KLMonitor(Callback):
    """Estimates KL(π‖π_ref) on fresh samples from a fixed set of training prompts every
    `kl_every` steps (logged as `train/kl`), and stops training past the KL budget."""

    def __init__(self, context: RunContext, every: int, n_prompts: int, max_kl: float | None):
        self.context, self.every, self.max_kl = context, every, max_kl
        self.prompts = context.train_prompts[:n_prompts]
        self.exceeded = False

    def estimate(self, module) -> float:
        from alignbench.evaluation import sample_policy

        responses = sample_policy(module.policy, self.context.reference, self.context.codec, self.prompts, self.context.eval_config, seeded_generator(self.context.seed, "kl", module.global_step))
        return float(np.mean(responses.kl))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step % self.every == 0:
            kl = self.estimate(module)
            for logger in trainer.loggers:
                logger.log_metrics({"train/kl": kl}, step=step)
            if self.max_kl is not None and kl > self.max_kl:
                log(f"estimated KL {kl:.3f} passed the budget max_kl={self.max_kl} at step {step}; stopping training")
                trainer.should_stop = self.exceeded = True


class PeriodicEvaluation(Callback):
    """Evaluates on the validation split every `eval_every` steps (`val/*` metrics)."""

    def __init__(self, context: RunContext, every: int):
        self.context, self.every = context, every

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step % self.every == 0:
            metrics = module.validate(step)
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


def run_one(config, out: Path, method: str | None = None, seed: int | None = None, group: str | None = None, pipeline: Pipeline | None = None) -> dict[str, Any]:
    """Run one method at one seed; returns the metrics.json content. Skips a finished run."""
    config = for_run(config, method, seed)
    name = run_name(config)
    run_dir = Path(out) / config.name / name
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        log(f"{config.name}/{name} is finished; skipping (delete {metrics_path} to run it again)")
        return json.loads(metrics_path.read_text())
    pipeline = pipeline or Pipeline(config, Path(out))
    context = pipeline.context(config.seed)
    # A run without metrics.json never finished: its partial files are started afresh.
    for stale in ("history.jsonl", "samples.jsonl"):
        (run_dir / stale).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_config_dict(config)
    history = HistoryWriter(run_dir / "history.jsonl")
    wandb_logger = make_wandb_logger(config.tracking, run_dir=run_dir, experiment=config.name, run_name=name, method=config.method, group=group, resolved_config=resolved)
    loggers = [HistoryLogger(history)] + ([wandb_logger] if wandb_logger is not None else [])
    failed = True
    try:
        L.seed_everything(config.seed, verbose=False)
        method_cls = get_method(config.method)
        module = method_cls(method_config(config), context)
        log(f"run {config.name}/{name}: method {config.method}, seed {config.seed}")
        if method_cls.trains:
            train(module, context, config, loggers)
        responses = module.respond(context.evaluator.prompts["test"], seeded_generator(config.seed, "policy", "test"), desc=f"evaluating {config.method}")
        metrics, records = context.evaluator.evaluate(responses, split="test")
        metrics.update(context.rm_metrics)
        metrics.update(context.budget.metrics())
        final_train = {k: v for row in history.rows() for k, v in row.items() if k.startswith("train/")}
        metrics.update(final_train)
        for logger in loggers:
            logger.log_metrics(metrics, step=getattr(module, "global_step", 0))
        if wandb_logger is not None:
            wandb_logger.experiment.summary.update(metrics)
        with open(run_dir / "samples.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        result = {
            "experiment": config.name, "run_name": name, "method": config.method, "seed": config.seed,
            "config": resolved, "metrics": metrics, "versions": versions(),
        }
        write_json_atomic(metrics_path, result)
        failed = False
        return result
    finally:
        if wandb_logger is not None:
            import wandb

            wandb.finish(exit_code=1 if failed else 0)


class Fitter:
    """One Lightning fit with the run's loggers and callbacks; methods that iterate (rounds)
    call it once per round, and steps keep counting across rounds in the history."""

    def __init__(self, module, context: RunContext, config, loggers):
        self.module, self.context, self.config, self.loggers = module, context, config, loggers
        mc = module.config
        self.kl_monitor = KLMonitor(context, mc.kl_every, mc.kl_prompts, mc.max_kl)
        self.step_offset = self.last_fit_steps = 0

    def __call__(self, datamodule, epochs: int) -> None:
        mc = self.module.config
        callbacks = [self.kl_monitor]
        if self.config.eval.eval_every:
            callbacks.append(PeriodicEvaluation(self.context, self.config.eval.eval_every))
        for logger in self.loggers:
            if isinstance(logger, HistoryLogger):
                logger.step_offset = self.step_offset
        total = max(1, len(datamodule.train_dataloader()) * epochs)
        # Under manual optimisation (PPO) the method clips gradients itself; Lightning refuses to.
        grad_clip = mc.optim.grad_clip if self.module.automatic_optimization else 0.0
        trainer = make_trainer(self.config.trainer, max_steps=total, max_epochs=epochs, grad_clip=grad_clip, loggers=self.loggers, callbacks=callbacks)
        trainer.fit(self.module, datamodule=datamodule)
        self.last_fit_steps = trainer.global_step
        self.step_offset += trainer.global_step

    @property
    def stopped_by_kl_budget(self) -> bool:
        return self.kl_monitor.exceeded

    def log(self, metrics: dict[str, float]) -> None:
        """Log at the last step of the last fit (the history logger adds earlier fits' steps)."""
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.last_fit_steps)


def train(module, context: RunContext, config, loggers) -> None:
    fit = Fitter(module, context, config, loggers)
    module.train_policy(fit)
    # The KL at the end of training, whatever the step (the eval KL is on the test split).
    if module.config.kl_every:
        fit.log({"train/kl": fit.kl_monitor.estimate(module)})
