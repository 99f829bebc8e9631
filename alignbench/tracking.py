"""Tracking: Weights & Biases (offline unless the user is logged in), plus local files.

Every run writes `history.jsonl` (one line per logged step or evaluation) as it goes and
`metrics.json` last and atomically, so nothing is lost when W&B is unreachable and the
analysis works offline. W&B credentials are never written anywhere by alignbench.
"""

from __future__ import annotations

import json
import netrc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from alignbench.records import json_safe


@dataclass
class TrackingConfig:
    """Where runs are tracked."""

    wandb: Literal["auto", "offline", "online", "disabled"] = "auto"
    """'auto': online when the user is logged in to W&B (or sets WANDB_MODE), offline otherwise."""
    project: str | None = None
    """W&B project (default: the experiment's name)."""
    entity: str | None = None
    """W&B entity (team or user); None uses the user's default."""
    group: str | None = None
    """W&B group (default: the sweep's name, or the experiment's)."""


def wandb_logged_in() -> bool:
    """True when W&B credentials exist (environment or ~/.netrc), without reading them out."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(setting: str) -> str:
    if setting != "auto":
        return setting
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode:
        return {"dryrun": "offline", "run": "online"}.get(env_mode, env_mode)
    return "online" if wandb_logged_in() else "offline"


class HistoryWriter:
    """Appends one JSON object per logged step / round / evaluation to history.jsonl."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(json_safe(row)) + "\n")

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


class HistoryLogger(Logger):
    """A Lightning logger that writes every `self.log` step to history.jsonl, and shows each
    row to its `observers` (e.g. a hyperparameter search watching the validation metrics)."""

    def __init__(self, writer: HistoryWriter, extra: dict[str, Any] | None = None, observers=()):
        super().__init__()
        self.writer, self.extra = writer, extra or {}
        self.observers = list(observers)
        self.step_offset = 0  # steps of earlier fits (rounds) of the same run

    @property
    def name(self) -> str:
        return "history"

    @property
    def version(self) -> str:
        return "0"

    @property
    @rank_zero_experiment
    def experiment(self) -> HistoryWriter:
        return self.writer

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {"step": None if step is None else step + self.step_offset, **self.extra, **{k: float(v) for k, v in metrics.items() if k != "epoch"}}
        self.writer.write(row)
        for observe in self.observers:  # after the write: an observer may stop the run (pruning)
            observe(row)


def make_wandb_logger(config: TrackingConfig, *, run_dir: Path, experiment: str, run_name: str, method: str, group: str | None, resolved_config: dict,
                      run_id: str | None = None):
    """Lightning's WandbLogger with alignbench's naming; None when W&B is disabled. `run_id`: the
    W&B id this start of the run recorded (see `Checkpoints.wandb_run_id`); without one, a stable
    id from the experiment and run name."""
    mode = resolve_wandb_mode(config.wandb)
    if mode == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    # Under a W&B sweep agent the run belongs to the agent: it sets the id (WANDB_RUN_ID),
    # project and group. Otherwise the id is stable, so that a resumed run continues its W&B run.
    agent = "WANDB_SWEEP_ID" in os.environ
    logger = WandbLogger(
        project=None if agent else config.project or experiment,
        entity=config.entity,
        group=None if agent else config.group or group or experiment,
        job_type=method,
        name=run_name,
        id=None if agent else run_id or _stable_run_id(experiment, run_name),
        resume="allow",
        save_dir=str(run_dir),
        mode=mode,
        config=resolved_config,
        settings=_wandb_settings(),
    )
    # Lightning passes wandb.init an `anonymous` argument always (None unless asked for), and W&B
    # (0.2x and later) prints "The anonymous setting has no effect" for it on every run.
    init = getattr(logger, "_wandb_init", {})
    if init.get("anonymous") is None:
        init.pop("anonymous", None)
    return logger


def _wandb_settings():
    import wandb

    # No console capture or system stats: they cost time in tiny CPU runs and add nothing.
    return wandb.Settings(console="off", x_disable_stats=True, silent=True)


def _stable_run_id(experiment: str, run_name: str) -> str:
    """The same run gets the same W&B id, so a resumed run continues instead of starting anew."""
    import hashlib

    return hashlib.sha1(f"{experiment}/{run_name}".encode()).hexdigest()[:16]


def _wandb_records(path: Path):
    """The protobuf records of a `.wandb` file (LevelDB log format: 32 KiB blocks of
    chunks with a 7-byte header; the file opens with a 7-byte ':W&B' header)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_offline_run(run_dir: Path) -> dict[str, Any]:
    """Read back an offline W&B run under `run_dir/wandb/`: its summary and history rows."""
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/*.wandb"))
    if not files:
        raise FileNotFoundError(f"no offline W&B run under {run_dir}/wandb")
    summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    for record in _wandb_records(files[-1]):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return {"summary": summary, "history": history}
