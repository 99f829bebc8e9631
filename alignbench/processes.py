"""How a process that a sweep or the quickstart starts dies with its parent. Light to import (no
torch): the quickstart's parent, which only waits for its seeds' processes, imports it."""

from __future__ import annotations

import os
import sys

# Set by a parent (the sweep, the quickstart) that a run must not outlive.
PARENT_PID_VARIABLE = "ALIGNBENCH_PARENT_PID"


def follow_parent_process() -> None:
    """Linux: ask to be SIGKILLed when the parent named in PARENT_PID_VARIABLE dies (SIGKILL
    included); the variable is dropped so the run's own children (DDP ranks) do not inherit it."""
    parent = os.environ.pop(PARENT_PID_VARIABLE, None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # it died before the request was in place
        os._exit(1)
