"""The inference service's bus handlers for the model cache: ``models.status``, ``models.download``,
``models.delete``, ``models.list``, ``models.space``.

They answer in any node state (the Network Node pre-downloads the next model while this one serves).
Reading the cache walks directories: that runs in a thread, never on the service's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec

from contracts.models import Deleted, DownloadStarted, ModelRef, ModelStatus
from node.config import Settings
from node.errors import Conflict
from services.inference.models.cache import ModelCache, offline
from services.inference.models.downloads import Downloads

Route = Callable[..., None]


class ModelHandlers:
    def __init__(self, settings: Settings, serving: Callable[[], list[str]],
                 on_change: Callable[[], None] | None = None) -> None:
        directory = settings.service_dir("inference") / "downloads"
        self.cache = ModelCache(directory / "verified")
        self.downloads = Downloads(self.cache, directory, stall_s=settings.download_stall_s,
                                   on_change=on_change)
        #: The hub repos the engines now serve (a served model's files are not deleted under it).
        self.serving = serving

    def register(self, route: Route) -> None:
        route("models.status", self.status, ModelRef)
        route("models.download", self.download, ModelRef)
        route("models.delete", self.delete, ModelRef)
        route("models.list", self.listing)
        route("models.space", self.space)

    async def status(self, ref: ModelRef, _caller: Any) -> Any:
        task = self.downloads.running(ref)
        if task is not None:
            return msgspec.to_builtins(ModelStatus(ref, "DOWNLOADING", task.progress()))
        state = await asyncio.to_thread(self.cache.state, ref)
        return msgspec.to_builtins(ModelStatus(ref, state, None, self.downloads.last_error(ref)))  # type: ignore[arg-type]

    async def download(self, ref: ModelRef, _caller: Any) -> Any:
        if self.downloads.running(ref) is None:
            if await asyncio.to_thread(self.cache.state, ref) == "DOWNLOADED":
                return msgspec.to_builtins(DownloadStarted(ref.task_id, "DOWNLOADED", ref))
            if offline():
                return msgspec.to_builtins(DownloadStarted(ref.task_id, "IGNORED", ref))
        self.downloads.start(ref)
        return msgspec.to_builtins(DownloadStarted(ref.task_id, "DOWNLOADING", ref))

    async def delete(self, ref: ModelRef, _caller: Any) -> Any:
        if await self.downloads.cancel(ref):
            return msgspec.to_builtins(Deleted("cancelled", ref))
        if ref.hf_repo in self.serving():
            raise Conflict(f"Model {ref.hf_repo} is being served; POST /api/v1/inference/down first")
        await asyncio.to_thread(self.cache.delete, ref)
        return msgspec.to_builtins(Deleted("deleted", ref))

    async def listing(self, _payload: Any, _caller: Any) -> Any:
        return msgspec.to_builtins(await asyncio.to_thread(self.cache.listing))

    async def space(self, _payload: Any, _caller: Any) -> Any:
        return msgspec.to_builtins(await asyncio.to_thread(self.cache.space))
