"""The stage cache: `OUT/cache/<stage>-<hash>/`, content-addressed by the stage's key.

The cache folder is `OUT/cache` unless the environment variable ALIGNBENCH_STAGE_CACHE names
another one (`stage_cache_folder`): then every output folder reads and builds its stages there,
so two experiments with different `--out` share the stages their settings have in common.

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
  the caller's random stream is the same afterwards;
- `stage.json` records the SHA-256 of every file of the stage (`sha256`) and what it was built
  with beyond its settings (`environment`: torch threads, device, torch version; not in the key).
  A stage is verified the first time a process reuses it: a file that is missing, truncated or
  changed, or a stage.json whose own numbers changed (`content_sha256`), gets a warning naming it,
  and the stage is rebuilt, never used;
- temporary folders of builds that died (`.<stage>-<hash>.tmp-<PID>`) are removed once nobody
  holds their stage's lock;
- a process that waits for another one's lock says so, and on what;
- `stage.json` also records the build's own seconds (`own_seconds`: without the stages built
  inside it) and the stages it was built from with theirs (`built_from`), and the process keeps a
  ledger of the stages it read (`StageReads`): a run's budget counts the seconds of the stages
  its method needs whether it built them or found them built (`alignbench.training.Budget`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from alignbench.config import ConfigError, config_hash
from alignbench.records import CONTENT_CHECKSUM, checksum_problems, content_checksum_problem, environment, folder_checksums, is_checksum_map, with_content_checksum
from alignbench.log import log, warn
from alignbench.processes import release_freed_memory

SUMMARY = "stage.json"
RECORDED_BY_THE_CACHE = ("seconds", "own_seconds", "built_from", "environment", "sha256", CONTENT_CHECKSUM)
"""What `cached_stage` adds to the summary a build returns."""


def build_summary(summary: dict) -> dict:
    """A stage's summary as its build returned it, without what the cache recorded beside it."""
    return {k: v for k, v in summary.items() if k not in RECORDED_BY_THE_CACHE}

STAGE_CACHE_VARIABLE = "ALIGNBENCH_STAGE_CACHE"
"""The environment variable naming a stage cache folder shared by every output folder."""


CACHE_FOLDER = "cache"  # OUT/cache: the stages, beside the experiments' folders (never an experiment's name)


def stage_cache_folder(out: Path) -> Path:
    """Where the stages of output folder `out` are cached: the folder ALIGNBENCH_STAGE_CACHE names
    (made if missing; a relative path is taken from the working directory), or `OUT/cache` where it
    is unset or empty. A value that cannot be a folder (it, or a folder above it, is a file) is a
    ConfigError naming the variable and its value, raised before any stage is built."""
    setting = os.environ.get(STAGE_CACHE_VARIABLE, "")
    if not setting:
        return Path(out) / CACHE_FOLDER
    folder = Path(setting).expanduser()
    for part in [folder, *folder.parents]:
        if part.exists():
            if not part.is_dir():
                what = "is a file, not a folder" if part == folder else f"cannot be a folder: {part} is a file"
                raise ConfigError(f"{STAGE_CACHE_VARIABLE}={setting} {what}; set it to a folder for the cached stages "
                                  f"(made if missing), or unset it to cache them in OUT/cache")
            break
    return folder


def versioned_key(key: dict, version: int) -> dict:
    """The key a stage is addressed by: `key`, with `"build": version` once the version passes 1."""
    if version < 1:
        raise ValueError(f"a stage's build version starts at 1, got {version}")
    return {**key, "build": version} if version > 1 else dict(key)


@dataclass
class StageRead:
    """Stages read by one call that asked for a stage (a build of another stage, or this process's
    own code), and the wall time spent getting them."""

    seconds: float = 0.0
    """Spent inside the call: checking the cache, waiting for another process's build, building."""
    stages: dict[str, float] = field(default_factory=dict)
    """Each stage read (its folder's name), and each stage it was built from, with its own build
    seconds (the stages built inside it left out)."""

    def add(self, other: StageRead) -> None:
        self.seconds += other.seconds
        self.stages.update(other.stages)


