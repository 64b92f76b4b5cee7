"""The node's mode claim: which service last took the node, shared by every gateway worker.

The node state the client sees is derived from what the services report. This file only arbitrates:
a gateway worker that wants to start a service takes an exclusive ``flock``, asks the services whether
another one is active, records its claim here and sends the start — so two racing requests in two
workers can never both start a service. A service that restarts after a crash resumes persisted work
only if the claim still names it, and ``stop`` resets the claim to STOPPED.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from node.errors import Unavailable
from node.files import atomic_write_json, lock_file, unlock_file
from node.registry import MODES, STOPPED

__all__ = ["MODES", "STOPPED", "ModeStore"]


class ModeStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "mode.json"
        self.lock_path = state_dir / "run" / "mode.lock"

    def acquire(self) -> int:
        """Block until this process holds the node-wide mode lock; returns the handle to release."""
        fd = lock_file(self.lock_path)
        assert fd is not None  # blocking
        return fd

    def try_acquire(self, timeout: float) -> int | None:
        """The mode lock if it can be had within ``timeout`` seconds, else None (stops must not wait
        behind a start that is slow to answer)."""
        return lock_file(self.lock_path, timeout)

    @staticmethod
    def release(fd: int) -> None:
        unlock_file(fd)

    def read(self) -> str:
        try:
            mode = json.loads(self.path.read_text("utf-8")).get("mode", STOPPED)
        except (OSError, ValueError, AttributeError):
            return STOPPED
        return mode if mode in MODES else STOPPED

    def write(self, mode: str) -> None:
        if mode != STOPPED and mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        try:
            atomic_write_json(self.path, {"mode": mode, "since": time.time()})
        except Unavailable:
            if mode == STOPPED:  # a full disk must not keep a claim alive: no file reads as STOPPED
                try:
                    self.path.unlink(missing_ok=True)
                    return
                except OSError:
                    pass
            raise
