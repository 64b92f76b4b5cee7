"""Bus benchmark: CURVE request/reply between two processes next to raw pyzmq doing the same, and bulk
throughput with/without CURVE.

The baselines are what ZeroMQ itself costs, measured in the same run: a pyzmq DEALER sending one frame
to a ROUTER that echoes it, CURVE on, over ipc, once with blocking calls and once on asyncio
(``zmq.asyncio``, what a process serving other work at the same time has to use). The bus's goal is at
least 0.6 of raw pyzmq's round trips/s.

Run: ``python -m tests.bench.bench_bus`` (or ``make bench`` for every section).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import statistics
import tempfile
import time
from typing import Any

import zmq
import zmq.asyncio

from bus.auth import Authenticator
from bus.rpc import Caller, RpcClient, RpcServer
from bus.sockets import make_client, make_server
from node.identity import KeyPair
from tests.bench.report import print_table

ROUND_TRIPS = 5000
ROUNDS = 3
BULK_BYTES = 512 * 1024 * 1024
CHUNK = 1024 * 1024


def _rpc_server(endpoint: str, server: KeyPair, client_public: str, ready: Any) -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        auth = Authenticator(ctx).start()
        auth.set_allowed("local", {client_public})
        srv = RpcServer(ctx, auth, server, endpoint)

        async def echo(payload: Any, _caller: Caller) -> Any:
            return payload

        srv.route("echo", echo)
        ready.set()
        await srv.serve()

    asyncio.run(main())


def _raw_router(ctx: zmq.Context[Any], endpoint: str, server: KeyPair, client_public: str, ready: Any) -> Any:
    """ZeroMQ alone: a bound CURVE ROUTER behind the same ZAP allowlist as the bus."""
    auth = Authenticator(ctx).start()
    auth.set_allowed("local", {client_public})
    sock = ctx.socket(zmq.ROUTER)
    make_server(sock, auth, server, "local", 1 << 20)
    sock.bind(endpoint)
    ready.set()
    return sock


def _raw_server(endpoint: str, server: KeyPair, client_public: str, ready: Any) -> None:
    """Echoes each frame back, blocking calls."""
    sock = _raw_router(zmq.Context(), endpoint, server, client_public, ready)
    while True:
        sock.send_multipart(sock.recv_multipart(copy=False), copy=False)


def _raw_async_server(endpoint: str, server: KeyPair, client_public: str, ready: Any) -> None:
    async def main() -> None:
        sock = _raw_router(zmq.asyncio.Context(), endpoint, server, client_public, ready)
        while True:
            await sock.send_multipart(await sock.recv_multipart(copy=False), copy=False)

    asyncio.run(main())


async def _raw_async_round_trips(endpoint: str, server: KeyPair, client: KeyPair) -> list[float]:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    make_client(sock, client, server.public, 1 << 20)
    sock.connect(endpoint)
    await sock.send(b"warm")
    await sock.recv()
    latencies = []
    for i in range(ROUND_TRIPS):
        t0 = time.perf_counter()
        await sock.send(i.to_bytes(4, "little"))
        await sock.recv()
        latencies.append(time.perf_counter() - t0)
    sock.close(linger=0)
    ctx.term()
    return latencies


def _raw_round_trips(endpoint: str, server: KeyPair, client: KeyPair) -> list[float]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    make_client(sock, client, server.public, 1 << 20)
    sock.connect(endpoint)
    sock.send(b"warm")
    sock.recv()
    latencies = []
    for i in range(ROUND_TRIPS):
        t0 = time.perf_counter()
        sock.send(i.to_bytes(4, "little"))
        sock.recv()
        latencies.append(time.perf_counter() - t0)
    sock.close(linger=0)
    ctx.term()
    return latencies


def _measure(
    target: Any, measure: Any, endpoint: str, server: KeyPair, client: KeyPair
) -> tuple[float, list[float]]:
    """Round trips/s and latencies of ``measure`` against a server process running ``target``."""
    ready = mp.Event()
    proc = mp.Process(target=target, args=(endpoint, server, client.public, ready), daemon=True)
    proc.start()
    ready.wait(10)
    try:
        t0 = time.perf_counter()
        latencies: list[float] = measure(endpoint, server, client)
        elapsed = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.join(5)
    return ROUND_TRIPS / elapsed, latencies


def _sink(endpoint: str, curve: bool, server: KeyPair, client_public: str, ready: Any) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    if curve:
        auth = Authenticator(ctx).start()
        auth.set_allowed("local", {client_public})
        make_server(sock, auth, server, "local", 2 * CHUNK)
    sock.bind(endpoint)
    ready.set()
    received = 0
    while received < BULK_BYTES:
        received += len(sock.recv(copy=False))
    ack = ctx.socket(zmq.PUSH)
    ack.connect(endpoint + ".ack")
    ack.send(b"done")
    ack.close()
    sock.close()
    ctx.term()


async def _round_trips(endpoint: str, server: KeyPair, client: KeyPair) -> list[float]:
    ctx = zmq.asyncio.Context()
    rpc = RpcClient(ctx, client, server.public, endpoint)
    await rpc.request("echo", "warm", timeout=10)
    latencies = []
    for i in range(ROUND_TRIPS):
        t0 = time.perf_counter()
        await rpc.request("echo", i, timeout=10)
        latencies.append(time.perf_counter() - t0)
    rpc.close()
    ctx.destroy(linger=0)
    return latencies


def _bulk(endpoint: str, curve: bool, server: KeyPair, client: KeyPair) -> float:
    ready = mp.Event()
    proc = mp.Process(target=_sink, args=(endpoint, curve, server, client.public, ready), daemon=True)
    proc.start()
    ready.wait(10)
    ctx = zmq.Context()
    ack = ctx.socket(zmq.PULL)
    ack.bind(endpoint + ".ack")
    sock = ctx.socket(zmq.PUSH)
    if curve:
        make_client(sock, client, server.public, 2 * CHUNK)
    sock.connect(endpoint)
    payload = b"\x5a" * CHUNK
    t0 = time.perf_counter()
    for _ in range(BULK_BYTES // CHUNK):
        sock.send(payload, copy=False)
    ack.recv()
    elapsed = time.perf_counter() - t0
    sock.close(linger=0)
    ack.close(linger=0)
    ctx.term()
    proc.join(5)
    return BULK_BYTES / elapsed / 1e6


def run() -> None:
    server, client = KeyPair.generate(), KeyPair.generate()
    clients = {
        "raw pyzmq, blocking": (_raw_server, _raw_round_trips),
        "raw pyzmq, asyncio": (_raw_async_server, lambda *a: asyncio.run(_raw_async_round_trips(*a))),
        "bus request/reply": (_rpc_server, lambda *a: asyncio.run(_round_trips(*a))),
    }
    rates: dict[str, list[float]] = {name: [] for name in clients}
    latencies: dict[str, list[float]] = {name: [] for name in clients}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(ROUNDS):  # interleaved, so a noisy moment hits every client alike
            for j, (name, (serve, measure)) in enumerate(clients.items()):
                endpoint = f"ipc://{tmp}/{i}-{j}.rpc"
                rate, lat = _measure(serve, measure, endpoint, server, client)
                rates[name].append(rate)
                latencies[name] += lat
        plain = _bulk(f"ipc://{tmp}/plain", False, server, client)
        curve = _bulk(f"ipc://{tmp}/curve", True, server, client)
    rate = {name: statistics.median(values) for name, values in rates.items()}
    raw_rate, araw_rate = rate["raw pyzmq, blocking"], rate["raw pyzmq, asyncio"]
    rows = []
    for name in clients:
        qs = statistics.quantiles(latencies[name], n=100)
        rows.append([name, f"{rate[name]:,.0f}", f"{qs[49] * 1e6:,.0f} µs", f"{qs[98] * 1e6:,.0f} µs",
                     f"{rate[name] / raw_rate:.2f}", f"{rate[name] / araw_rate:.2f}"])
    print_table(
        f"bus: CURVE DEALER/ROUTER round trips between two processes over ipc, median of {ROUNDS} "
        f"interleaved rounds of {ROUND_TRIPS}",
        ["client", "round trips/s", "p50", "p99", "ratio to blocking", "ratio to asyncio"],
        rows,
    )
    print_table(
        f"bus: bulk throughput, {BULK_BYTES >> 20} MiB in {CHUNK >> 20} MiB frames (ipc)",
        ["transport", "MB/s", "ratio to plain"],
        [["plain ZeroMQ", f"{plain:,.0f}", "1.00"], ["CURVE", f"{curve:,.0f}", f"{curve / plain:.2f}"]],
    )


if __name__ == "__main__":
    run()
