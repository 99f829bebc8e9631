"""The one progress logger: `[alignbench] message` lines on stdout, flushed at once; warnings
(`[alignbench] warning: ...`) on stderr, so that they never mix into a table printed on stdout
(`alignbench results --format csv > table.csv`). And the libraries' own logging, quieted where a
command loads them (`quiet_libraries`)."""

from __future__ import annotations

import os
import sys


def log(message: str) -> None:
    print(f"[alignbench] {message}", flush=True)


def warn(message: str) -> None:
    print(f"[alignbench] warning: {message}", file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    """transformers' own logging and progress bars off, and datasets' (its switch is read from the
    environment when hub data first imports it: a run on the world never loads datasets, ~85 MB)."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import logging

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.accelerators.cuda").setLevel(logging.WARNING)
