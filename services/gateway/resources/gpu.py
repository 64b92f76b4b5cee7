"""``/api/v1/gpu/devices`` and ``/api/v1/gpu/driver`` from NVML (empty / 503 without it)."""

from __future__ import annotations

import asyncio

import falcon.asgi
import msgspec

from contracts.node import GpuDevices, GpuDriver
from node import gpu


class Devices:
    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        found = await asyncio.to_thread(gpu.devices)
        resp.media = msgspec.to_builtins(msgspec.convert({"devices": found, "count": len(found)}, GpuDevices))


class Driver:
    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        driver = await asyncio.to_thread(gpu.driver)
        resp.media = msgspec.to_builtins(msgspec.convert(driver, GpuDriver))
