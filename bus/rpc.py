"""Request/reply over ROUTER/DEALER with deadlines.

A request carries an absolute deadline. The client gives up at the deadline with
:class:`~node.errors.DeadlineExceeded` (a stopped service is a timeout, never a hang); the server
drops requests that arrive already expired, so a backlog delivered after a restart cannot replay stale
commands. Clients set ``IMMEDIATE`` so nothing queues toward a peer that is not connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from bus import codec
from bus.auth import Authenticator
from bus.sockets import make_client, make_server, user_id
from node.errors import DeadlineExceeded, MLNodeError, NotFound, ProtocolError, Unavailable
from node.identity import KeyPair
from node.logging import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the authenticated public key of the connection."""

    public_key: str


Handler = Callable[[Any, Caller], Awaitable[Any]]


class RpcServer:
    """Serves named handlers on a ROUTER socket; each request runs as its own task."""

    def __init__(
        self,
        context: zmq.asyncio.Context,
        auth: Authenticator,
        keypair: KeyPair,
        endpoint: str,
        *,
        domain: str = "local",
        max_bytes: int = codec.MAX_MESSAGE_BYTES,
        max_inflight: int = 512,
        bind: bool = True,
    ) -> None:
        self._auth = auth
        self._domain = domain
        self._max_bytes = max_bytes
        self._max_inflight = max_inflight
        self._handlers: dict[str, tuple[Handler, Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.endpoint = endpoint
        self.dropped = 0
        self._sock = context.socket(zmq.ROUTER)
        make_server(self._sock, auth, keypair, domain, max_bytes)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if bind:
            self.bind()

    def bind(self) -> None:
        """Start accepting connections (separate so a service can finish its startup first)."""
        self._sock.bind(self.endpoint)
        if self.endpoint.startswith("tcp://") and self.endpoint.endswith(":0"):
            self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def route(self, kind: str, handler: Handler, body: Any = Any) -> None:
        """Serve ``kind`` with ``handler``, which receives the payload as ``body`` (a contract Struct:
        a payload that does not fit is refused with the contract's reason before the handler runs)."""
        self._handlers[kind] = (handler, body)

    async def serve(self) -> None:
        """Receive until cancelled; a bad frame is logged and dropped, never fatal."""
        while True:
            try:
                frames = await self._sock.recv_multipart(copy=False)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ETERM or self._sock.closed:
                    return
                log.warning("bus_receive_failed", endpoint=self.endpoint, error=str(exc))
                continue
            self._accept(frames)

    def _accept(self, frames: list[zmq.Frame]) -> None:
        if len(frames) != 2:
            self._drop("wrong frame count", count=len(frames))
            return
        ident, body = frames
        caller = user_id(body)
        if not self._auth.is_allowed(self._domain, caller):
            # The key was revoked after this connection authenticated: stop hearing it.
            self._drop("key no longer allowed", client_key=(caller or "")[:8])
            return
        try:
            env = codec.decode(body.bytes, max_bytes=self._max_bytes)
        except ProtocolError as exc:
            self._drop(exc.message)
            return
        if env.expired():
            self._drop("request arrived after its deadline", type=env.type)
            return
        if len(self._tasks) >= self._max_inflight:
            self._send(ident.bytes, env.fail(Unavailable("service is overloaded; retry later")))
            return
        task = asyncio.get_running_loop().create_task(self._handle(ident.bytes, env, Caller(caller or "")))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _drop(self, reason: str, **fields: Any) -> None:
        self.dropped += 1
        log.warning("bus_frame_dropped", endpoint=self.endpoint, reason=reason, **fields)

    async def _handle(self, ident: bytes, env: codec.Envelope, caller: Caller) -> None:
        route = self._handlers.get(env.type)
        try:
            if route is None:
                raise NotFound(f"unknown request type {env.type!r}")
            handler, body = route
            reply = env.reply(await handler(env.body(body), caller))
        except MLNodeError as exc:
            reply = env.fail(exc)
        except Exception as exc:
            log.exception("bus_handler_failed", type=env.type, request_id=env.id)
            reply = env.fail(MLNodeError(f"internal error in {env.type!r}: {type(exc).__name__}"))
        if env.expired():
            log.info("bus_reply_late", type=env.type, request_id=env.id)
            return
        self._send(ident, reply)

    def _send(self, ident: bytes, env: codec.Envelope) -> None:
        try:
            data = codec.encode(env)
        except ProtocolError as exc:
            data = codec.encode(codec.Envelope(type="error", id=env.id, error=exc.to_wire()))
        try:
            self._sock.send_multipart([ident, data], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("bus_reply_undeliverable", error=str(exc))

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._sock.close(linger=0)


class RpcClient:
    """Sends requests to one server and matches replies by id; usable from one event loop."""

    def __init__(
        self,
        context: zmq.asyncio.Context,
        keypair: KeyPair,
        server_public: str,
        endpoint: str,
        *,
        name: str = "",
        max_bytes: int = codec.MAX_MESSAGE_BYTES,
    ) -> None:
        self.name = name or endpoint
        self.endpoint = endpoint
        self._max_bytes = max_bytes
        self._sock = context.socket(zmq.DEALER)
        make_client(self._sock, keypair, server_public, max_bytes)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self._sock.connect(endpoint)
        self._pending: dict[str, asyncio.Future[codec.Envelope]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def request(
        self, kind: str, payload: Any = None, *, timeout: float = 10.0, connect_timeout: float = 3.0
    ) -> Any:
        """Send ``kind`` and return the reply payload; raises the server's error or DeadlineExceeded.

        With no live connection the request waits at most ``connect_timeout`` (a restarting service
        reconnects within that) and then fails with :class:`Unavailable` instead of burning the whole
        deadline on a peer that is down.
        """
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())
        deadline = time.time() + timeout
        env = codec.Envelope(type=kind, payload=payload, deadline=deadline)
        data = codec.encode(env)
        future: asyncio.Future[codec.Envelope] = asyncio.get_running_loop().create_future()
        self._pending[env.id] = future
        try:
            wait = min(timeout, connect_timeout)
            try:
                await asyncio.wait_for(self._sock.send(data), wait)
            except TimeoutError:
                raise Unavailable(f"{self.name} is not reachable (no connection within {wait:g} s)") from None
            remaining = max(0.0, deadline - time.time())
            try:
                reply = await asyncio.wait_for(future, remaining)
            except TimeoutError:
                raise DeadlineExceeded(f"{self.name} did not answer {kind!r} within {timeout:g} s") from None
            return reply.raise_for_error()
        finally:
            self._pending.pop(env.id, None)

    async def _read(self) -> None:
        while True:
            try:
                frames = await self._sock.recv_multipart()
            except zmq.ZMQError:
                return
            if len(frames) != 1:
                log.warning("bus_frame_dropped", endpoint=self.endpoint, reason="wrong frame count")
                continue
            try:
                env = codec.decode(frames[0], max_bytes=self._max_bytes)
            except ProtocolError as exc:
                log.warning("bus_frame_dropped", endpoint=self.endpoint, reason=exc.message)
                continue
            future = self._pending.get(env.id)
            if future is not None and not future.done():
                future.set_result(env)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        with contextlib.suppress(zmq.ZMQError):
            self._sock.close(linger=0)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(Unavailable(f"{self.name} client closed"))
