"""Process entry plumbing: settings, logging and keys, failing with one clear line."""

from __future__ import annotations

import sys
from typing import NoReturn

from node import config
from node.config import Settings
from node.errors import ConfigError
from node.identity import NodeKeys, ensure_node_keys
from node.logging import configure

EX_CONFIG = 78  # sysexits.h: supervisord shows it; our one-line reason is on stderr


def fail(process: str, message: str) -> NoReturn:
    print(f"mlnode {process}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EX_CONFIG)


def bootstrap(process: str) -> tuple[Settings, NodeKeys]:
    """Load settings, configure logging and load the keys, or exit with a one-line reason."""
    try:
        settings = config.load()
        config.ensure_dirs(settings)
        configure(process, settings.log_level)
        keys = ensure_node_keys(settings.keys_dir)
    except ConfigError as exc:
        fail(process, exc.message)
    except OSError as exc:
        fail(process, f"cannot prepare the state directory: {exc}")
    return settings, keys
