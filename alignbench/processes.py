"""Process-level care: how a process that a sweep or the quickstart starts dies with its parent,
how a long-lived process gives freed memory back, and keeps the garbage collector off the
libraries' objects, and how a parent does torch's work in a forked child. Light to import (no
torch): the quickstart's, a sweep's and a tune's parents, which only wait for their worker
processes, import it."""

from __future__ import annotations

import os
import sys

# Set by a parent (the sweep, the quickstart) that a run must not outlive.
PARENT_PID_VARIABLE = "ALIGNBENCH_PARENT_PID"


def follow_parent_process(parent: int | None = None) -> None:
    """Linux: ask to be SIGKILLed when the parent process dies (SIGKILL included): `parent`, or
    where it is not given the one named in PARENT_PID_VARIABLE, which is dropped so that the run's
    own children (DDP ranks) do not inherit it. Nothing where neither names one."""
    variable = os.environ.pop(PARENT_PID_VARIABLE, None)
    parent = parent if parent is not None else variable
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # it died before the request was in place
        os._exit(1)


_FROZEN = False


def freeze_imported_objects() -> None:
    """Move every object alive now into the garbage collector's permanent generation, once per
    process, before its first run: the ~400k objects that importing torch, transformers and
    Lightning leaves tracked. Every full collection walked them all: 1.1 s of garbage collection
    in a 32 s rejection-sampling run, 0.46 s frozen (measured; a whole quickstart moves less than
    its run-to-run noise, benchmarks/README.md section 3).

    Called by the commands that run (`alignbench run`, the quickstart's processes, a tune's
    workers) once they have imported the libraries; not by `runner.run_one`, whose caller (a
    notebook, a test) may hold objects of its own that must stay collectable.

    Frozen objects are still freed when their reference count drops to zero; only a reference
    cycle among them is never collected. Hence once, at the start, after a full collection (what is
    frozen is alive then), and never with a run's trainer and models alive, whose cycles must go."""
    global _FROZEN
    if _FROZEN:
        return
    import gc

    gc.collect()
    gc.freeze()
    _FROZEN = True


def release_freed_memory() -> None:
    """Collect garbage and hand the C heap's free memory back to the system (glibc's malloc_trim).

    Called between a process's runs and stage builds: freed tensors and Python objects leave the
    heap holding memory the next part may not need (a quickstart process held 100-230 MB more
    after a method than after trimming). Several processes run at once, so what one holds idle adds
    to the others' peaks. Most of its time is the full garbage collection (~0.2 s, ~0.05 s once the
    imports' objects are frozen: `freeze_imported_objects`); the trim does nothing where the C
    library is not glibc."""
    import gc

    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        pass


def in_forked_child(function, *args):
    """`function(*args)` in a forked child process, its result (or its exception) returned (raised)
    here: what the child imports (torch, transformers, Lightning: ~450 MB) is freed when it exits.
    In this process where torch is loaded already (nothing to keep out; and a fork after torch's
    threads started is unsafe) or the platform cannot fork."""
    import multiprocessing

    if "torch" in sys.modules or "fork" not in multiprocessing.get_all_start_methods():
        return function(*args)
    # The child dies with this process: a parent killed while its child built the stages left the
    # child building them, an orphan, until it failed to send back what it built.
    with multiprocessing.get_context("fork").Pool(1, initializer=follow_parent_process, initargs=(os.getpid(),)) as pool:
        return pool.apply(function, args)
