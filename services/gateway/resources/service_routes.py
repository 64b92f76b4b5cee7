"""Routes that belong to one service (``/api/v1/{pow,inference,train}/…``) and the 409 rule.

Each route is a row of :data:`ROUTES`: which service answers it, the bus request it becomes, and
whether it *claims* the node (starts a job). Claims run under the node-wide mode lock: check that no
other service is active, record the claim, send the start — so racing requests in different workers
cannot leave two services running. Every other service route only checks the 409 rule, except rows
marked ``guarded=False``: the training peer registry must be writable while the node is STOPPED, in
TRAIN, or busy with PoW/inference before the next training task (it only stores keys; it runs nothing).
``guard_as`` names the service whose mode a route belongs to when another process does the work (PoC v2
routes belong to INFERENCE; pow computes them). Path parameters become the payload (``{name: value}``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import falcon.asgi
import msgspec

from contracts import pow_v2
from contracts.checked import Refuse
from contracts.inference import InferenceUp
from contracts.models import ModelRef
from contracts.pow import InitDto, ProofBatch
from contracts.train import TrainPeerRemove, TrainPeers, TrainStart
from node.errors import InvalidRequest
from node.registry import MODE_OF
from services.gateway.body import any_json, decode, raw_body, typed_body
from services.gateway.services import Services


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    service: str
    kind: str
    claims: bool = False
    #: The contract of the request body; None: the route reads no body.
    body: type[msgspec.Struct] | None = None
    #: The error a body the contract refuses raises (its kind picks the HTTP status).
    refuse: Refuse = InvalidRequest
    #: Send the JSON as received (after the contract accepted it) instead of the typed value, for a
    #: service that reads fields the contract leaves untyped (train reports ignored fields as notes).
    as_sent: bool = False
    #: A follow-up request sent after the claim is released, for starts that block until ready.
    wait_kind: str | None = None
    wait_timeout_s: float | None = None
    #: False: exempt from the 409 rule (the request starts nothing and must work in any mode).
    guarded: bool = True
    #: Query parameters passed to the service as the payload (``{name: value}``, only those present).
    query: tuple[str, ...] = ()
    #: A stop: answers at once and never 5xx (see :meth:`Services.stop_one`).
    stops: bool = False
    #: The service whose mode the route belongs to, when it is not ``service``.
    guard_as: str | None = None
    #: Bus deadline for the request (default: MLNODE_BUS_TIMEOUT).
    timeout_s: float | None = None
    #: The HTTP status of a success.
    success: int = 200


ROUTES: tuple[Route, ...] = (
    Route("POST", "/api/v1/pow/init", "pow", "init", claims=True, body=InitDto),
    Route("POST", "/api/v1/pow/init/generate", "pow", "init_generate", claims=True, body=InitDto),
    Route("POST", "/api/v1/pow/init/validate", "pow", "init_validate", claims=True, body=InitDto),
    Route("POST", "/api/v1/pow/phase/generate", "pow", "phase_generate"),
    Route("POST", "/api/v1/pow/phase/validate", "pow", "phase_validate"),
    Route("POST", "/api/v1/pow/validate", "pow", "validate", body=ProofBatch),
    Route("GET", "/api/v1/pow/status", "pow", "pow_status"),
    Route("POST", "/api/v1/pow/stop", "pow", "pow_stop", stops=True),
    # What the receivers refused for good: an operator reads it in any mode (it starts nothing).
    Route("GET", "/api/v1/pow/outbox/dead", "pow", "outbox.dead", query=("limit",), guarded=False),
    # The blocking start answers before the client's 15-minute timeout, success or not.
    # The blocking start replaces what serves (stop, then start); up/async keeps the 409.
    Route("POST", "/api/v1/inference/up", "inference", "up_replace", claims=True, body=InferenceUp,
          wait_kind="up_wait", wait_timeout_s=14 * 60),
    Route("POST", "/api/v1/inference/up/async", "inference", "up_start", claims=True, body=InferenceUp),
    Route("GET", "/api/v1/inference/up/status", "inference", "up_status"),
    Route("POST", "/api/v1/inference/down", "inference", "down", stops=True),
    # PoC v2 (pow-v2.md §2): INFERENCE routes, computed by pow over the engines.
    Route("POST", "/api/v1/inference/pow/init/generate", "pow", "v2.init_generate",
          body=pow_v2.InitGenerate, refuse=pow_v2.refused, guard_as="inference"),
    # ``wait: true`` blocks until the job is done: answer before the client's 15-minute timeout.
    Route("POST", "/api/v1/inference/pow/generate", "pow", "v2.generate", body=pow_v2.Generate,
          refuse=pow_v2.refused, guard_as="inference", timeout_s=14 * 60),
    Route("GET", "/api/v1/inference/pow/generate/{request_id}", "pow", "v2.job", guard_as="inference"),
    Route("GET", "/api/v1/inference/pow/status", "pow", "v2.status", guard_as="inference"),
    Route("POST", "/api/v1/inference/pow/stop", "pow", "v2.stop", body=pow_v2.Stop, refuse=pow_v2.refused,
          guard_as="inference", timeout_s=60),
    Route("POST", "/api/v1/train/start", "train", "train_start", claims=True, body=TrainStart,
          as_sent=True),
    Route("POST", "/api/v1/train/stop", "train", "train_stop", stops=True),
    Route("GET", "/api/v1/train/status", "train", "train_status"),
    Route("POST", "/api/v1/train/peers", "train", "train.peers.register", body=TrainPeers,
          guarded=False, as_sent=True),
    Route("GET", "/api/v1/train/peers", "train", "train.peers.list", guarded=False, query=("task_id",)),
    Route("POST", "/api/v1/train/peers/remove", "train", "train.peers.remove",
          body=TrainPeerRemove, guarded=False, as_sent=True),
    # The model cache (network-node-today.md §3): any node state, the inference process keeps it.
    Route("POST", "/api/v1/models/status", "inference", "models.status", body=ModelRef, guarded=False),
    Route("POST", "/api/v1/models/download", "inference", "models.download", body=ModelRef, guarded=False,
          success=202),
    Route("DELETE", "/api/v1/models", "inference", "models.delete", body=ModelRef, guarded=False),
    Route("GET", "/api/v1/models/list", "inference", "models.list", guarded=False),
    Route("GET", "/api/v1/models/space", "inference", "models.space", guarded=False),
)


class ServiceRoute:
    """One Falcon resource per path; its methods come from the rows of :data:`ROUTES`."""

    def __init__(self, services: Services, rows: list[Route]) -> None:
        self.services = services
        self.rows = {row.method: row for row in rows}
        for method in self.rows:
            setattr(self, f"on_{method.lower()}", self._respond)

    async def _respond(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, **params: str) -> None:
        row = self.rows[req.method]
        payload: Any = None
        if row.body is not None and row.as_sent:
            raw = await raw_body(req)
            await decode(req, raw, row.body, refuse=row.refuse)
            payload = await any_json(req, raw)
        elif row.body is not None:
            payload = await typed_body(req, row.body, refuse=row.refuse)  # 400 before any bus traffic
        if row.query:
            payload = {name: req.get_param(name) for name in row.query if req.get_param(name) is not None}
        if params:
            payload = dict(params)
        if row.claims:
            # Shielded: once the claim is under way a hang-up must not leave it half done.
            result = await asyncio.shield(self.services.exclusive(lambda: self._claim(row, payload)))
        elif row.stops:
            result = await asyncio.shield(self.services.stop_one(row.service, row.kind))
        else:
            if row.guarded:
                await self.services.guard(row.guard_as or row.service)
            result = await self.services.call(row.service, row.kind, payload, timeout=row.timeout_s)
        if row.wait_kind is not None:
            result = await self.services.call(row.service, row.wait_kind, payload, timeout=row.wait_timeout_s)
        resp.status = row.success
        resp.media = result

    async def _claim(self, row: Route, payload: Any) -> Any:
        await self.services.guard(row.service)
        previous = self.services.modes.read()
        self.services.modes.write(MODE_OF[row.service])
        try:
            return await self.services.call(row.service, row.kind, payload)
        except Exception:
            self.services.modes.write(previous)  # the start was refused: the claim was never real
            raise


def add_routes(app: falcon.asgi.App, services: Services) -> None:
    by_path: dict[str, list[Route]] = {}
    for row in ROUTES:
        by_path.setdefault(row.path, []).append(row)
    for path, rows in by_path.items():
        app.add_route(path, ServiceRoute(services, rows))
