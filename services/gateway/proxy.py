"""The inference proxy: every path on the inference port (and ``/v1/*`` on the management port).

Until an engine backend is healthy it answers 503 with the client's ``{"detail"}`` shape.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from node.config import Settings
from services.gateway.services import Services

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class InferenceProxy:
    def __init__(self, settings: Settings, services: Services) -> None:
        self.settings = settings
        self.services = services

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await _json(send, 503, {"detail": "No inference backend available"})


async def _json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
