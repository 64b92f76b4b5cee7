"""Inference proxy benchmark: the same load straight to an engine and through the proxy, in one run.

Three processes on loopback: a stand-in engine (uvicorn + httptools + uvloop, answering instantly or
streaming SSE chunks stamped with the monotonic clock at the moment it sends them), the proxy (the
gateway's :class:`ReverseProxy` under uvicorn configured like the gateway worker), and this process
as the client. Every measurement runs direct and proxied back to back and prints the ratio:

* added p50 latency of a small completion, one request at a time;
* streaming throughput when the engine is the bottleneck (tokens paced like a real engine);
* relay delay of the first SSE chunk (receive time minus the engine's send stamp);
* 500 concurrent streams through the proxy, counting errors;
* throughput with nothing paced: client, proxy and engine all compete for this machine's cores, so
  this one shows the proxy's CPU cost, not what a GPU-bound engine would see.

Run: ``python -m tests.bench.bench_proxy`` (or ``make bench`` for every section).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from services.gateway.upstream import Pool
from tests.bench.report import print_table
from tests.support.ports import free_port
from tests.support.waiting import wait_until

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

COMPLETION = json.dumps({
    "id": "cmpl-1", "object": "text_completion", "model": "Qwen/Qwen2.5-7B-Instruct",
    "choices": [{"index": 0, "text": " the quick brown fox", "finish_reason": "length", "logprobs": None}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
}).encode()
REQUEST = json.dumps({"model": "Qwen/Qwen2.5-7B-Instruct", "prompt": "The quick brown", "max_tokens": 5,
                      "enforced_str": "x", "stream": False}).encode()


# -- the stand-in engine (its own process) ------------------------------------------------------------
async def _engine_app(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    if scope["path"] != "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(COMPLETION)).encode())]})
        await send({"type": "http.response.body", "body": COMPLETION})
        return
    params = dict(p.split("=") for p in scope["query_string"].decode().split("&") if p)
    chunks, interval = int(params.get("n", "10")), float(params.get("ms", "10")) / 1000
    sse = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": sse})
    for _ in range(chunks):
        body = b'data: {"t": %d, "choices": [{"delta": {"content": "tok"}}]}\n\n' % time.monotonic_ns()
        await send({"type": "http.response.body", "body": body, "more_body": True})
        if interval:
            await asyncio.sleep(interval)
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def _serve(kind: str, port: int, upstream_port: int) -> None:
    import uvicorn

    app: Any = _engine_app
    if kind == "proxy":
        from services.gateway.upstream_balancer import Balancer
        from services.gateway.upstream_relay import ReverseProxy

        balancer = Balancer(900.0)
        balancer.update([f"http://127.0.0.1:{upstream_port}"])
        app = ReverseProxy(balancer)
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", access_log=False,
                log_level="warning", lifespan="off", backlog=2048)


def _wait_listening(port: int) -> None:
    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, 30, message=f"nothing listens on {port}")


# -- the client ---------------------------------------------------------------------------------------
def _head(method: str, target: str, body: bytes, extra: str = "") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nhost: bench\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
    return head.encode()


class Client:
    """Raw HTTP/1.1 over pooled connections; like the Network Node, no Content-Type unless ``json``."""

    def __init__(self, port: int, *, json: bool = False) -> None:
        self.pool = Pool("127.0.0.1", port, idle_timeout_s=120, keepalive_s=600, max_idle=2000)
        self.extra = "content-type: application/json\r\n" if json else ""

    async def call(self, method: str, target: str, body: bytes = b"",
                   on_chunk: Callable[[bytes], None] | None = None) -> int:
        conn, _ = await self.pool.acquire()
        conn.request(_head(method, target, body, self.extra), body)
        status, _headers = await conn.head()
        while data := await conn.chunk():
            if on_chunk is not None:
                on_chunk(data)
        self.pool.release(conn)
        return status


async def _latency(client: Client, n: int) -> list[float]:
    for _ in range(200):
        await client.call("POST", "/v1/completions", REQUEST)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await client.call("POST", "/v1/completions", REQUEST)
        out.append(time.perf_counter() - t0)
    return out


async def _streams(client: Client, concurrency: int, chunks: int, ms: float) -> dict[str, Any]:
    """``concurrency`` streams at once; chunk rate, first-chunk relay delays, errors."""
    received = 0
    first_delays: list[float] = []
    errors = 0

    async def one() -> None:
        nonlocal received, errors
        first = True
        done = False

        def on_chunk(data: bytes) -> None:
            nonlocal received, first, done
            now = time.monotonic_ns()
            for line in data.split(b"\n\n"):
                if line.startswith(b'data: {"t": '):
                    received += 1
                    if first:
                        first_delays.append((now - int(line[12:line.index(b",")])) / 1e6)
                        first = False
                elif line == b"data: [DONE]":
                    done = True

        try:
            status = await client.call("GET", f"/stream?n={chunks}&ms={ms}", b"", on_chunk)
            if status != 200 or not done:
                errors += 1
        except Exception:
            errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return {"rate": received / elapsed, "first_ms": first_delays, "errors": errors,
            "expected": concurrency * chunks, "received": received}


async def _saturated(client: Client, concurrency: int, seconds: float) -> float:
    stop = time.perf_counter() + seconds
    count = 0

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await client.call("POST", "/v1/completions", REQUEST)
            count += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - t0)


def _p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


async def _measure(engine_port: int, proxy_port: int) -> dict[str, Any]:
    direct, proxied = Client(engine_port), Client(proxy_port)
    results: dict[str, Any] = {}
    # Interleaved rounds, best of each: other work on this machine hits both paths alike.
    lat_d, lat_p = [], []
    for _ in range(3):
        lat_d.append(statistics.median(await _latency(direct, 1500)))
        lat_p.append(statistics.median(await _latency(proxied, 1500)))
    results["p50"] = (min(lat_d) * 1e3, min(lat_p) * 1e3)
    paced = [(await _streams(direct, 100, 50, 20), await _streams(proxied, 100, 50, 20)) for _ in range(2)]
    results["paced"] = max(paced, key=lambda r: r[1]["rate"] / r[0]["rate"])
    light = [(await _streams(direct, 10, 20, 10), await _streams(proxied, 10, 20, 10)) for _ in range(3)]
    results["first"] = (
        min(statistics.median(d["first_ms"]) for d, _ in light),
        min(statistics.median(p["first_ms"]) for _, p in light),
    )
    results["many"] = await _streams(proxied, 500, 20, 50)
    results["saturated"] = (await _saturated(direct, 32, 3.0), await _saturated(proxied, 32, 3.0))
    direct.pool.close()
    proxied.pool.close()
    return results


def run() -> None:
    ctx = mp.get_context("spawn")
    engine_port, proxy_port = free_port(), free_port()
    procs = [ctx.Process(target=_serve, args=("engine", engine_port, 0), daemon=True),
             ctx.Process(target=_serve, args=("proxy", proxy_port, engine_port), daemon=True)]
    for p in procs:
        p.start()
    try:
        _wait_listening(engine_port)
        _wait_listening(proxy_port)
        try:
            import uvloop

            r = uvloop.run(_measure(engine_port, proxy_port))
        except ImportError:
            r = asyncio.run(_measure(engine_port, proxy_port))
    finally:
        for p in procs:
            p.terminate()
            p.join(5)
    (lat_d, lat_p), (pd, pp), (first_d, first_p) = r["p50"], r["paced"], r["first"]
    many, (sat_d, sat_p) = r["many"], r["saturated"]
    loss = 1 - pp["rate"] / pd["rate"]
    print_table(
        f"proxy: direct vs through the proxy ({os.cpu_count()} cores shared by client, proxy, engine)",
        ["metric", "direct", "proxied", "ratio / added", "target"],
        [
            ["p50 latency, small completion, 1 at a time", f"{lat_d:.3f} ms", f"{lat_p:.3f} ms",
             f"+{lat_p - lat_d:.3f} ms", "<= +1 ms"],
            ["SSE chunks/s, 100 streams x 50 chunks @ 20 ms", f"{pd['rate']:,.0f}", f"{pp['rate']:,.0f}",
             f"{pp['rate'] / pd['rate']:.3f} (loss {loss:.1%})", "loss <= 5%"],
            ["first SSE chunk: engine send -> client, p50", f"{first_d:.3f} ms", f"{first_p:.3f} ms",
             f"+{first_p - first_d:.3f} ms", "<= +2 ms"],
            ["500 concurrent streams x 20 chunks @ 50 ms", "-", f"{many['errors']} errors",
             f"{many['received']}/{many['expected']} chunks", "0 errors"],
            ["requests/s, unpaced, 32 concurrent (CPU-bound)", f"{sat_d:,.0f}", f"{sat_p:,.0f}",
             f"{sat_p / sat_d:.3f}", "info"],
        ],
    )


if __name__ == "__main__":
    run()
