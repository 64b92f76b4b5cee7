"""Node-level routes: ``/api/v1/state``, ``/api/v1/versions``, ``/api/v1/clock``, ``/api/v1/stop``,
``/api/v1/identity``.

``state`` is polled by the Network Node with a 5 s timeout (anything but 200 marks the node FAILED), so
it asks the services with a short deadline and never an engine: each service answers ``status`` from
memory, and one that does not answer in time is reported from the node's claim (as while it restarts).
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import falcon.asgi
import msgspec

from contracts import node as contract
from contracts import pow_v2
from node import __version__
from services.gateway.services import Report, Services

#: Seconds ``state`` and ``versions`` wait for a service's status (they answer within a second).
STATE_TIMEOUT_S = 0.7


def version_of(services: Services) -> str:
    return services.settings.version_tag or __version__


def serving(inference: Report) -> bool:
    """An engine serves: the inference service is running its ``up`` and has a healthy instance."""
    status = inference.status
    return inference.active and status.get("state") == "RUNNING" and bool(status.get("backends"))


class State:
    def __init__(self, services: Services) -> None:
        self.services = services

    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        reports = await self.services.reports(timeout=STATE_TIMEOUT_S)
        state = self.services.node_state(reports)
        body = msgspec.convert({"state": state, "version": version_of(self.services)}, contract.NodeState)
        inference = reports["inference"]
        if state == "INFERENCE" and inference.reachable:
            body = poc_fields(body, inference, reports["pow"])
        resp.media = msgspec.to_builtins(body)


def poc_fields(body: contract.NodeState, inference: Report, pow_report: Report) -> contract.NodeState:
    """pow-v2.md §2.7: the engines' PoC v2 status aggregated like ``/inference/pow/status``; the model
    and the validation flag while an engine serves (ours run validation jobs beside chat)."""
    status = inference.status
    found = {urlsplit(u).port for u in status.get("backends") or [] if isinstance(u, str)}
    ports = sorted(p for p in found if p is not None)
    up = serving(inference)
    model = status.get("model") if up and isinstance(status.get("model"), str) else None
    body = msgspec.structs.replace(body, inference_healthy=bool(status.get("healthy", False)) and bool(ports),
                                   loaded_model=model, poc_validation_inference=up)
    if not ports:
        return msgspec.structs.replace(body, poc_status=pow_v2.NO_BACKENDS)
    per_port = pow_report.status.get("poc_v2") if pow_report.reachable else None
    if not isinstance(per_port, dict):
        return body  # pow is restarting: we do not know
    statuses = [str(per_port.get(str(port), pow_v2.IDLE)) for port in ports]
    return msgspec.structs.replace(body, poc_status=pow_v2.aggregate(statuses))


class Versions:
    """The reference MLNode's ``/api/v1/versions``: answered in every state."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        inference = await self.services.report("inference", timeout=STATE_TIMEOUT_S)
        vllm = inference.status.get("vllm_version") if inference.reachable else None
        body = contract.Versions(version=version_of(self.services),
                                 vllm_version=vllm if isinstance(vllm, str) and vllm else None,
                                 poc_validation_inference=serving(inference))
        resp.media = msgspec.to_builtins(body)


class Clock:
    """Liveness and clock probe: 204, the wall clock at entry and just before the answer, in Unix ns."""

    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        received = time.time_ns()
        resp.status = falcon.HTTP_204
        resp.set_header("X-Server-Recv-Ns", str(received))
        resp.set_header("X-Server-Send-Ns", str(max(received, time.time_ns())))


class Stop:
    def __init__(self, services: Services) -> None:
        self.services = services

    async def on_post(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        # Shielded: a client that hangs up must not leave the node half stopped.
        await asyncio.shield(self.services.stop_all())
        resp.media = msgspec.to_builtins(contract.Status(status="OK"))


class Identity:
    def __init__(self, services: Services) -> None:
        self.services = services

    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        pair = self.services.keys.identity
        resp.media = msgspec.to_builtins(contract.Identity(
            public_key=pair.public, public_key_z85=pair.public, public_key_hex=pair.public_hex,
            key_type="curve25519"))
