"""The stage cache: `OUT/cache/<stage>-<hash>/`, content-addressed by the stage's key.

`StageCache.stage(name, key, build)` returns a stage's folder and summary, building it first
when no finished copy exists:

- the key is everything that determines what the stage builds (its settings and the keys of
  the stages it reads), plus its build version (`alignbench.stages.versions`): a fix that
  changes what the same settings build bumps the version, so caches built before the fix are
  not reused. Version 1 is left out of the key, so the keys of stages never bumped stay what
  they were before versions existed;
- `build(tmp_dir)` writes into a temporary folder, renamed into place only once complete, so a
  crash never leaves a stage that a later run mistakes for finished;
- a file lock keeps parallel sweep workers from building the same stage twice;
- the build runs under the preserved global random state: built here or read from the cache,
  the caller's random stream is the same afterwards.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from alignbench.config import config_hash
from alignbench.log import log
from alignbench.seeding import preserved_global_random_state


def versioned_key(key: dict, version: int) -> dict:
    """The key a stage is addressed by: `key`, with `"build": version` once the version passes 1."""
    if version < 1:
        raise ValueError(f"a stage's build version starts at 1, got {version}")
    return {**key, "build": version} if version > 1 else dict(key)


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_stage(out: Path, name: str, key: dict, build: Callable[[Path], dict]) -> tuple[Path, dict]:
    """`OUT/cache/<name>-<hash(key)>/` and its summary (`stage.json`), built first if needed."""
    directory = Path(out) / "cache" / f"{name}-{config_hash(key)}"
    with _lock(directory.parent / f".{directory.name}.lock"):
        if (directory / "stage.json").exists():
            summary = json.loads((directory / "stage.json").read_text())
            log(f"reusing cached {name} stage {directory} (built in {summary.get('seconds', 0):.0f}s)")
            return directory, summary
        tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log(f"building {name} stage -> {directory}")
        started = time.perf_counter()
        with preserved_global_random_state():
            summary = build(tmp)
        summary["seconds"] = round(time.perf_counter() - started, 1)
        (tmp / "key.json").write_text(json.dumps(key, indent=2))
        (tmp / "stage.json").write_text(json.dumps(summary, indent=2))
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
        log(f"{name} stage done in {summary['seconds']:.0f}s")
        return directory, summary


class StageCache:
    """The stages of one output folder, each built or read once for the life of this object."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self._seen: dict[tuple[str, str], tuple[Path, dict]] = {}

    def stage(self, name: str, key: dict, build: Callable[[Path], dict], version: int = 1) -> tuple[Path, dict]:
        """The folder and summary of stage `name` with settings `key` at build `version`."""
        key = versioned_key(key, version)
        memo = (name, config_hash(key))
        if memo not in self._seen:
            self._seen[memo] = cached_stage(self.out, name, key, build)
        return self._seen[memo]


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
