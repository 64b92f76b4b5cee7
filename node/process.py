"""Process entry plumbing: settings, logging and keys, failing with one clear line."""

from __future__ import annotations

import ctypes
import os
import sys
from typing import NoReturn

from node import config
from node.config import Settings
from node.errors import ConfigError
from node.identity import NodeKeys, role_keys
from node.logging import configure

_PR_SET_PDEATHSIG = 1
# Loaded at import: a child between fork and exec (a ``preexec_fn``) must only make the call.
_libc = ctypes.CDLL(None, use_errno=True)

EX_CONFIG = 78  # sysexits.h: supervisord shows it; our one-line reason is on stderr


def die_with_parent(sig: int) -> int:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    Returns 0 when the kernel took it, else the errno (-1 where the C library has no ``prctl``), so a
    caller may log it; safe between fork and exec (no allocation, no lock).
    """
    try:
        if _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0:
            return 0
    except AttributeError:
        return -1
    return ctypes.get_errno()


def fail(process: str, message: str) -> NoReturn:
    print(f"mlnode {process}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EX_CONFIG)


#: Programs that hold the node's long-term identity secret (peer links); the others hold their own key.
HOLDS_IDENTITY = frozenset({"train"})


def bootstrap(process: str) -> tuple[Settings, NodeKeys]:
    """Load settings, configure logging and load this program's keys, or exit with a one-line reason.

    Files the process creates are private (umask 077) whatever the caller's umask; keys were created by
    ``mlnode up`` before any program started, and each program holds only its own (:func:`role_keys`).
    """
    os.umask(0o077)
    try:
        settings = config.load()
        config.ensure_dirs(settings)
        configure(process, settings.log_level)
        keys = role_keys(settings.keys_dir, process, with_identity=process in HOLDS_IDENTITY)
    except ConfigError as exc:
        fail(process, exc.message)
    except OSError as exc:
        fail(process, f"cannot prepare the state directory: {exc}")
    return settings, keys
