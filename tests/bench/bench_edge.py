"""The edge's costs and the stop's promise, measured (the security suite asserts only outcomes).

* What the checks cost per request: the engine-argument policy on the network's largest configuration,
  the JSON depth check of an 8 MiB body (the decoder's own time beside it), a callback URL at the route.
* How long ``POST /api/v1/stop`` takes on a real node (one gateway worker, the CPU engine serving):
  quiet, and under the security suite's flood -- the management port full, forty ``up``s queued behind a
  held mode lock, 300 slow clients -- median and worst of a few stops each. The contract promises 2 s.

Run: ``python -m tests.bench.bench_edge`` (or ``make bench`` for every section).
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec

from services.gateway.body import check_depth
from services.inference.engine_args import EnginePolicy
from services.inference.up_request import UpRequest
from services.pow.callback_policy import CallbackPolicy
from tests.bench.report import print_table
from tests.security.test_limits import CLIENT, mode_lock_held
from tests.support.network_configs import NETWORK_CONFIGS
from tests.support.node import Node
from tests.support.waiting import wait_until

STOPS = 5


def _per_call_us(fn: object, n: int) -> float:
    call = fn  # type: ignore[assignment]
    began = time.perf_counter()
    for _ in range(n):
        call()  # type: ignore[operator]
    return (time.perf_counter() - began) / n * 1e6


def checks() -> None:
    policy = EnginePolicy(model_roots=(Path("/srv/models"),))
    model, args = max(NETWORK_CONFIGS, key=lambda c: len(c[1]))
    req = UpRequest(model, "auto", tuple(args))
    body = b'{"nonces": [' + b",".join(b"%d" % i for i in range(1_300_000)) + b"]}"
    callbacks = CallbackPolicy(own_ports=frozenset({8080, 5000}))
    rows = [
        (f"engine policy, {len(args)} args", f"{_per_call_us(lambda: policy.vet(req), 2000):.1f} us"),
        (f"JSON depth check, {len(body) / 2**20:.1f} MiB",
         f"{_per_call_us(lambda: check_depth(body, 32), 10) / 1000:.1f} ms"),
        (f"JSON decode, {len(body) / 2**20:.1f} MiB (for scale)",
         f"{_per_call_us(lambda: msgspec.json.decode(body), 10) / 1000:.1f} ms"),
        ("callback URL at the route (IP literal)",
         f"{_per_call_us(lambda: callbacks.check_url('http://10.0.0.5:9100/v1/poc-batches'), 2000):.1f} us"),
    ]
    print_table("edge: what a check costs", ("check", "per call"), rows)


def _stop_s(node: Node) -> float:
    began = time.monotonic()
    assert node.api("POST", "/api/v1/stop", timeout=30).status == 200
    return time.monotonic() - began


def stops() -> None:
    with tempfile.TemporaryDirectory() as root:
        node = Node(Path(root), MLNODE_GATEWAY_WORKERS="1", MLNODE_MAX_REQUESTS="24",
                    MLNODE_HEADER_TIMEOUT="30", MLNODE_BODY_TIMEOUT="30").start()
        try:
            up = {"model": "org/bench-edge", "dtype": "auto"}
            quiet = []
            for _ in range(STOPS):
                assert node.api("POST", "/api/v1/inference/up", up, timeout=180).status == 200
                quiet.append(_stop_s(node))
            loaded: list[float] = []
            polls: list[float] = []
            with contextlib.ExitStack() as cleanup:
                for port in (node.api_port, node.inference_port):
                    for _ in range(150):
                        sock = socket.create_connection(("127.0.0.1", port), source_address=(CLIENT, 0))
                        cleanup.callback(sock.close)
                        sock.sendall(b"GET /api/v1/state HTTP/1.1\r\nHost: n\r\nX-Slow: ")
                for _ in range(20):
                    began = time.monotonic()
                    assert node.api("GET", "/api/v1/state", timeout=30).status == 200
                    polls.append(time.monotonic() - began)
                pool = cleanup.enter_context(ThreadPoolExecutor(40))
                for _ in range(STOPS):
                    assert node.api("POST", "/api/v1/inference/up", up, timeout=180).status == 200
                    with mode_lock_held(node):
                        ups = [pool.submit(node.api, "POST", "/api/v1/inference/up/async", up, timeout=120)
                               for _ in range(40)]
                        wait_until(lambda: node.api("GET", "/api/v1/state", timeout=30).status == 503,
                                   60, 0.1)
                        loaded.append(_stop_s(node))
                    for f in ups:
                        f.result()
                    node.api("POST", "/api/v1/stop", timeout=30)
        finally:
            node.stop()
    rows = [(label, f"{statistics.median(xs):.3f} s", f"{max(xs):.3f} s") for label, xs in
            (("quiet (engine serving)", quiet),
             ("flood: port full, 40 ups behind a held lock, 300 slow clients", loaded))]
    print_table(f"edge: POST /api/v1/stop, {STOPS} stops each (contract: within 2 s)",
                ("while", "median", "worst"), rows)
    print_table("edge: GET /api/v1/state with 300 slow clients open (was a test's 2 s bound)",
                ("samples", "median", "worst"),
                [(str(len(polls)), f"{statistics.median(polls):.3f} s", f"{max(polls):.3f} s")])


def run() -> None:
    checks()
    stops()


if __name__ == "__main__":
    run()
