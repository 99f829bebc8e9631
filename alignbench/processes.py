"""Process-level care: how a process that a sweep or the quickstart starts dies with its parent,
and how a long-lived process gives freed memory back. Light to import (no torch): the
quickstart's parent, which only waits for its worker processes, imports it."""

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


def release_freed_memory() -> None:
    """Collect garbage and hand the C heap's free memory back to the system (glibc's malloc_trim).

    Called between a process's runs and stage builds: freed tensors and Python objects leave the
    heap holding memory the next part may not need (a quickstart process held 100-230 MB more
    after a method than after trimming). Several processes run at once, so what one holds idle adds
    to the others' peaks. About 0.2 s, nearly all of it the full garbage collection over the
    ~400k objects the imports leave tracked; the trim does nothing where the C library is not glibc."""
    import gc

    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        pass
