"""Bus benchmark: CURVE request/reply between two processes, and bulk throughput with/without CURVE.

Run: ``python -m tests.bench.bench_bus`` (or ``make bench`` for every section).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from bus.auth import Authenticator
from bus.rpc import Caller, RpcClient, RpcServer
from bus.sockets import make_client, make_server
from node.identity import KeyPair
from tests.bench.report import print_table

ROUND_TRIPS = 5000
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
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = f"ipc://{Path(tmp)}/bench.rpc"
        ready = mp.Event()
        proc = mp.Process(target=_rpc_server, args=(endpoint, server, client.public, ready), daemon=True)
        proc.start()
        ready.wait(10)
        t0 = time.perf_counter()
        lat = asyncio.run(_round_trips(endpoint, server, client))
        elapsed = time.perf_counter() - t0
        proc.terminate()
        proc.join(5)
        qs = statistics.quantiles(lat, n=100)
        plain = _bulk(f"ipc://{tmp}/plain", False, server, client)
        curve = _bulk(f"ipc://{tmp}/curve", True, server, client)
    print_table(
        "bus: CURVE request/reply between two processes (ipc, msgpack envelopes)",
        ["metric", "value"],
        [
            ["round trips/s", f"{ROUND_TRIPS / elapsed:,.0f}"],
            ["p50 latency", f"{qs[49] * 1e6:,.0f} µs"],
            ["p99 latency", f"{qs[98] * 1e6:,.0f} µs"],
        ],
    )
    print_table(
        f"bus: bulk throughput, {BULK_BYTES >> 20} MiB in {CHUNK >> 20} MiB frames (ipc)",
        ["transport", "MB/s", "ratio to plain"],
        [["plain ZeroMQ", f"{plain:,.0f}", "1.00"], ["CURVE", f"{curve:,.0f}", f"{curve / plain:.2f}"]],
    )


if __name__ == "__main__":
    run()
