"""Request/reply over ROUTER/DEALER with deadlines.

A request carries an absolute deadline. The client gives up at the deadline with
:class:`~node.errors.DeadlineExceeded` (a stopped service is a timeout, never a hang); the server
drops requests that arrive already expired, so a backlog delivered after a restart cannot replay stale
commands. Clients set ``IMMEDIATE`` so nothing queues toward a peer that is not connected.

Both ends watch their socket's file descriptor on the event loop's own selector (:class:`Watch`) and
send without blocking, instead of going through pyzmq's asyncio futures: a round trip then costs two
loop wakeups rather than about ten, which is most of what the bus added over ZeroMQ itself
(``make bench`` measures both).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import zmq

from bus import codec
from bus.auth import Authenticator
from bus.sockets import make_client, make_server, user_id
from node.backoff import backoff_delay
from node.errors import (
    DeadlineExceeded,
    MLNodeError,
    NotFound,
    ProtocolError,
    TooLarge,
    Unavailable,
    Unreachable,
)
from node.identity import KeyPair
from node.logging import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the authenticated public key of the connection."""

    public_key: str


Handler = Callable[[Any, Caller], Awaitable[Any]]
#: Messages taken per wakeup before the loop gets to run other work (a flood must not starve it).
DRAIN_BUDGET = 256
# Plain ints: pyzmq's flags are enums, and enum arithmetic cost more per request than the codec.
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK
_EVENTS = int(zmq.EVENTS)
_RCVMORE = int(zmq.RCVMORE)
_POLLIN = int(zmq.POLLIN)


class Watch:
    """Hands every message waiting on ``sock`` to ``on_message``, driven by the loop's selector.

    ZeroMQ's descriptor is edge-triggered and any operation on the socket may consume the edge, so each
    wakeup drains the socket to EAGAIN, and whoever sends on the socket calls :meth:`kick` afterwards
    (a message that arrived meanwhile would otherwise wait for the next one).
    """

    def __init__(self, sock: zmq.Socket[Any], on_message: Callable[[list[Any]], None],
                 loop: asyncio.AbstractEventLoop, *, copy: bool) -> None:
        self.loop = loop
        self._sock = sock
        self._on_message = on_message
        self._copy = copy
        self._fd = sock.FD
        self._scheduled = False
        loop.add_reader(self._fd, self.drain)
        self._schedule()  # what arrived before anyone watched

    def drain(self) -> None:
        self._scheduled = False
        for _ in range(DRAIN_BUDGET):
            try:  # asking first is cheaper than the exception an empty receive raises
                if self._sock.closed or not cast(int, self._sock.get(_EVENTS)) & _POLLIN:
                    return
                frames = [self._sock.recv(_NOBLOCK, copy=self._copy)]
                while self._sock.get(_RCVMORE):
                    frames.append(self._sock.recv(_NOBLOCK, copy=self._copy))
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.warning("bus_receive_failed", error=str(exc))
                return
            self._on_message(frames)
        self._schedule()

    def kick(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            if not self._scheduled and not self._sock.closed and cast(int, self._sock.get(_EVENTS)) & _POLLIN:
                self._schedule()

    def _schedule(self) -> None:
        self._scheduled = True
        self.loop.call_soon(self.drain)

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self._fd)


