"""Small files replaced whole: a crash leaves the old version or the new one, never half of either."""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from node.errors import Unavailable

#: State files are the node's own: readable by its user only, whatever the umask says.
FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> Path:
    """``path`` as a directory only this user may enter (created with its parents if missing)."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    return path


def fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` durable: a rename or create survives a crash only after this."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path, *, durable: bool = True, exclusive: bool = False) -> Iterator[IO[bytes]]:
    """A binary handle whose content replaces ``path`` whole when the block ends without an error.

    The content goes to a private (0600) temporary file beside ``path``; on success it is fsynced,
    renamed into place and the directory fsynced, on any error the temporary file is removed and
    ``path`` is untouched. ``durable=False`` skips the fsyncs (still atomic); ``exclusive=True``
    links instead of renaming, so an existing ``path`` is never replaced (``FileExistsError``).
    OSError propagates: each caller names what it could not write.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        os.fchmod(fd, FILE_MODE)  # a leftover tmp file keeps its old mode through O_CREAT
        with open(fd, "wb") as fh:
            yield fh
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def lock_file(path: Path, timeout: float | None = None) -> int | None:
    """Take the exclusive ``flock`` on ``path`` (created 0600 with its directory); the descriptor.

    ``timeout=None`` blocks until the lock is free; otherwise gives up after ``timeout`` seconds
    (0: one try) and returns None. Release with :func:`unlock_file` (closing the descriptor also does).
    """
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fd
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return None
                time.sleep(0.02)
    except BaseException:
        os.close(fd)
        raise


def unlock_file(fd: int) -> None:
    """Release a lock taken by :func:`lock_file`."""
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the exclusive lock on ``path`` for the block (blocking until it is free)."""
    fd = lock_file(path)
    assert fd is not None  # a blocking lock always returns its descriptor
    try:
        yield
    finally:
        unlock_file(fd)


def atomic_write_json(path: Path, doc: Any, *, durable: bool = True,
                      default: Callable[[Any], Any] | None = None) -> None:
    """Replace ``path`` with ``doc`` as JSON through :func:`atomic_file`, mode 0600.

    Every file a restart resumes from goes through here. ``durable=False`` skips the fsyncs for caches
    that are only worth having (metrics snapshots): still atomic, not worth a disk flush per scrape.
    Raises :class:`Unavailable` naming the file when the disk refuses (full, read-only): the previous
    version stays intact.
    """
    try:
        path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        with atomic_file(path, durable=durable) as fh:
            fh.write(json.dumps(doc, default=default, separators=(",", ":")).encode("utf-8"))
    except OSError as exc:
        raise Unavailable(f"cannot write {path} (state directory): {exc.strerror or exc}") from None
