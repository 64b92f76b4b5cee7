"""The gateway's server protocol on real sockets: a 408 for a request head that does not arrive in time,
and a client that stops reading a response is dropped (its request ends, so the engine's slot is freed).

A uvicorn server with :class:`EdgeProtocol` runs in a thread; the deadlines are set short so that the
tests wait for the events themselves, never for a guessed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from services.gateway.server import EdgeProtocol
from tests.support.ports import bound_socket
from tests.support.waiting import wait_until


class Streamer:
    """An app that answers with an endless body, as fast as the client takes it, until the client is
    gone (ASGI tells it with ``http.disconnect``, as the proxy learns it)."""

    def __init__(self) -> None:
        self.sent = 0
        self.ended = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()  # the (empty) request body
        gone = asyncio.ensure_future(receive())  # the next event is the disconnect
        await send({"type": "http.response.start", "status": 200, "headers": []})
        chunk = b"x" * 65536
        try:
            while not gone.done():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                self.sent += len(chunk)
        finally:
            gone.cancel()
            self.ended.set()


class Fast(EdgeProtocol):
    head_timeout_s = 0.3
    send_timeout_s = 0.3


@pytest.fixture
def server() -> Iterator[tuple[int, Streamer]]:
    app = Streamer()
    sock, port = bound_socket()
    config = uvicorn.Config(app, http=Fast, loop="asyncio", lifespan="off",
                            log_level="critical", access_log=False)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: srv.started, 10, 0.02)
    yield port, app
    app.ended.set()
    srv.should_exit = True
    thread.join(10)


def test_a_request_head_that_does_not_arrive_gets_408(server: tuple[int, Streamer]) -> None:
    port, app = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"request head not received within 0.3 s" in answer
    with socket.create_connection(("127.0.0.1", port), timeout=10) as idle:  # nothing sent at all
        assert idle.recv(4096).startswith(b"HTTP/1.1 408 ")
    assert app.sent == 0


def test_a_client_that_stops_reading_is_dropped(server: tuple[int, Streamer]) -> None:
    port, app = server
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        # The client reads nothing: the server's buffers fill, writing pauses, the deadline drops it.
        assert app.ended.wait(30), "the response never ended"
        sock.settimeout(10)
        received = 0
        with contextlib.suppress(ConnectionResetError):  # what was in flight, then the end
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        assert received < app.sent  # the rest was never delivered: the connection is gone
    finally:
        sock.close()
