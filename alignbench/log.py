"""The one progress logger: `[alignbench] message` lines on stdout, flushed at once."""

from __future__ import annotations


def log(message: str) -> None:
    print(f"[alignbench] {message}", flush=True)
