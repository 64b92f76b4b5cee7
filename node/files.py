"""Durable small files: a crash leaves the old version or the new one, never half of either."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from node.errors import Unavailable


def atomic_write_json(path: Path, doc: Any) -> None:
    """Replace ``path`` with ``doc`` as JSON (tmp + fsync + rename + directory fsync).

    Raises :class:`Unavailable` naming the file when the disk refuses (full, read-only): the caller's
    previous version stays intact.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise Unavailable(f"cannot write {path} (state directory): {exc.strerror or exc}") from None
