"""Small files replaced whole: a crash leaves the old version or the new one, never half of either."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node.errors import Unavailable


def atomic_write_json(path: Path, doc: Any, *, durable: bool = True,
                      default: Callable[[Any], Any] | None = None) -> None:
    """Replace ``path`` with ``doc`` as JSON (tmp + fsync + rename + directory fsync).

    Every file a restart resumes from goes through here. ``durable=False`` skips the fsyncs for caches
    that are only worth having (metrics snapshots): still atomic, not worth a disk flush per scrape.
    Raises :class:`Unavailable` naming the file when the disk refuses (full, read-only): the previous
    version stays intact.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
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
