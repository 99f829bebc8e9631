"""StepLoggingModule hands a step's statistics to Lightning only on the steps the loggers write:
the loggers must receive exactly the rows they received when every step called `self.log`."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.logger import Logger
from torch.utils.data import DataLoader

from alignbench.training import StepLoggingModule


class RecordingLogger(Logger):
    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, {k: v for k, v in metrics.items() if k != "epoch"}))


class StopAt(Callback):
    """Stops training at a step, as the KL budget's monitor does (in on_train_batch_end)."""

    def __init__(self, step: int | None):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


class EveryStep(L.LightningModule):
    """The reference: `self.log` in every training step."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))

    def statistics(self, batch):
        loss = ((self.weight * batch).sum(-1) ** 2).mean()
        return loss, {"train/loss": loss.detach(), "train/batch_sum": batch.sum(), "train/step": torch.tensor(float(self.global_step))}

    def training_step(self, batch, batch_idx):
        loss, statistics = self.statistics(batch)
        for key, value in statistics.items():
            self.log(key, value, prog_bar=key == "train/loss", batch_size=batch.shape[0])
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class OnLoggingSteps(StepLoggingModule, EveryStep):
    def training_step(self, batch, batch_idx):
        loss, statistics = self.statistics(batch)
        self.log_step(statistics, batch.shape[0], prog_bar=("train/loss",))
        return loss


def logged_rows(module_class, log_every: int, stop_at: int | None) -> list[tuple[int, dict]]:
    torch.manual_seed(0)
    data = DataLoader(torch.randn(40, 3), batch_size=4)
    logger = RecordingLogger()
    trainer = L.Trainer(max_steps=10, max_epochs=1, logger=logger, callbacks=[StopAt(stop_at)], log_every_n_steps=log_every, accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module_class(), train_dataloaders=data)
    return [(step, {k: float(v) for k, v in row.items()}) for step, row in logger.rows]


@pytest.mark.parametrize("log_every, stop_at", [(1, None), (3, None), (3, 7), (4, 4)])
def test_the_loggers_receive_the_rows_of_logging_every_step(log_every, stop_at):
    expected = logged_rows(EveryStep, log_every, stop_at)
    assert expected  # the comparison is not of two empty logs
    assert logged_rows(OnLoggingSteps, log_every, stop_at) == expected
    if stop_at is not None:  # the step a callback stopped at is logged, with its own values
        assert expected[-1][1]["train/step"] == stop_at - 1
