"""Process entry plumbing: settings, logging and keys, failing with one clear line."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from node import config
from node.config import Settings
from node.errors import ConfigError
from node.identity import NodeKeys, role_keys
from node.logging import configure

EX_CONFIG = 78  # sysexits.h: supervisord shows it; our one-line reason is on stderr


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
