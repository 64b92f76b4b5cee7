"""The edge of both HTTP ports: what a request must be before any route sees it.

One ASGI layer in front of the port router, so that every limit is applied once, the same way, on
both ports (the server protocol below it adds the header deadline and drops clients that stop reading;
see :mod:`.server`):

* **Cross-site requests** (management port): a request carrying a browser ``Origin`` the operator has
  not allowed (``MLNODE_ALLOWED_ORIGINS``), or marked ``Sec-Fetch-Site: cross-site``/``same-site``, is a
  403; a body typed as a form or plain text (the types a web page may send anywhere without asking) is a
  415. The Network Node sends no Origin and no or a JSON Content-Type: it never meets either rule.
* **Concurrent requests per port** (per gateway worker): beyond ``MLNODE_MAX_REQUESTS`` /
  ``MLNODE_MAX_INFERENCE_REQUESTS`` a request is answered 503 at once. Stops are never refused: the
  contract's client repairs a node by stopping it.
* **Bodies**: read whole here, within ``MLNODE_BODY_TIMEOUT`` (408 after) and up to
  ``MLNODE_MAX_BODY_BYTES`` / ``MLNODE_MAX_INFERENCE_BODY_BYTES`` (413 beyond, judged by Content-Length
  before a byte is read when it is given). The route then gets the body at once; a client that
  disconnects meanwhile gets nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from node.config import Settings
from node.logging import get_logger

log = get_logger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Routes that stop a job: never refused for load (see :mod:`.resources.service_routes`).
STOP_PATHS = frozenset({"/api/v1/stop", "/api/v1/pow/stop", "/api/v1/inference/down", "/api/v1/train/stop",
                        "/api/v1/inference/pow/stop"})
#: Content types a browser may send cross-site without a CORS preflight (the Fetch standard's list).
FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})
#: Where the management routes find the limits that apply to them (JSON depth).
LIMITS_KEY = "mlnode.limits"


@dataclass(frozen=True)
class Limits:
    """One port's limits, from the settings."""

    max_requests: int
    max_body_bytes: int
    body_timeout_s: float
    max_json_depth: int
    cross_site_checks: bool
    allowed_origins: frozenset[str] = frozenset()


def limits_for(settings: Settings) -> tuple[Limits, Limits]:
    """(management port, inference port)."""
    origins = frozenset(o.rstrip("/").lower() for o in settings.allowed_origins)
    api = Limits(settings.max_requests, settings.max_body_bytes, settings.body_timeout_s,
                 settings.max_json_depth, cross_site_checks=True, allowed_origins=origins)
    inference = Limits(settings.max_inference_requests, settings.max_inference_body_bytes,
                       settings.body_timeout_s, settings.max_json_depth, cross_site_checks=False)
    return api, inference


async def answer(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None,
                 *, close: bool = False) -> None:
    """A ``{"detail": ...}`` answer in the contract's error shape."""
    body = json.dumps({"detail": detail}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            *(headers or [])]
    if close:  # the rest of the request may still be on its way: this connection is done
        head.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return bytes(value)
    return None


class _Gone(Exception):
    """The client disconnected while its body was being read."""


class Edge:
    """ASGI middleware applying :class:`Limits` by the port a connection arrived on."""

    def __init__(self, app: App, settings: Settings) -> None:
        self.app = app
        self.inference_port = settings.inference_port
        self.api_limits, self.inference_limits = limits_for(settings)
        self.inflight = {"api": 0, "inference": 0}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        server = scope.get("server") or ("", 0)
        port = "inference" if server[1] == self.inference_port else "api"
        limits = self.inference_limits if port == "inference" else self.api_limits
        scope[LIMITS_KEY] = limits
        stop = port == "api" and scope.get("method") == "POST" and scope.get("path") in STOP_PATHS
        if limits.cross_site_checks:
            refusal = self._cross_site(scope, limits)
            if refusal is not None:
                status, detail = refusal
                log.warning("cross_site_refused", path=scope.get("path"), reason=detail)
                await answer(send, status, detail, close=True)
                return
        if not stop and self.inflight[port] >= limits.max_requests:
            await answer(send, 503, "too many concurrent requests on this port (at most "
                         f"{limits.max_requests} per gateway worker); retry shortly",
                         [(b"retry-after", b"1")], close=True)
            return
        self.inflight[port] += 1
        try:
            try:
                body = await self._read_body(scope, receive, limits)
            except _Gone:
                return
            except _Refused as refused:
                await answer(send, refused.status, refused.detail, close=True)
                return
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.inflight[port] -= 1

    @staticmethod
    def _cross_site(scope: Scope, limits: Limits) -> tuple[int, str] | None:
        origin = _header(scope, b"origin")
        if origin is not None:
            shown = origin.decode("latin-1")[:100]
            if shown.rstrip("/").lower() not in limits.allowed_origins:
                return 403, (f"cross-site request refused: Origin {shown!r} is not allowed on the management "
                             "port (MLNODE_ALLOWED_ORIGINS)")
            return None  # an origin the operator allows: its other headers are its own business
        site = _header(scope, b"sec-fetch-site")
        if site is not None and site.strip().lower() in (b"cross-site", b"same-site"):
            return 403, "cross-site request refused: a browser sent it from another site"
        kind = _header(scope, b"content-type")
        if kind is not None:
            media = kind.split(b";", 1)[0].strip().lower().decode("latin-1")
            if media in FORM_TYPES:
                return 415, (f"Content-Type {media} is refused: the API takes JSON (send no Content-Type or "
                             "application/json)")
        return None

    @staticmethod
    async def _read_body(scope: Scope, receive: Receive, limits: Limits) -> bytes:
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limits.max_body_bytes:
            raise _Refused(413, f"request body larger than {limits.max_body_bytes} bytes")
        parts: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(limits.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _Gone
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limits.max_body_bytes:
                        raise _Refused(413, f"request body larger than {limits.max_body_bytes} bytes")
                    parts.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(parts)
        except TimeoutError:
            raise _Refused(408, f"request body not received within {limits.body_timeout_s:g} s") from None


class _Refused(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands out the body read already, then the connection's own events."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