class StageReads:
    """What this process read from stage caches, in order: one `StageRead` for every stage asked
    for outside a stage's build (those inside a build count in the build's `built_from`). A run
    takes the reads from its start on (`since`), whichever process built the stages, and whether
    this one built them now or found them built."""

    _reads: list[StageRead] = []
    _building: list[StageRead] = []  # one per build in progress, innermost last

    @classmethod
    def mark(cls) -> int:
        """A position in the ledger, for `since`."""
        return len(cls._reads)

    @classmethod
    def since(cls, mark: int) -> StageRead:
        """Every stage read from `mark` on, and the time spent getting them."""
        total = StageRead()
        for read in cls._reads[mark:]:
            total.add(read)
        return total

    @classmethod
    def record(cls, read: StageRead) -> None:
        (cls._building[-1].add(read) if cls._building else cls._reads.append(read))

    @classmethod
    @contextmanager
    def building(cls):
        """The stages a build reads (the `StageRead` yielded), kept out of the ledger."""
        cls._building.append(StageRead())
        try:
            yield cls._building[-1]
        finally:
            cls._building.pop()


def stage_seconds(directory_name: str, summary: dict) -> dict[str, float]:
    """The stage and those it was built from, each with its own build seconds (a stage built
    before stages recorded them counts its `seconds`, its inner builds included)."""
    own = summary.get("own_seconds", summary.get("seconds", 0.0))
    return {directory_name: float(own), **{k: float(v) for k, v in summary.get("built_from", {}).items()}}


