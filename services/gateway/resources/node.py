"""Node-level routes: ``/api/v1/state``, ``/api/v1/stop``, ``/api/v1/identity``."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import falcon.asgi

from contracts import pow_v2
from node import __version__
from services.gateway.services import Report, Services


class State:
    def __init__(self, services: Services) -> None:
        self.services = services

    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        reports = await self.services.reports()
        state = self.services.node_state(reports)
        body: dict[str, object] = {"state": state}
        body["version"] = self.services.settings.version_tag or __version__
        body.update(poc_status=None, inference_healthy=None, loaded_model=None)
        inference = reports["inference"]
        if state == "INFERENCE" and inference.reachable:
            body.update(poc_fields(inference.status, reports["pow"]))
        resp.media = body


def poc_fields(inference: dict[str, Any], pow_report: Report) -> dict[str, Any]:
    """pow-v2.md §2.7: the engines' PoC v2 status aggregated like ``/inference/pow/status``."""
    found = {urlsplit(u).port for u in inference.get("backends") or [] if isinstance(u, str)}
    ports = sorted(p for p in found if p is not None)
    fields: dict[str, Any] = {"inference_healthy": bool(inference.get("healthy", False)) and bool(ports),
                              "loaded_model": inference.get("model")}
    if not ports:
        return {**fields, "poc_status": pow_v2.NO_BACKENDS}
    per_port = pow_report.status.get("poc_v2") if pow_report.reachable else None
    if not isinstance(per_port, dict):
        return {**fields, "poc_status": None}  # pow is restarting: we do not know
    statuses = [str(per_port.get(str(port), pow_v2.IDLE)) for port in ports]
    return {**fields, "poc_status": pow_v2.aggregate(statuses)}


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
