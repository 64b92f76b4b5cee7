"""The edge in front of both ports, driven as ASGI: cross-site refusals, concurrency, body limits.

(The same rules against a real node, with real sockets and browsers' headers, are in tests/security.)
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from node import config
from services.gateway.edge import Edge
from tests.support.waiting import until

API, INFERENCE = 18080, 15000


def settings(tmp_path: Path, **env: str) -> config.Settings:
    return config.load({"MLNODE_STATE_DIR": str(tmp_path), "MLNODE_API_PORT": str(API),
                        "INFERENCE_PORT": str(INFERENCE), **env})


class Recorder:
    """The app behind the edge: records what reached it; ``hold`` keeps requests open until released."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.hold: asyncio.Event | None = None
        self.entered = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.entered += 1
        message = await receive()
        self.bodies.append(message.get("body", b""))
        if self.hold is not None:
            await self.hold.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


async def call(edge: Edge, *, port: int = API, method: str = "POST", path: str = "/api/v1/pow/init",
               headers: dict[str, str] | None = None, chunks: list[bytes] | None = None,
               stall: bool = False) -> tuple[int, dict[str, Any]]:
    """One request through ``edge``; returns the status and the JSON answer (``{}`` for the app's)."""
    pending = list(chunks if chunks is not None else [b""])
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending) or stall}
        await asyncio.Event().wait()  # a client that never sends the rest
        raise AssertionError("not reached")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "server": ("127.0.0.1", port),
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    await edge(scope, receive, send)
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return status, json.loads(body)


def test_the_network_nodes_requests_pass(tmp_path: Path) -> None:
    app = Recorder()
    edge = Edge(app, settings(tmp_path))

    async def scenario() -> None:
        assert await call(edge, chunks=[b'{"a":', b" 1}"]) == (200, {})
        assert await call(edge, headers={"content-type": "application/json; charset=utf-8"}) == (200, {})
        assert await call(edge, method="GET", path="/api/v1/state") == (200, {})

    asyncio.run(scenario())
    assert app.bodies == [b'{"a": 1}', b"", b""]


@pytest.mark.parametrize(("headers", "status", "words"), [
    ({"origin": "https://evil.example"}, 403, "Origin 'https://evil.example' is not allowed"),
    ({"origin": "null"}, 403, "is not allowed"),
    ({"sec-fetch-site": "cross-site"}, 403, "another site"),
    ({"content-type": "text/plain;charset=UTF-8"}, 415, "text/plain is refused"),
    ({"content-type": "application/x-www-form-urlencoded"}, 415, "is refused"),
    ({"content-type": "multipart/form-data; boundary=x"}, 415, "is refused"),
])
def test_cross_site_requests_are_refused_on_the_management_port(tmp_path: Path, headers: dict[str, str],
                                                                  status: int, words: str) -> None:
    app = Recorder()
    edge = Edge(app, settings(tmp_path))
    answer = asyncio.run(call(edge, headers=headers))
    assert answer[0] == status and words in answer[1]["detail"]
    assert app.entered == 0
    # The inference port serves the users the Network Node forwards: no such rule there.
    assert asyncio.run(call(edge, port=INFERENCE, path="/v1/completions", headers=headers)) == (200, {})


def test_an_origin_the_operator_allows(tmp_path: Path) -> None:
    edge = Edge(Recorder(), settings(tmp_path, MLNODE_ALLOWED_ORIGINS="https://admin.example:8443"))
    assert asyncio.run(call(edge, headers={"origin": "https://admin.example:8443"})) == (200, {})
    assert asyncio.run(call(edge, headers={"origin": "https://admin.example"}))[0] == 403


def test_concurrent_requests_beyond_the_limit_get_503_but_stops_never_do(tmp_path: Path) -> None:
    app = Recorder()
    edge = Edge(app, settings(tmp_path, MLNODE_MAX_REQUESTS="3", MLNODE_MAX_INFERENCE_REQUESTS="2"))

    async def scenario() -> None:
        app.hold = asyncio.Event()
        held = [asyncio.create_task(call(edge)) for _ in range(3)]
        held += [asyncio.create_task(call(edge, port=INFERENCE, path="/v1/models", method="GET"))
                 for _ in range(2)]
        await until(lambda: app.entered >= 5, what="the five held requests reached the app")
        status, body = await call(edge, path="/api/v1/state", method="GET")
        assert status == 503 and "at most 3" in body["detail"]
        assert (await call(edge, port=INFERENCE, path="/v1/models", method="GET"))[0] == 503
        stops = [asyncio.create_task(call(edge, path=p)) for p in
                 ("/api/v1/stop", "/api/v1/pow/stop", "/api/v1/inference/down", "/api/v1/train/stop")]
        # Every stop reached the app although the port is full.
        await until(lambda: app.entered >= 9, what="the four stops reached the app")
        app.hold.set()
        assert [s for s, _ in await asyncio.gather(*held, *stops)] == [200] * 9
        assert await call(edge) == (200, {})  # the slots are free again

    asyncio.run(scenario())


def test_bodies_larger_than_the_limit_get_413(tmp_path: Path) -> None:
    app = Recorder()
    edge = Edge(app, settings(tmp_path, MLNODE_MAX_BODY_BYTES="1000", MLNODE_MAX_INFERENCE_BODY_BYTES="2000"))
    declared = asyncio.run(call(edge, headers={"content-length": "1001"}, stall=True))
    assert declared[0] == 413 and "larger than 1000 bytes" in declared[1]["detail"]
    streamed = asyncio.run(call(edge, chunks=[b"x" * 600, b"x" * 600]))
    assert streamed[0] == 413
    assert asyncio.run(call(edge, port=INFERENCE, path="/v1/completions", chunks=[b"x" * 1500])) == (200, {})
    assert asyncio.run(call(edge, port=INFERENCE, path="/v1/completions", chunks=[b"x" * 2001]))[0] == 413
    assert app.bodies == [b"x" * 1500]


def test_a_body_that_does_not_arrive_in_time_gets_408(tmp_path: Path) -> None:
    app = Recorder()
    edge = Edge(app, settings(tmp_path, MLNODE_BODY_TIMEOUT="0.05"))
    for port, path in ((API, "/api/v1/pow/init"), (INFERENCE, "/v1/completions")):
        status, body = asyncio.run(call(edge, port=port, path=path, chunks=[b'{"a"'], stall=True))
        assert status == 408 and "not received within 0.05 s" in body["detail"]
    assert app.entered == 0