@contextmanager
def _lock(path: Path, what: str):
    """Hold the lock file `path` (for `what`, named in the message shown while waiting for it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that holds {what} (lock {path}); it is building or reading that stage")
            started = time.perf_counter()
            fcntl.flock(handle, fcntl.LOCK_EX)
            log(f"got {what} after waiting {time.perf_counter() - started:.0f}s")
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_TEMPORARY = re.compile(r"^\.(?P<stage>.+)\.tmp-(?P<pid>\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(cache: Path) -> None:
    """Remove the temporary folders of stage builds that died: their process is gone (or is this
    one) and nobody holds their stage's lock (a live build on another machine of a shared cache
    holds it, whatever its PID means here)."""
    if not cache.is_dir():
        return
    for tmp in cache.iterdir():
        found = _TEMPORARY.match(tmp.name)
        if found is None or not tmp.is_dir() or _alive(int(found["pid"])) and int(found["pid"]) != os.getpid():
            continue
        with open(cache / f".{found['stage']}.lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its stage is being built right now
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                log(f"removed {tmp}, the temporary folder of a {found['stage']} build whose process (PID {found['pid']}) ended before finishing")
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


# Stages verified by this process: folder -> the (size, mtime) of its stage.json when verified.
_VERIFIED: dict[Path, tuple[int, int]] = {}


def verified_summary(directory: Path) -> dict | None:
    """The summary of the finished stage in `directory`, its files checked against the checksums
    in its stage.json (once per process); None, after a warning naming the file, where a file is
    missing, truncated or changed, or stage.json cannot be read: the stage must be rebuilt."""
    path = directory / SUMMARY
    try:
        summary = json.loads(path.read_text())
        if not isinstance(summary, dict):
            raise ValueError(f"holds {type(summary).__name__}, not a mapping")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        warn(f"{path} cannot be read ({err}); rebuilding the stage")
        return None
    stat = path.stat()
    if _VERIFIED.get(directory) == (stat.st_size, stat.st_mtime_ns):
        return summary
    if (problem := content_checksum_problem(summary, path)) is not None:
        warn(f"{problem}; rebuilding the stage")
        return None
    recorded = summary.get("sha256")
    if recorded is None:
        # Built before stages recorded checksums: record them now, so later corruption is caught.
        summary["sha256"] = folder_checksums(directory, leave_out=(SUMMARY,))
        summary = _write_summary(directory, summary)
        log(f"{directory} was built before stages recorded checksums; recorded them now")
    else:
        if not is_checksum_map(recorded):
            warn(f"{path} cannot be read (its sha256 is {json.dumps(recorded)[:40]}, not a mapping of file names to checksums); rebuilding the stage")
            return None
        problems = checksum_problems(directory, recorded)
        if problems:
            warn(f"cached stage {directory} is damaged: {'; '.join(problems)}. It is rebuilt, not used")
            return None
        if CONTENT_CHECKSUM not in summary:  # built before stage.json checked its own numbers
            summary = _write_summary(directory, summary)
    stat = path.stat()
    _VERIFIED[directory] = (stat.st_size, stat.st_mtime_ns)
    return summary


def _write_summary(directory: Path, summary: dict) -> dict:
    """Write `summary` as the stage's stage.json, with the checksum of its own content; returns
    what was written."""
    summary = with_content_checksum(summary)
    tmp = directory / f".{SUMMARY}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, directory / SUMMARY)
    return summary


def cached_stage(cache: Path, name: str, key: dict, build: Callable[[Path], dict], built_with: Callable[[], dict] | None = None) -> tuple[Path, dict]:
    """`<cache>/<name>-<hash(key)>/` and its summary (`stage.json`), built first if needed; `cache`
    is a stage cache folder (`stage_cache_folder(out)`: `OUT/cache` by default).
    `built_with()`: the environment recorded in a stage built now, asked once it is built (a build may
    set the thread count: trainer.threads); by default torch's threads on the CPU."""
    directory = Path(cache) / f"{name}-{config_hash(key)}"
    remove_stale_temporaries(directory.parent)
    with _lock(directory.parent / f".{directory.name}.lock", f"the lock of the {name} stage {directory.name}"):
        if (directory / SUMMARY).exists() and (summary := verified_summary(directory)) is not None:
            log(f"reusing cached {name} stage {directory} (built in {summary.get('seconds', 0):.0f}s)")
            return directory, summary
        tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log(f"building {name} stage -> {directory}")
        started = time.perf_counter()
        from alignbench.seeding import preserved_global_random_state  # torch: not at import, which `alignbench quickstart`'s parent does

        with preserved_global_random_state(), StageReads.building() as inner:
            summary = build(tmp)
        seconds = time.perf_counter() - started
        summary["seconds"] = round(seconds, 1)
        summary["own_seconds"] = round(seconds - inner.seconds, 1)
        summary["built_from"] = {name: round(value, 1) for name, value in sorted(inner.stages.items())}
        summary["environment"] = built_with() if built_with is not None else environment("cpu")
        (tmp / "key.json").write_text(json.dumps(key, indent=2))
        summary["sha256"] = folder_checksums(tmp, leave_out=(SUMMARY,))
        summary = _write_summary(tmp, summary)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
        stat = (directory / SUMMARY).stat()
        _VERIFIED[directory] = (stat.st_size, stat.st_mtime_ns)
        log(f"{name} stage done in {summary['seconds']:.0f}s")
        release_freed_memory()  # a stage's models and data are gone: what it freed goes back
        return directory, summary


class StageCache:
    """The stages of one output folder, each built or read once for the life of this object."""

    def __init__(self, out: Path, built_with: Callable[[], dict] | None = None):
        self.out = Path(out)
        self.folder = stage_cache_folder(self.out)
        """Where the stages are: `OUT/cache`, or the folder ALIGNBENCH_STAGE_CACHE names."""
        self.built_with = built_with
        """What a stage built now records as its environment (called when it is built)."""
        self._seen: dict[tuple[str, str], tuple[Path, dict]] = {}

    def stage(self, name: str, key: dict, build: Callable[[Path], dict], version: int = 1) -> tuple[Path, dict]:
        """The folder and summary of stage `name` with settings `key` at build `version`."""
        key = versioned_key(key, version)
        memo = (name, config_hash(key))
        started = time.perf_counter()
        if memo not in self._seen:
            self._seen[memo] = cached_stage(self.folder, name, key, build, self.built_with)
        directory, summary = self._seen[memo]
        StageReads.record(StageRead(time.perf_counter() - started, stage_seconds(directory.name, summary)))
        return directory, summary


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
