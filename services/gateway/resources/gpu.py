"""``/api/v1/gpu/devices`` and ``/api/v1/gpu/driver`` from NVML (empty / 503 without it)."""

from __future__ import annotations

import asyncio

import falcon.asgi

from node import gpu


class Devices:
    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        found = await asyncio.to_thread(gpu.devices)
        resp.media = {"devices": found, "count": len(found)}


class Driver:
    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.media = await asyncio.to_thread(gpu.driver)
