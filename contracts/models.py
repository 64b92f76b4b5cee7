"""The model cache routes (``/api/v1/models/*``, ``network-node-today.md`` §3): bodies and answers.

The Network Node sends ``{"hf_repo", "hf_commit"}`` (``hf_commit`` null for the repo's default branch)
to ``status``, ``download`` and ``DELETE``; a task is keyed ``"{hf_repo}:{hf_commit}"``, or
``"{hf_repo}:latest"`` without a commit. The patterns are the Hugging Face hub's rules for repo ids and
git revisions, narrowed so that neither can name a path outside the cache (no ``..``, no leading ``/``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

from contracts.checked import PATTERN_PHRASES

_PART = r"[A-Za-z0-9_]+(?:[.-][A-Za-z0-9_]+)*"
_END = r"$(?!\n)"  # Python's "$" would also match before a final newline
REPO_ID = rf"^{_PART}(?:/{_PART})?{_END}"
PATTERN_PHRASES[REPO_ID] = "a Hugging Face repo id such as 'org/name' (letters, digits, '_', '.', '-')"
REVISION = r"^[A-Za-z0-9_]+(?:[./-][A-Za-z0-9_]+)*" + _END
PATTERN_PHRASES[REVISION] = "a commit hash, branch or tag (letters, digits, '_', '.', '-', '/'; no '..')"

HfRepo = Annotated[str, Meta(pattern=REPO_ID, max_length=96,
                             description="The hub repo id, e.g. Qwen/Qwen3-8B.")]
HfCommit = Annotated[str, Meta(pattern=REVISION, max_length=255,
                               description="A commit hash (or a branch or tag); null: the default branch.")]
ModelState = Literal["DOWNLOADED", "DOWNLOADING", "NOT_FOUND", "PARTIAL"]
MAX_DOWNLOADS = 3


class ModelRef(Struct):
    """Which model: a hub repo and, optionally, its revision. Unknown fields are ignored."""

    hf_repo: HfRepo
    hf_commit: HfCommit | None = None

    @property
    def task_id(self) -> str:
        return f"{self.hf_repo}:{self.hf_commit or 'latest'}"


class Progress(Struct):
    """A download under way: when it started, for how long, and what it has so far."""

    start_time: Annotated[float, Meta(description="Unix time the download started.")]
    elapsed_seconds: float
    downloaded_bytes: Annotated[int, Meta(ge=0, description="Bytes of the repo in the cache so far.")] = 0
    attempt: Annotated[int, Meta(
        ge=1, description="Which try this is (a failed or stalled one is retried).")] = 1


class ModelStatus(Struct, omit_defaults=False):
    """``POST /api/v1/models/status``. PARTIAL: cached but not known to be complete."""

    model: ModelRef
    status: ModelState
    progress: Progress | None = None
    error_message: Annotated[str | None, Meta(description="Why the last download failed, if it did.")] = None


class DownloadStarted(Struct):
    """``POST /api/v1/models/download`` (202). IGNORED: HF_HUB_OFFLINE is set, nothing is downloaded."""

    task_id: str
    status: Literal["DOWNLOADING", "DOWNLOADED", "IGNORED"]
    model: ModelRef


class Deleted(Struct):
    """``DELETE /api/v1/models``: the cached revision(s) removed, or the running download cancelled."""

    status: Literal["deleted", "cancelled"]
    model: ModelRef


class CachedRef(Struct):
    hf_repo: str
    hf_commit: Annotated[str, Meta(description="The revision's commit hash.")]


class CachedModel(Struct):
    model: CachedRef
    status: Literal["DOWNLOADED", "PARTIAL"]


class ModelList(Struct):
    """``GET /api/v1/models/list``: one entry per cached revision."""

    models: list[CachedModel]


class Space(Struct):
    """``GET /api/v1/models/space`` (GiB, two decimals)."""

    cache_size_gb: float
    available_gb: float
    cache_path: str
