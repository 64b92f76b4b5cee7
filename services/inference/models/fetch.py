"""One download attempt, run as a child process: ``python -m services.inference.models.fetch SPEC``.

``snapshot_download`` fetches the revision into the hub cache (resuming ``.incomplete`` files a killed
attempt left), then every file is checked against the hub's listing of that commit (git blob sha1, or
the LFS sha256) and the listing is recorded: that record is what lets ``status`` say DOWNLOADED later
without the network. A file whose hash does not match is removed from the cache, so the next attempt
fetches it again.

It speaks to its parent in JSON lines on stdout: ``{"event": "heartbeat", "verified_bytes"}`` while it
hashes (the parent's stall watch counts it as progress), then ``{"event": "done", "commit"}`` or
``{"event": "failed", "error", "final"}``. Exit status 0: done; 2: a final failure (the repo or the
revision does not exist, access refused); 1: anything worth another attempt.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

#: The parent hears from a hashing child at least this often (bytes between heartbeats).
HEARTBEAT_BYTES = 64 << 20
_CHUNK = 1 << 20


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _hash(path: Path, lfs: bool, size: int, verified: list[int]) -> str:
    """sha256 of the content (LFS files), else git's blob sha1 (``blob <size>\\0`` + content)."""
    digest = hashlib.sha256() if lfs else hashlib.sha1()
    if not lfs:
        digest.update(f"blob {size}\0".encode())
    since = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            since += len(chunk)
            if since >= HEARTBEAT_BYTES:
                verified[0] += since
                since = 0
                emit("heartbeat", verified_bytes=verified[0])
    verified[0] += since
    return digest.hexdigest()


def verify(api: Any, repo_id: str, commit: str,
           snapshot: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every listed file's size and hash checked; (the record, the paths that failed)."""
    from huggingface_hub.hf_api import RepoFile

    record: dict[str, dict[str, Any]] = {}
    bad: list[str] = []
    verified = [0]
    for entry in api.list_repo_tree(repo_id, recursive=True, revision=commit):
        if not isinstance(entry, RepoFile):
            continue
        local = snapshot / entry.path
        lfs = entry.lfs is not None
        expected = (entry.lfs.sha256 if entry.lfs is not None else entry.blob_id).lower()
        size = int(entry.lfs.size if entry.lfs is not None else entry.size)
        try:
            ok = local.stat().st_size == size and _hash(local, lfs, size, verified) == expected
        except OSError:
            ok = False
        if ok:
            record[entry.path] = {"size": size, "sha256" if lfs else "git_sha1": expected}
        else:
            bad.append(entry.path)
            _discard(local)
        emit("heartbeat", verified_bytes=verified[0])
    return record, bad


def _discard(local: Path) -> None:
    """Remove a bad file from the cache: the snapshot's link and the blob it points to."""
    try:
        target = local.resolve()
        if local.is_symlink():
            local.unlink()
        if target.is_file():
            target.unlink()
    except OSError:
        pass


def run(spec: dict[str, Any]) -> int:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from services.inference.models.cache import ModelCache

    repo_id, revision = spec["hf_repo"], spec.get("hf_commit")
    cache = ModelCache(Path(spec["records"]))
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache.cache_dir)))
        commit = folder.name
        record, bad = verify(HfApi(), repo_id, commit, folder)
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError, HFValidationError) as exc:
        emit("failed", error=_reason(exc), final=True)
        return 2
    except Exception as exc:  # network, disk, a consistency check: worth another attempt
        emit("failed", error=_reason(exc), final=False)
        return 1
    if bad:
        emit("failed", error=f"{len(bad)} file(s) did not match the hub's hashes: {', '.join(bad[:3])}",
             final=False)
        return 1
    cache.write_record(repo_id, commit, record)
    emit("done", commit=commit, files=len(record))
    return 0


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:500]


def main() -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    return run(json.loads(sys.argv[1]))


if __name__ == "__main__":
    raise SystemExit(main())
