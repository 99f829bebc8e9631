"""A sweep's worker process: `python -m alignbench.sweep_worker`, started by `alignbench.sweep`
(`_SweepWorker`), never by hand. A module of its own because it runs the `alignbench run`
command (`alignbench.cli`), whose parser imports the sweep module."""

from __future__ import annotations

import json
import os
import sys
import traceback

from alignbench.processes import follow_parent_process, release_freed_memory


def serve_runs() -> int:
    """Run the `alignbench run` command lines read from this process's input, one JSON line each,
    one after another in this process, each run's output going to the run's log; the run's exit
    status goes back as one JSON line on this process's output. A run's numbers do not depend on
    what ran before it in the process (each starts from its seed; `runner.run_experiment_runs`
    relies on the same; tests/test_sweep.py checks it). It exits when its input closes, and after
    a run that failed: whatever failed may have left the process in a state no later run should
    inherit, so the retry starts in a fresh one."""
    follow_parent_process()  # first: it dies with the sweep even while it imports
    replies = os.fdopen(os.dup(1), "w")
    own_output = os.dup(2)  # the worker's log
    os.dup2(own_output, 1)  # what is printed between runs goes to the log, never into the replies
    import torch

    from alignbench.cli import main as alignbench
    from alignbench.log import log

    threads = torch.get_num_threads()
    for line in sys.stdin:
        request = json.loads(line)
        log(f"worker process {os.getpid()}: running {request['name']} (its log: {request['log']})")
        with open(request["log"], "a") as run_log:
            sys.stdout.flush()
            os.dup2(run_log.fileno(), 1)
            os.dup2(run_log.fileno(), 2)
            try:
                status = alignbench(request["command"])
            except SystemExit as exit_request:  # argparse's errors
                status = exit_request.code if isinstance(exit_request.code, int) else 1
            except Exception:  # as the run's own process would have died: the traceback in its log, status 1
                traceback.print_exc()
                status = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(own_output, 1)
                os.dup2(own_output, 2)
        torch.set_num_threads(threads)  # a run's trainer.threads is that run's alone
        release_freed_memory()
        if torch.cuda.is_available():  # the next run may need memory in other block sizes than this one cached
            torch.cuda.empty_cache()
        log(f"worker process {os.getpid()}: {request['name']} ended with exit status {status}")
        replies.write(json.dumps({"exit": status}) + "\n")
        replies.flush()
        if status != 0:
            break
    return 0


if __name__ == "__main__":
    sys.exit(serve_runs())
