"""A minimal HTTP/1.1 client connection for the inference proxy: asyncio protocol + httptools parser.

Why not httpx: the proxy relays every engine response and must add well under a millisecond per request
and per SSE chunk. A protocol object fed by the event loop, parsed by httptools (the same C parser
uvicorn uses), hands body bytes to the relay the moment they arrive, with no per-chunk task, timeout
object or stream wrapper in between. It does only what the proxy needs: one request at a time per
connection, keep-alive reuse, backpressure (reading pauses while the client is slow) and an idle
watchdog that fails a response when the engine sends nothing for ``idle_timeout_s``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

import httptools

#: Reading from the engine pauses while this many relayed bytes wait for a slow client ...
HIGH_WATER = 1 << 20
#: ... and resumes below this.
LOW_WATER = 1 << 18

Headers = list[tuple[bytes, bytes]]


class UpstreamError(Exception):
    """The engine failed the request: refused, closed early, sent garbage or went silent.

    ``retryable`` is true only when the engine sent no byte of a response, so the request can be sent
    again (on a fresh connection, or to another engine) without the client ever seeing two answers.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class Connection(asyncio.Protocol):
    """One keep-alive connection to an engine; ``request`` then ``head`` then ``chunk`` until b""."""

    def __init__(self, idle_timeout_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.idle_timeout_s = idle_timeout_s
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.last_used = self.loop.time()
        self._parser = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: Headers = []
        self._head_only = False
        self._head_done = False
        self._done = False
        self._reusable = False
        self._got_bytes = False
        self._error: UpstreamError | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._last_data = self.loop.time()
        self._watchdog: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        self._last_data = self.loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"engine sent a malformed HTTP response: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_watchdog()
        if not self._done and self._error is None:
            reason = f": {exc}" if exc else ""
            self._fail(UpstreamError(f"engine closed the connection{reason}", retryable=not self._got_bytes))
        self._wake()

    def pause_writing(self) -> None:  # requests are small; nothing to throttle
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks ------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.headers = []  # an interim response: the real one follows
            return
        self.status = status
        self._head_done = True
        if self._head_only:
            # httptools cannot be told a HEAD response has no body: finish here, never reuse.
            self._done = True
            self._reusable = False
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._done:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._done:
            return
        self._done = True
        self._reusable = self._parser.should_keep_alive()
        self._cancel_watchdog()
        self._wake()

    # -- the proxy's side ---------------------------------------------------------------------------
    def request(self, head: bytes, body: bytes, *, head_only: bool = False) -> None:
        """Send one request (head already serialised); the connection must be idle."""
        assert self.transport is not None
        self._reset()
        self._head_only = head_only
        self._arm_watchdog()
        if body:
            self.transport.writelines((head, body))
        else:
            self.transport.write(head)

    async def head(self) -> tuple[int, Headers]:
        """Status and headers of the response (lower-cased names, in the engine's order)."""
        while not self._head_done:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self.status, self.headers

    async def chunk(self) -> bytes:
        """The body bytes that arrived since the last call (waiting for some); b"" once complete."""
        while True:
            if self._chunks:
                data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                if self._paused and self.transport is not None and not self.closed:
                    self._paused = False
                    self.transport.resume_reading()
                return data
            if self._done:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()

    @property
    def complete(self) -> bool:
        """The whole response has been handed out by :meth:`chunk`."""
        return self._done and not self._chunks

    @property
    def reusable(self) -> bool:
        """True when the last response was read to its end and the engine keeps the connection open."""
        return self._done and self._reusable and not self.closed and not self._chunks

    def abort(self) -> None:
        """Drop the connection now (the engine sees the disconnect and frees the request's slot)."""
        self._cancel_watchdog()
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # -- internals ----------------------------------------------------------------------------------
    async def _wait(self) -> None:
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _arm_watchdog(self, delay: float | None = None) -> None:
        self._watchdog = self.loop.call_later(
            self.idle_timeout_s if delay is None else delay, self._check_idle
        )

    def _check_idle(self) -> None:
        self._watchdog = None
        if self._done or self.closed:
            return
        # Time spent with a slow client (reading paused) is not the engine's silence.
        quiet = 0.0 if self._paused else self.loop.time() - self._last_data
        if quiet >= self.idle_timeout_s:
            self._fail(UpstreamError(f"engine sent nothing for {self.idle_timeout_s:g} s"))
            self.abort()
        else:
            self._arm_watchdog(self.idle_timeout_s - quiet)

    def _cancel_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


class Pool:
    """Idle keep-alive connections to one engine (most recently used first)."""

    def __init__(self, host: str, port: int, *, idle_timeout_s: float, connect_timeout_s: float = 5.0,
                 keepalive_s: float = 3.0, max_idle: int = 256) -> None:
        self.host = host
        self.port = port
        self.idle_timeout_s = idle_timeout_s
        self.connect_timeout_s = connect_timeout_s
        # Engines close idle connections after a few seconds (vLLM: 5 s); retiring ours sooner avoids
        # sending a request into a connection the engine is closing.
        self.keepalive_s = keepalive_s
        self.max_idle = max_idle
        self._idle: list[Connection] = []

    async def acquire(self) -> tuple[Connection, bool]:
        """A connection and whether it was reused (a reused one may turn out stale: retry once)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.last_used < self.keepalive_s:
                return conn, True
            conn.abort()
        try:
            _transport, conn = await asyncio.wait_for(
                loop.create_connection(lambda: Connection(self.idle_timeout_s), self.host, self.port),
                self.connect_timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            message = f"cannot connect to {self.host}:{self.port}: {reason}"
            raise UpstreamError(message, retryable=True) from None
        return conn, False

    def release(self, conn: Connection) -> None:
        if conn.reusable and len(self._idle) < self.max_idle:
            conn.last_used = conn.loop.time()
            self._idle.append(conn)
        else:
            conn.abort()

    def close(self) -> None:
        for conn in self._idle:
            conn.abort()
        self._idle.clear()
