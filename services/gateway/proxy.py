"""The inference proxy: every path on the inference port (and ``/v1/*`` on the management port).

Each gateway worker learns the healthy engine instances from the inference service over the bus: it
asks (``backends``) at start, follows the service's ``backends`` events as they happen, and asks again
every few seconds in case an event was missed (PUB/SUB drops what is published before a subscriber
connects). Requests go to the least-loaded instance; with none healthy the answer is 503
``{"detail": "No inference backend available"}``. Only allowlisted paths are proxied (404 otherwise, see
:mod:`.upstream_allowlist`); bodies go to the engine byte for byte (the network's fields, such as
``enforced_tokens``, are read by the engines themselves).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from bus.local import LocalBus
from node.config import Settings
from node.errors import MLNodeError
from node.logging import get_logger
from services.gateway.services import Services
from services.gateway.upstream_allowlist import NOT_FOUND, allowed
from services.gateway.upstream_balancer import Balancer
from services.gateway.upstream_relay import IDLE_TIMEOUT_S, ReverseProxy, send_json

log = get_logger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

REFRESH_S = 5.0
#: Refreshes that may fail in a row (the inference process restarting) before the set is dropped.
MAX_FAILED_REFRESHES = 3


def backend_urls(payload: Any) -> list[str] | None:
    """The URL list of a ``backends`` reply or event; None when it is not one."""
    if isinstance(payload, dict):
        payload = payload.get("backends")
    if isinstance(payload, list) and all(isinstance(u, str) for u in payload):
        return list(payload)
    return None


class InferenceProxy:
    def __init__(self, settings: Settings, services: Services, *, refresh_s: float = REFRESH_S) -> None:
        self.settings = settings
        self.services = services
        self.refresh_s = refresh_s
        self.balancer = Balancer(IDLE_TIMEOUT_S)
        self.relay = ReverseProxy(self.balancer)
        self._tasks: list[asyncio.Task[None]] = []
        self._bus: LocalBus | None = None

    async def start(self) -> None:
        """Begin following the inference service (returns at once; the first answer comes later)."""
        loop = asyncio.get_running_loop()
        self._bus = LocalBus(self.settings, self.services.keys, role="gateway")
        self._tasks = [loop.create_task(self._follow_events()), loop.create_task(self._refresh_loop())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self.balancer.close()
        if self._bus is not None:
            self._bus.close()
            self._bus = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not allowed(scope):
            await send_json(send, 404, NOT_FOUND)
            return
        await self.relay(scope, receive, send)

    def apply(self, urls: list[str], source: str) -> None:
        try:
            changed = self.balancer.update(urls)
        except ValueError as exc:
            log.warning("backends_rejected", source=source, error=str(exc))
            return
        if changed:
            log.info("backends_changed", source=source, backends=urls)

    async def _follow_events(self) -> None:
        assert self._bus is not None
        subscriber = self._bus.subscriber("inference", ("backends",))
        try:
            async for topic, payload in subscriber:
                urls = backend_urls(payload)
                if topic == "backends" and urls is not None:
                    self.apply(urls, "event")
        finally:
            subscriber.close()

    async def _refresh_loop(self) -> None:
        failures = 0
        while True:
            try:
                reply = await self.services.call("inference", "backends", timeout=3.0)
            except MLNodeError as exc:
                failures += 1
                if failures == MAX_FAILED_REFRESHES and self.balancer.size:
                    log.warning("backends_dropped", reason=exc.message)
                    self.apply([], "refresh")
            else:
                failures = 0
                urls = backend_urls(reply)
                if urls is not None:
                    self.apply(urls, "refresh")
            await asyncio.sleep(self.refresh_s)
