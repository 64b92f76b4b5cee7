"""The reverse proxy proper: one ASGI request in, one engine request out, the answer relayed as it comes.

Byte-exact by construction: the request body is forwarded as received (never parsed, so the network's
fields such as ``enforced_tokens`` reach the engine untouched) and every response chunk is handed to the
server the moment the engine's bytes arrive, which is what makes SSE token streaming work through the
proxy.
Status and headers are kept except hop-by-hop ones (and ``date``/``server``, which the gateway's
server sets itself, so the client never sees two). A client that disconnects aborts the engine
connection, so the engine cancels the request and frees its batch slot.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from node.logging import get_logger
from services.gateway.upstream import Connection, Headers, UpstreamError
from services.gateway.upstream_balancer import Backend, Balancer

log = get_logger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

NO_BACKEND = "No inference backend available"
MAX_BODY_BYTES = 64 * 1024 * 1024
#: The contract allows an engine 15 minutes between two chunks of one response.
IDLE_TIMEOUT_S = 15 * 60.0
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})
_REQUEST_DROP = _HOP_BY_HOP | {b"host", b"content-length", b"expect"}
_RESPONSE_DROP = _HOP_BY_HOP | {b"date", b"server"}
_JSON_HEADERS = [(b"content-type", b"application/json")]


class _ClientGone(Exception):
    """The client disconnected before its request body arrived."""


def _connection_tokens(headers: Headers) -> set[bytes]:
    """Header names a ``Connection`` header declares hop-by-hop for this message."""
    named: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
    return named


def response_headers(headers: Headers) -> Headers:
    extra = _connection_tokens(headers)
    return [(n, v) for n, v in headers if n not in _RESPONSE_DROP and n not in extra]


def request_head(scope: Scope, authority: bytes, body_length: int) -> bytes:
    """The HTTP/1.1 request line and headers sent to the engine."""
    path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string") or b""
    target = path + b"?" + query if query else path
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    extra = _connection_tokens([(n.lower(), v) for n, v in headers])
    lines = [scope["method"].encode(), b" ", target, b" HTTP/1.1\r\nhost: ", authority, b"\r\n"]
    for name, value in headers:
        lowered = name.lower()
        if lowered in _REQUEST_DROP or lowered in extra:
            continue
        lines += (name, b": ", value, b"\r\n")
    if body_length and not any(name.lower() == b"content-type" for name, _ in headers):
        # The network's client sends JSON without a Content-Type; vLLM's server refuses such a body
        # (400 "Only 'application/json' is allowed"), so say what the contract means by its absence.
        lines += (b"content-type: application/json\r\n",)
    if body_length or scope["method"] not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines += (b"content-length: ", str(body_length).encode(), b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


async def send_json(send: Send, status: int, body: dict[str, Any],
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [*_JSON_HEADERS, *(headers or ()), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def _read_body(receive: Receive) -> bytes:
    first = await receive()
    if first["type"] == "http.disconnect":
        raise _ClientGone
    body = first.get("body", b"")
    if not first.get("more_body", False):
        return body
    parts = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ValueError(f"request body larger than {MAX_BODY_BYTES} bytes")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _watch_disconnect(receive: Receive, conn: Connection) -> None:
    """Abort the engine request when the client goes away (ASGI says so through ``receive``)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            conn.abort()
            return


class ReverseProxy:
    """ASGI app forwarding every request to the least-loaded healthy backend of ``balancer``."""

    def __init__(self, balancer: Balancer, *, max_attempts: int = 3) -> None:
        self.balancer = balancer
        self.max_attempts = max_attempts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        if not self.balancer.size:
            await send_json(send, 503, {"detail": NO_BACKEND})
            return
        try:
            body = await _read_body(receive)
        except _ClientGone:
            return
        except ValueError as exc:
            await send_json(send, 413, {"detail": str(exc)})
            return
        await self._forward(scope, receive, send, body)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        head_only = scope["method"] == "HEAD"
        tried: set[str] = set()
        last_error = ""
        attempts = 0
        while attempts < self.max_attempts:
            attempts += 1
            backend = self.balancer.pick(tried)
            if backend is None:
                break
            backend.inflight += 1
            try:
                outcome = await self._attempt(backend, scope, receive, send, body, head_only)
            finally:
                backend.inflight -= 1
            if outcome is None:
                return
            last_error, same_backend_ok = outcome
            if not same_backend_ok:
                tried.add(backend.url)
        detail = NO_BACKEND if not last_error else f"{NO_BACKEND}: {last_error}"
        log.warning("proxy_no_backend", path=scope.get("path"), error=last_error, attempts=attempts)
        await send_json(send, 503, {"detail": detail})

    async def _attempt(self, backend: Backend, scope: Scope, receive: Receive, send: Send, body: bytes,
                       head_only: bool) -> tuple[str, bool] | None:
        """Relay through ``backend``; None when the client got an answer, else (error, may retry here)."""
        try:
            conn, reused = await backend.pool.acquire()
        except UpstreamError as exc:
            return str(exc), False
        conn.request(request_head(scope, backend.authority, len(body)), body, head_only=head_only)
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, conn))
        try:
            try:
                status, headers = await conn.head()
            except UpstreamError as exc:
                if watcher.done():
                    return None  # the client left; nobody to answer
                if exc.retryable and reused:
                    return str(exc), True  # a stale keep-alive connection: resend on a fresh one
                conn.abort()
                await send_json(send, 502, {"detail": f"Inference backend failed: {exc}"})
                return None
            await send({"type": "http.response.start", "status": status,
                        "headers": response_headers(headers)})
            await self._relay_body(conn, send, watcher, scope)
        finally:
            if not watcher.done():
                watcher.cancel()
        backend.pool.release(conn)
        return None

    @staticmethod
    async def _relay_body(conn: Connection, send: Send, watcher: asyncio.Task[None], scope: Scope) -> None:
        while True:
            try:
                data = await conn.chunk()
            except UpstreamError as exc:
                if watcher.done():
                    return  # the client left and we aborted the engine request on purpose
                log.warning("proxy_upstream_failed", path=scope.get("path"), error=str(exc))
                raise  # the server drops the client connection: a truncated answer must not look whole
            if conn.complete:
                watcher.cancel()  # the final send completes the response, which would wake it
                await send({"type": "http.response.body", "body": data, "more_body": False})
                return
            await send({"type": "http.response.body", "body": data, "more_body": True})
