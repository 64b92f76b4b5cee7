"""The gateway's ASGI application: management API on one port, inference proxy on the other.

gunicorn binds both ports in the same workers; the ASGI scope says which port a connection came in
on, and :class:`PortRouter` sends it to the management app or to the inference proxy. Every request
passes the token check, then the edge (:mod:`.edge`: cross-site refusals, concurrency, body size and
deadline), then routing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import falcon
import falcon.asgi

from node.config import Settings
from node.errors import MLNodeError
from services.gateway import auth, errors
from services.gateway.edge import Edge
from services.gateway.metrics import MeasuredServices
from services.gateway.proxy import InferenceProxy
from services.gateway.resources import gpu, health, metrics, network_metrics, node, openapi, service_routes
from services.gateway.services import Services
from services.gateway.upstream_relay import send_json

#: Engine paths the management port proxies besides ``/v1/*`` (single-URL mode: one base URL for all).
ENGINE_PATHS = frozenset({"/tokenize", "/detokenize", "/version"})
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def management_app(services: Services, proxy: InferenceProxy) -> falcon.asgi.App:
    app = falcon.asgi.App(media_type=falcon.MEDIA_JSON)
    app.req_options.default_media_type = falcon.MEDIA_JSON  # a missing Content-Type means JSON
    app.req_options.strip_url_path_trailing_slash = False
    app.add_error_handler(Exception, errors.handle_unexpected)
    app.add_error_handler(MLNodeError, errors.handle_mlnode_error)
    app.set_error_serializer(errors.serialize_http_error)
    app.add_route("/api/v1/state", node.State(services))
    app.add_route("/api/v1/versions", node.Versions(services))
    app.add_route("/api/v1/clock", node.Clock())
    app.add_route("/api/v1/stop", node.Stop(services))
    app.add_route("/api/v1/identity", node.Identity(services))
    for path in ("/health", "/livez"):
        app.add_route(path, health.Health(services))
    app.add_route("/readyz", health.Ready(services))
    app.add_route("/api/v1/gpu/devices", gpu.Devices())
    app.add_route("/api/v1/gpu/driver", gpu.Driver())
    service_routes.add_routes(app, services)
    app.add_route("/metrics", metrics.Metrics(services))
    app.add_route("/api/v1/metrics", network_metrics.NetworkMetrics(services))
    app.add_route("/api/v1/openapi.json", openapi.OpenApi(services.settings.version_tag))
    return app


class PortRouter:
    """ASGI entry: routes by the local port of the connection; owns the per-worker resources."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.services = MeasuredServices(settings)
        self.proxy = InferenceProxy(settings, self.services)
        self.api = management_app(self.services, self.proxy)
        self.edge = Edge(self._route, settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        token = self.settings.api_token
        if scope["type"] == "http" and (reason := auth.refusal(token, scope)) is not None:
            await send_json(send, 401, {"detail": reason}, headers=[auth.CHALLENGE])
            return  # before the edge reads a byte of the body
        await self.edge(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = self.settings.api_token
        server = scope.get("server") or ("", 0)
        path = scope.get("path", "")
        if server[1] == self.settings.inference_port or (
                scope["type"] == "http" and (path.startswith("/v1/") or path in ENGINE_PATHS)):
            if token:
                auth.scrub(scope)
            await self.proxy(scope, receive, send)  # the management port proxies the engine's API too
        else:
            await self.api(scope, receive, send)  # type: ignore[arg-type]

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.proxy.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.proxy.close()
                self.services.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(settings: Settings) -> PortRouter:
    return PortRouter(settings)