class RpcServer:
    """Serves named handlers on a ROUTER socket; each request runs as its own task."""

    def __init__(
        self,
        context: zmq.Context[Any],
        auth: Authenticator,
        keypair: KeyPair,
        endpoint: str,
        *,
        domain: str = "local",
        max_bytes: int = codec.MAX_MESSAGE_BYTES,
        max_inflight: int = 512,
        bind: bool = True,
        explain: codec.Explain = codec.plain_reason,
    ) -> None:
        self._auth = auth
        self._explain = explain
        self._domain = domain
        self._max_bytes = max_bytes
        self._max_inflight = max_inflight
        self._handlers: dict[str, tuple[Handler, Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch: Watch | None = None
        self._closed: asyncio.Future[None] | None = None
        self.endpoint = endpoint
        self.dropped = 0
        self._sock: zmq.Socket[Any] = context.socket(zmq.ROUTER, socket_class=zmq.Socket)
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
        """Receive until cancelled or closed; a bad frame is logged and dropped, never fatal."""
        loop = asyncio.get_running_loop()
        self._closed = loop.create_future()
        self._watch = Watch(self._sock, self._accept, loop, copy=False)
        try:
            await self._closed
        finally:
            self._watch.close()

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
        self._tasks.add(task)  # _handle removes it (a done callback would cost a loop pass per request)

    def _drop(self, reason: str, **fields: Any) -> None:
        self.dropped += 1
        log.warning("bus_frame_dropped", endpoint=self.endpoint, reason=reason, **fields)

    async def _handle(self, ident: bytes, env: codec.Envelope, caller: Caller) -> None:
        try:
            await self._answer(ident, env, caller)
        finally:
            self._tasks.discard(asyncio.current_task())

    async def _answer(self, ident: bytes, env: codec.Envelope, caller: Caller) -> None:
        route = self._handlers.get(env.type)
        try:
            if route is None:
                raise NotFound(f"unknown request type {env.type!r}")
            handler, body = route
            reply = env.reply(await handler(env.body(body, self._explain), caller))
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
            self._sock.send(ident, _MORE_NOBLOCK)
            self._sock.send(data, _NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("bus_reply_undeliverable", error=str(exc))
        if self._watch is not None:
            self._watch.kick()

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._watch is not None:
            self._watch.close()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        self._sock.close(linger=0)


def _fail(future: asyncio.Future[Any], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


class RpcClient:
    """Sends requests to one server and matches replies by id; usable from one event loop."""

    def __init__(
        self,
        context: zmq.Context[Any],
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
        # A plain (blocking-API) socket, but made by the context so that ``context.destroy`` closes it: a
        # socket the context does not know keeps ``term`` waiting forever at process exit.
        self._sock: zmq.Socket[Any] = context.socket(zmq.DEALER, socket_class=zmq.Socket)
        make_client(self._sock, keypair, server_public, max_bytes)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self._sock.connect(endpoint)
        self._pending: dict[str, asyncio.Future[codec.Envelope]] = {}
        self._watch: Watch | None = None

    async def request(
        self, kind: str, payload: Any = None, *, timeout: float = 10.0, connect_timeout: float = 3.0
    ) -> Any:
        """Send ``kind`` and return the reply payload; raises the server's error or DeadlineExceeded.

        With no live connection the request waits at most ``connect_timeout`` (a restarting service
        reconnects within that) and then fails with :class:`Unavailable` instead of burning the whole
        deadline on a peer that is down.
        """
        loop = asyncio.get_running_loop()
        if self._watch is None or self._watch.loop is not loop:
            if self._watch is not None:
                self._watch.close()
            self._watch = Watch(self._sock, self._on_reply, loop, copy=True)
        deadline = time.time() + timeout
        env = codec.Envelope(type=kind, payload=payload, deadline=deadline)
        data = codec.encode(env)
        if len(data) > self._max_bytes:  # the server's socket would drop the connection, not answer
            raise TooLarge(f"the {kind!r} request is {len(data)} bytes on the bus, which carries at most "
                           f"{self._max_bytes}; send less per request")
        future: asyncio.Future[codec.Envelope] = loop.create_future()
        self._pending[env.id] = future
        try:
            await self._send(data, min(timeout, connect_timeout))
            self._watch.kick()
            late = DeadlineExceeded(f"{self.name} did not answer {kind!r} within {timeout:g} s")
            timer = loop.call_later(max(0.0, deadline - time.time()), _fail, future, late)
            try:
                reply = await future
            finally:
                timer.cancel()
            return reply.raise_for_error()
        finally:
            self._pending.pop(env.id, None)

    async def _send(self, data: bytes, wait: float) -> None:
        """Send now; while there is no connection yet (``IMMEDIATE``), retry for up to ``wait`` s."""
        give_up = time.monotonic() + wait
        tries = 0
        while True:
            try:
                self._sock.send(data, _NOBLOCK)
                return
            except zmq.Again:
                left = give_up - time.monotonic()
                if left <= 0:
                    raise Unreachable(
                        f"{self.name} is not reachable (no connection within {wait:g} s)") from None
                tries += 1
                await asyncio.sleep(min(backoff_delay(tries, 0.002, 0.05), left))

    def _on_reply(self, frames: list[bytes]) -> None:
        if len(frames) != 1:
            log.warning("bus_frame_dropped", endpoint=self.endpoint, reason="wrong frame count")
            return
        try:
            env = codec.decode(frames[0], max_bytes=self._max_bytes)
        except ProtocolError as exc:
            log.warning("bus_frame_dropped", endpoint=self.endpoint, reason=exc.message)
            return
        future = self._pending.get(env.id)
        if future is not None and not future.done():
            future.set_result(env)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        with contextlib.suppress(zmq.ZMQError):
            self._sock.close(linger=0)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(Unavailable(f"{self.name} client closed"))
