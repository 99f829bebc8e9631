"""The one progress logger: `[alignbench] message` lines on stdout, flushed at once; warnings
(`[alignbench] warning: ...`) on stderr, so that they never mix into a table printed on stdout
(`alignbench results --format csv > table.csv`)."""

from __future__ import annotations

import sys


def log(message: str) -> None:
    print(f"[alignbench] {message}", flush=True)


def warn(message: str) -> None:
    print(f"[alignbench] warning: {message}", file=sys.stderr, flush=True)
