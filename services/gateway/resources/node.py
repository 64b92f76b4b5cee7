"""Node-level routes: ``/api/v1/state``, ``/api/v1/stop``, ``/api/v1/identity``."""

from __future__ import annotations

import asyncio

import falcon.asgi

from node import __version__
from services.gateway.services import Services


class State:
    def __init__(self, services: Services) -> None:
        self.services = services

    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        reports = await self.services.reports()
        body: dict[str, object] = {"state": self.services.node_state(reports)}
        body["version"] = self.services.settings.version_tag or __version__
        pow_report = reports["pow"]
        if pow_report.reachable and "status" in pow_report.status:
            body["poc_status"] = pow_report.status["status"]
        inference = reports["inference"]
        if inference.reachable:
            body["inference_healthy"] = bool(inference.status.get("healthy", False))
            body["loaded_model"] = inference.status.get("model")
        resp.media = body


class Stop:
    def __init__(self, services: Services) -> None:
        self.services = services

    async def on_post(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        # Shielded: a client that hangs up must not leave the node half stopped.
        await asyncio.shield(self.services.stop_all())
        resp.media = {"status": "OK"}


class Identity:
    def __init__(self, services: Services) -> None:
        self.services = services

    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        pair = self.services.keys.identity
        resp.media = {
            "public_key": pair.public,
            "public_key_z85": pair.public,
            "public_key_hex": pair.public_hex,
            "key_type": "curve25519",
        }
