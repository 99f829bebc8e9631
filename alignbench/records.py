"""What stages and runs record beside their results, and reading it back.

- The environment: torch's thread count, the device and the torch version. Each can change the
  numbers (float sums in another order) without changing a setting, so stages and runs record them
  (stage.json, metrics.json) rather than hash them into cache keys or run names, which must stay
  what the settings alone make them.
- SHA-256 checksums of the files written, checked where they are read back; and of a metrics.json's
  or stage.json's own content (`content_sha256`), so that a number changed in one (edited by hand,
  damaged on disk) is caught, not reported.
- A run's metrics.json, read back with an error naming the file when it cannot be; JSON results
  written atomically (`write_json_atomic`), so a kill never leaves half a file.

Light to import (no torch until `environment` is called): `alignbench results` reads runs with it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def environment(device, accelerator: str | None = None) -> dict:
    """{"threads", "device", "torch"} now (and the trainer's accelerator, where given): threads is
    `torch.get_num_threads()`, the count actually used (OMP_NUM_THREADS or trainer.threads set it)."""
    import torch

    found = {"threads": torch.get_num_threads(), "device": str(device), "torch": torch.__version__}
    if accelerator is not None:
        found["accelerator"] = accelerator
    return found


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_checksums(folder: Path, leave_out: tuple[str, ...] = ()) -> dict[str, str]:
    """SHA-256 of every file under `folder` (relative POSIX path -> hex digest), except `leave_out`."""
    folder = Path(folder)
    return {path.relative_to(folder).as_posix(): file_sha256(path) for path in sorted(folder.rglob("*"))
            if path.is_file() and path.relative_to(folder).as_posix() not in leave_out}


def checksum_problems(folder: Path, recorded: dict[str, str]) -> list[str]:
    """What differs from the recorded checksums: 'FILE is missing' / 'FILE has changed (...)'."""
    problems = []
    for name, expected in recorded.items():
        path = Path(folder) / name
        try:
            actual = file_sha256(path)
        except FileNotFoundError:
            problems.append(f"{path} is missing")
            continue
        except OSError as err:
            problems.append(f"{path} cannot be read ({err.strerror or err})")
            continue
        if actual != expected:
            problems.append(f"{path} has changed since it was written (sha256 {actual[:12]}…, recorded {expected[:12]}…; truncated or overwritten)")
    return problems


def is_checksum_map(value: Any) -> bool:
    """Whether `value` is what `folder_checksums` makes: file names (text) to hex digests (text)."""
    return isinstance(value, dict) and all(isinstance(name, str) and isinstance(digest, str) for name, digest in value.items())


CONTENT_CHECKSUM = "content_sha256"
"""The key under which a metrics.json or stage.json records the SHA-256 of its other keys."""


def content_sha256(record: dict[str, Any]) -> str:
    """SHA-256 of a JSON record's keys other than `CONTENT_CHECKSUM`, as JSON reads them back
    (non-finite floats as null, sorted keys, no spaces): the same for the record written and the
    record read from its file, whatever the file's indentation."""
    content = json.loads(json.dumps(json_safe({k: v for k, v in record.items() if k != CONTENT_CHECKSUM})))
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def with_content_checksum(record: dict[str, Any]) -> dict[str, Any]:
    """`record` with the checksum of its own content, to be written."""
    return {**record, CONTENT_CHECKSUM: content_sha256(record)}


def content_checksum_problem(record: dict[str, Any], path: Path) -> str | None:
    """What is wrong with the content checksum of `record`, read from `path`; None where it matches
    or the record has none (written before records checked their own content)."""
    if CONTENT_CHECKSUM not in record:
        return None
    recorded, actual = record[CONTENT_CHECKSUM], content_sha256(record)
    if recorded == actual:
        return None
    shown = f"{recorded[:12]}…" if isinstance(recorded, str) else _shown(recorded)
    return f"{path} has changed since it was written (the sha256 of its content is {actual[:12]}…, recorded {shown}: edited by hand, or damaged)"


class UnreadableResult(ValueError):
    """A run's metrics.json that cannot be read back (truncated, not JSON, not a run's result)."""


RESULT_KEYS = ("experiment", "run_name", "method", "seed", "metrics")


def read_result(path: Path) -> dict[str, Any]:
    """A finished run's metrics.json; UnreadableResult names the file and what is wrong with it."""
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnreadableResult(f"{path} cannot be read ({err}); it was cut short or overwritten") from None
    missing = [k for k in RESULT_KEYS if not isinstance(result, dict) or k not in result]
    if missing:
        raise UnreadableResult(f"{path} is not a run's result (no {', '.join(missing)})")
    wrong = _wrongly_typed(result)
    if wrong:
        raise UnreadableResult(f"{path} is not a run's result ({'; '.join(wrong[:3])})")
    if (problem := content_checksum_problem(result, path)) is not None:
        raise UnreadableResult(problem)
    return result


def _wrongly_typed(result: dict[str, Any]) -> list[str]:
    """What in a parsed metrics.json is not of the type the runner writes: text names, an integer
    seed, a mapping of metric names to numbers (None for a value that was not finite), mappings for
    the config and the checksums. Each as 'KEY is VALUE, not TYPE'."""

    def number(value):
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))

    checks = [(key, lambda v: isinstance(v, str), "text") for key in ("experiment", "run_name", "method")]
    checks += [
        ("seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
        ("metrics", lambda v: isinstance(v, dict), "a mapping of metric names to numbers"),
        ("config", lambda v: isinstance(v, dict), "a mapping"),
        ("sha256", is_checksum_map, "a mapping of file names to checksums"),
    ]
    wrong = [f"{key} is {_shown(result[key])}, not {kind}" for key, ok, kind in checks if key in result and not ok(result[key])]
    if isinstance(result.get("metrics"), dict):
        wrong += [f"metrics.{key} is {_shown(value)}, not a number" for key, value in result["metrics"].items() if not number(value)]
    return wrong


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def json_safe(value: Any) -> Any:
    """Floats that JSON cannot hold (NaN, inf) become None; tensors and numpy scalars become numbers."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file readable by its owner only; results are shared like any file the
        # user writes, so they get the mode open() would give them (0666 less the umask).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            json.dump(json_safe(data), f, indent=2, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask
