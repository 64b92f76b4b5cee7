"""Small files replaced whole: a crash leaves the old version or the new one, never half of either."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node.errors import Unavailable

#: State files are the node's own: readable by its user only, whatever the umask says.
FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> Path:
    """``path`` as a directory only this user may enter (created with its parents if missing)."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    return path


def atomic_write_json(path: Path, doc: Any, *, durable: bool = True,
                      default: Callable[[Any], Any] | None = None) -> None:
    """Replace ``path`` with ``doc`` as JSON (tmp + fsync + rename + directory fsync), mode 0600.

    Every file a restart resumes from goes through here. ``durable=False`` skips the fsyncs for caches
    that are only worth having (metrics snapshots): still atomic, not worth a disk flush per scrape.
    Raises :class:`Unavailable` naming the file when the disk refuses (full, read-only): the previous
    version stays intact.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        os.fchmod(fd, FILE_MODE)  # a leftover tmp file keeps its old mode through O_CREAT
        with open(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, default=default, separators=(",", ":"))
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise Unavailable(f"cannot write {path} (state directory): {exc.strerror or exc}") from None
