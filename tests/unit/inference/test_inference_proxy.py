"""The gateway's inference proxy against real HTTP servers on loopback (uvicorn on both sides)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn

from services.gateway.proxy import backend_urls
from services.gateway.upstream_balancer import Balancer
from services.gateway.upstream_relay import ReverseProxy, request_head
from tests.support.ports import bound_socket, free_port
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(30)

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass
class Engine:
    """An upstream ASGI app that records what it got and streams when the test says so."""

    name: str
    seen: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.seen.append({"path": scope["path"], "query": scope["query_string"], "body": body,
                          "headers": [(k.decode(), v.decode()) for k, v in scope["headers"]]})
        path = scope["path"]
        if path == "/v1/chat/completions":
            await send({"type": "http.response.start", "status": 201, "headers": [
                (b"content-type", b"application/json"), (b"x-engine", self.name.encode()),
                (b"connection", b"x-private"), (b"x-private", b"secret-hop"), (b"keep-alive", b"timeout=5"),
            ]})
            await send({"type": "http.response.body", "body": body})
        elif path == "/stream":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": b"data: first\n\n", "more_body": True})
            await self.release.wait()
            await send({"type": "http.response.body", "body": b"data: second\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        elif path == "/forever":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"data: first\n\n", "more_body": True})
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnected.set()
        elif path == "/broken":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            raise RuntimeError("engine died mid-response")
        elif path == "/hold":
            await self.release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": self.name.encode()})
        else:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": self.name.encode()})


class Servers:
    def __init__(self) -> None:
        self.running: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def serve(self, app: Any, **kw: Any) -> int:
        sock, port = bound_socket()
        config = uvicorn.Config(app, log_config=None, access_log=False, http="httptools", lifespan="off",
                                **kw)
        server = uvicorn.Server(config)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        await until(lambda: server.started, what="the server started")
        self.running.append((server, task))
        return port

    async def close(self) -> None:
        for server, _ in self.running:
            server.should_exit = True
        for _, task in self.running:
            await task


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    s = Servers()
    yield s
    await s.close()


async def proxy_for(servers: Servers, *engines: Engine, idle_timeout_s: float = 900.0,
                    extra_urls: tuple[str, ...] = ()) -> tuple[str, Balancer]:
    urls = [f"http://127.0.0.1:{await servers.serve(e)}" for e in engines]
    balancer = Balancer(idle_timeout_s)
    balancer.update([*extra_urls, *urls])
    port = await servers.serve(ReverseProxy(balancer), timeout_graceful_shutdown=1)
    return f"http://127.0.0.1:{port}", balancer


async def test_body_is_forwarded_byte_for_byte_and_headers_kept_minus_hop_by_hop(servers: Servers) -> None:
    engine = Engine("a")
    base, _ = await proxy_for(servers, engine)
    raw = (b'{"model":"m", "enforced_str":"x\\u00e9", "use_deterministic_hash":true,'
           b'"top_logprobs":5,  "z":1e400}')
    async with httpx.AsyncClient() as client:
        resp = await client.post(f"{base}/v1/chat/completions?a=1&b=%2F", content=raw,
                                 headers={"x-trace": "t1", "connection": "keep-alive, x-drop", "x-drop": "1"})
    assert resp.status_code == 201
    assert resp.content == raw  # echoed by the engine: nothing parsed or re-encoded on the way
    seen = engine.seen[0]
    assert seen["body"] == raw and seen["query"] == b"a=1&b=%2F"
    names = [k for k, _ in seen["headers"]]
    # None sent: the contract reads that as JSON, and vLLM refuses a body without saying so.
    assert dict(seen["headers"])["content-type"] == "application/json" and names.count("content-type") == 1
    assert ("x-trace", "t1") in seen["headers"] and "x-drop" not in names and "connection" not in names
    assert dict(seen["headers"])["content-length"] == str(len(raw))
    assert resp.headers["x-engine"] == "a" and resp.headers["content-type"] == "application/json"
    for hop in ("x-private", "keep-alive"):
        assert hop not in resp.headers
    assert len(resp.headers.get_list("server")) <= 1 and len(resp.headers.get_list("date")) <= 1


async def test_sse_chunks_are_relayed_as_the_engine_emits_them(servers: Servers) -> None:
    engine = Engine("a")
    base, _ = await proxy_for(servers, engine)
    async with httpx.AsyncClient() as client, client.stream("GET", f"{base}/stream") as resp:
        chunks = resp.aiter_raw()
        assert resp.headers["content-type"] == "text/event-stream"
        first = await asyncio.wait_for(chunks.__anext__(), 5)
        assert first == b"data: first\n\n"  # arrived while the engine still holds the rest
        engine.release.set()
        rest = b"".join([c async for c in chunks])
    assert rest == b"data: second\n\ndata: [DONE]\n\n"


async def test_a_client_that_leaves_mid_stream_closes_the_engine_request(servers: Servers) -> None:
    engine = Engine("a")
    base, balancer = await proxy_for(servers, engine)
    async with httpx.AsyncClient() as client, client.stream("GET", f"{base}/forever") as resp:
        chunks = resp.aiter_raw()
        assert await asyncio.wait_for(chunks.__anext__(), 5) == b"data: first\n\n"
    await asyncio.wait_for(engine.disconnected.wait(), 5)
    await until(lambda: [b.inflight for b in balancer._backends] == [0], what="the request released")


async def test_no_healthy_backend_is_a_503_in_the_clients_shape(servers: Servers) -> None:
    base, balancer = await proxy_for(servers)
    async with httpx.AsyncClient() as client:
        resp = await client.get(f"{base}/health")
        assert resp.status_code == 503
        assert resp.json() == {"detail": "No inference backend available"}
        balancer.update([f"http://127.0.0.1:{free_port()}"])  # listed, but nothing listens there
        resp = await client.post(f"{base}/v1/completions", content=b"{}")
        assert resp.status_code == 503
        assert resp.json()["detail"].startswith("No inference backend available: cannot connect")


async def test_a_dead_backend_is_skipped(servers: Servers) -> None:
    engine = Engine("live")
    base, _ = await proxy_for(servers, engine, extra_urls=(f"http://127.0.0.1:{free_port()}",))
    async with httpx.AsyncClient() as client:
        answers = [(await client.get(f"{base}/who")).text for _ in range(6)]
    assert answers == ["live"] * 6


async def test_least_connections_spreads_held_requests(servers: Servers) -> None:
    a, b = Engine("a"), Engine("b")
    base, balancer = await proxy_for(servers, a, b)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=20)) as client:
        held = [asyncio.ensure_future(client.get(f"{base}/hold")) for _ in range(6)]
        await until(lambda: len(a.seen) + len(b.seen) >= 6, 5, what="six held requests reached the engines")
        assert (len(a.seen), len(b.seen)) == (3, 3)
        assert sorted(x.inflight for x in balancer._backends) == [3, 3]
        b.release.set()
        # b's three finish; the next two requests go to b, which now has fewer in flight
        await until(lambda: sum(h.done() for h in held) >= 3, 5, what="b's three requests finished")
        more = [(await client.get(f"{base}/who")).text for _ in range(2)]
        assert more == ["b", "b"]
        a.release.set()
        assert sorted([(await h).text for h in held]) == ["a", "a", "a", "b", "b", "b"]


async def test_an_engine_that_dies_mid_response_is_not_made_to_look_complete(servers: Servers) -> None:
    base, _ = await proxy_for(servers, Engine("a"))
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(f"{base}/broken")


async def test_an_engine_silent_for_the_idle_timeout_fails_the_response(servers: Servers) -> None:
    engine = Engine("a")
    base, _ = await proxy_for(servers, engine, idle_timeout_s=0.5)
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.RemoteProtocolError):  # the proxy ended it; the engine never would
            await asyncio.wait_for(client.get(f"{base}/forever"), 30)
    await asyncio.wait_for(engine.disconnected.wait(), 5)


async def test_keep_alive_connections_are_reused_and_survive_engine_idle_close(servers: Servers) -> None:
    engine = Engine("a")
    port = await servers.serve(engine, timeout_keep_alive=1)
    balancer = Balancer(900)
    balancer.update([f"http://127.0.0.1:{port}"])
    base = f"http://127.0.0.1:{await servers.serve(ReverseProxy(balancer))}"
    async with httpx.AsyncClient() as client:
        for pause in (0, 0, 1.3, 0):  # 1.3 s: the engine has closed our idle connection meanwhile
            await asyncio.sleep(pause)  # the scenario: a client idle past the engine's keep-alive (1 s)
            assert (await client.get(f"{base}/who")).text == "a"
    pool = balancer._backends[0].pool
    assert len(pool._idle) == 1


def test_request_head_and_backend_payloads() -> None:
    scope = {"method": "POST", "path": "/v1/x", "raw_path": b"/v1/x%20y", "query_string": b"q=1",
             "headers": [(b"host", b"client"), (b"content-length", b"999"), (b"x-a", b"1"),
                         (b"transfer-encoding", b"chunked"), (b"expect", b"100-continue")]}
    head = request_head(scope, b"127.0.0.1:5001", 12)
    # No Content-Type from the client (the network's never sends one): the engine is told it is JSON.
    assert head == (b"POST /v1/x%20y?q=1 HTTP/1.1\r\nhost: 127.0.0.1:5001\r\nx-a: 1\r\n"
                    b"content-type: application/json\r\ncontent-length: 12\r\n\r\n")
    typed = request_head({**scope, "headers": [(b"Content-Type", b"text/plain")]}, b"h:1", 3)
    assert typed.count(b"ontent-") == 2 and b"Content-Type: text/plain" in typed
    get = request_head({"method": "GET", "path": "/health", "query_string": b"", "headers": []}, b"h:1", 0)
    assert get == b"GET /health HTTP/1.1\r\nhost: h:1\r\n\r\n"
    assert backend_urls(["http://a:1"]) == ["http://a:1"]
    assert backend_urls({"backends": ["http://a:1"]}) == ["http://a:1"]
    assert backend_urls({"nope": 1}) is None and backend_urls(["x", 1]) is None
    balancer = Balancer(1)
    with pytest.raises(ValueError, match="http://host:port"):
        balancer.update(["ftp://x"])
    assert json.dumps(balancer.urls) == "[]"
