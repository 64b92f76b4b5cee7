"""The Hugging Face hub cache as the model cache: where it is, what is in it, and what is complete.

The cache is huggingface_hub's own (``$HF_HUB_CACHE``, by default ``$HF_HOME/hub``; standard layout
``models--org--name/{blobs,refs,snapshots/<commit>}``), so vLLM, transformers and this node share it.
A revision is **DOWNLOADED** when its snapshot holds every file of a listing taken from the hub at
download time, with the listed sizes: the node's own record (written after a download checked every
file's hash, :mod:`.fetch`) or huggingface_hub's tree cache (``trees/<commit>.json``). Neither needs
the network, so a complete model stays DOWNLOADED on a node that cannot reach the hub. A snapshot
without such a listing is **PARTIAL** (cached, not known complete); no snapshot is **NOT_FOUND**.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from huggingface_hub import constants as hub_constants
from huggingface_hub import scan_cache_dir
from huggingface_hub.errors import CacheNotFound

from contracts.models import REPO_ID, REVISION, CachedModel, CachedRef, ModelList, ModelRef, Space
from node.errors import NotFound
from node.files import atomic_write_json

COMMIT = re.compile(r"^[0-9a-f]{40}$")
GIB = float(1 << 30)


def hub_cache_dir() -> Path:
    """huggingface_hub's cache directory, as every process of this node (and its engines) sees it."""
    return Path(hub_constants.HF_HUB_CACHE).expanduser().resolve()


def offline() -> bool:
    return bool(hub_constants.is_offline_mode())


def repo_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


class ModelCache:
    """Read and delete the cache; ``records`` is where this node keeps what it verified."""

    def __init__(self, records: Path, cache_dir: Path | None = None) -> None:
        self.records = records
        self.cache_dir = cache_dir or hub_cache_dir()

    def repo_dir(self, repo_id: str) -> Path:
        return self.cache_dir / repo_folder(repo_id)

    def resolve(self, ref: ModelRef) -> str | None:
        """The commit ``ref`` names in the cache (``refs/<branch>`` for a branch or null), or None."""
        revision = ref.hf_commit or hub_constants.DEFAULT_REVISION
        if COMMIT.match(revision):
            return revision
        with contextlib.suppress(OSError):
            commit = (self.repo_dir(ref.hf_repo) / "refs" / revision).read_text().strip()
            return commit if COMMIT.match(commit) else None
        return None

    def snapshot(self, repo_id: str, commit: str) -> Path:
        return self.repo_dir(repo_id) / "snapshots" / commit

    def state(self, ref: ModelRef) -> str:
        """DOWNLOADED, PARTIAL or NOT_FOUND (see the module docstring)."""
        commit = self.resolve(ref)
        if commit is None or not self.snapshot(ref.hf_repo, commit).is_dir():
            return "NOT_FOUND"
        return "DOWNLOADED" if self.complete(ref.hf_repo, commit) else "PARTIAL"

    def complete(self, repo_id: str, commit: str) -> bool:
        snapshot = self.snapshot(repo_id, commit)
        for listing in (self._record(repo_id, commit), self._tree_cache(repo_id, commit)):
            if listing is not None and all(_has(snapshot, path, size) for path, size in listing.items()):
                return True
        return False

    def served_path(self, repo_id: str, revision: str | None) -> Path | None:
        """The snapshot directory of a complete cached revision (for an engine to load), else None."""
        if not re.match(REPO_ID, repo_id) or (revision is not None and not re.match(REVISION, revision)):
            return None  # not a hub id (a name the CPU engine stands in for, a path)
        ref = ModelRef(hf_repo=repo_id, hf_commit=revision)
        commit = self.resolve(ref)
        if commit is None or not self.complete(repo_id, commit):
            return None
        return self.snapshot(repo_id, commit)

    # -- what this node verified -----------------------------------------------------------------
    def record_path(self, repo_id: str, commit: str) -> Path:
        return self.records / repo_folder(repo_id) / f"{commit}.json"

    def write_record(self, repo_id: str, commit: str, files: dict[str, dict[str, Any]]) -> None:
        path = self.record_path(repo_id, commit)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"hf_repo": repo_id, "commit": commit, "files": files})

    def _record(self, repo_id: str, commit: str) -> dict[str, int] | None:
        try:
            doc = json.loads(self.record_path(repo_id, commit).read_text())
            return {str(p): int(f["size"]) for p, f in doc["files"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _tree_cache(self, repo_id: str, commit: str) -> dict[str, int] | None:
        try:
            doc = json.loads((self.repo_dir(repo_id) / "trees" / f"{commit}.json").read_text())
            return {str(p): int(f["size"]) for p, f in doc["files"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    # -- the routes ------------------------------------------------------------------------------
    def _scan(self) -> Any:
        try:
            return scan_cache_dir(self.cache_dir)
        except CacheNotFound:
            return None

    def listing(self) -> ModelList:
        info = self._scan()
        models: list[CachedModel] = []
        for repo in sorted(info.repos if info else (), key=lambda r: r.repo_id):
            if repo.repo_type != "model":
                continue
            for rev in sorted(repo.revisions, key=lambda r: r.commit_hash):
                done = self.complete(repo.repo_id, rev.commit_hash)
                models.append(CachedModel(CachedRef(repo.repo_id, rev.commit_hash),
                                          "DOWNLOADED" if done else "PARTIAL"))
        return ModelList(models)

    def space(self) -> Space:
        info = self._scan()
        size = info.size_on_disk if info else 0
        here = self.cache_dir
        while not here.exists() and here != here.parent:
            here = here.parent
        free = shutil.disk_usage(here).free
        return Space(cache_size_gb=round(size / GIB, 2), available_gb=round(free / GIB, 2),
                     cache_path=str(self.cache_dir))

    def delete(self, ref: ModelRef) -> None:
        """Remove the revision ``ref`` names, or every revision of the repo without a commit; NotFound
        when the cache does not hold it."""
        info = self._scan()
        repo = next((r for r in (info.repos if info else ()) if r.repo_type == "model"
                     and r.repo_id == ref.hf_repo), None)
        if repo is None:
            if self.repo_dir(ref.hf_repo).exists():  # a download that has no snapshot yet
                shutil.rmtree(self.repo_dir(ref.hf_repo), ignore_errors=True)
                return
            raise NotFound(f"Model {ref.hf_repo} is not in the cache")
        if ref.hf_commit is None:
            commits = [rev.commit_hash for rev in repo.revisions]
        else:
            commit = self.resolve(ref)
            commits = [rev.commit_hash for rev in repo.revisions if rev.commit_hash == commit]
            if not commits:
                raise NotFound(f"Revision {ref.hf_commit} of {ref.hf_repo} is not in the cache")
        info.delete_revisions(*commits).execute()
        if ref.hf_commit is None:
            shutil.rmtree(self.repo_dir(ref.hf_repo), ignore_errors=True)  # incomplete blobs, refs
        for commit in commits:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.record_path(ref.hf_repo, commit))


def _has(snapshot: Path, path: str, size: int) -> bool:
    try:
        return (snapshot / path).stat().st_size == size
    except OSError:
        return False
