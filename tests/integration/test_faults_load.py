"""Faults from clients: a crowd polling during mode switches, racing starts, and slowloris connections."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from services.gateway.server import EdgeProtocol
from tests.support.node import Node, request
from tests.support.pow import init_dict
from tests.support.receiver import Receiver
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
#: MLNODE_HEADER_TIMEOUT's default, which this node runs with.
HEAD_TIMEOUT_S = EdgeProtocol.head_timeout_s


STATES = {"POW", "INFERENCE", "TRAIN", "STOPPED"}
CLIENT_ADDRESS = "127.0.0.2"


def init_body(url: str) -> dict[str, Any]:
    return init_dict(url, block_height=3)


UP = {"model": "tiny-load", "dtype": "auto", "additional_args": []}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("load")).start()
    yield n
    n.stop()


class Crowd:
    """``n`` threads polling GET /api/v1/state as fast as they can until stopped."""

    def __init__(self, node: Node, n: int) -> None:
        self.node = node
        self.statuses: Counter[int] = Counter()
        self.states: Counter[str] = Counter()
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._poll, daemon=True) for _ in range(n)]

    def __enter__(self) -> Crowd:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _poll(self) -> None:
        # Keep-alive from 127.0.0.2: the crowd must not take the loopback ports the node's engines bind.
        conn = http.client.HTTPConnection("127.0.0.1", self.node.api_port, timeout=30,
                                          source_address=(CLIENT_ADDRESS, 0))
        while not self._stop.is_set():
            try:
                conn.request("GET", "/api/v1/state")
                resp = conn.getresponse()
                status, body = resp.status, resp.read()
                state = json.loads(body).get("state") if status == 200 else None
            except (OSError, ValueError, http.client.HTTPException) as exc:
                conn.close()
                with self._lock:
                    self.failures.append(repr(exc))
                continue
            with self._lock:
                self.statuses[status] += 1
                if state is not None:
                    self.states[state] += 1
        conn.close()


class Watch:
    """Samples /health until stopped; records the most services ever seen active at once."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.most_active = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                managers = request(self.node.api_port, "GET", "/health", timeout=30).json()["managers"]
            except (OSError, ValueError, KeyError, http.client.HTTPException):
                continue
            active = sum(1 for m in managers.values() if m.get("active"))
            self.most_active = max(self.most_active, active)
            self.samples += 1


def race(*calls: Callable[[], Any]) -> list[Any]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


def test_200_clients_poll_state_while_modes_switch_and_starts_race(node: Node, receiver: Receiver) -> None:
    """Promise: under 200 concurrent pollers /api/v1/state never fails and tells a valid state, while
    the node switches modes; two starts racing each other never leave two services running."""
    pids = {p: node.pid(p) for p in ("gateway", "pow", "inference", "train")}
    with Crowd(node, 200) as crowd, Watch(node) as watch:
        for _ in range(2):
            assert node.api("POST", "/api/v1/pow/init/generate", init_body(receiver.url)).status == 200
            wait_until(lambda: node.api("GET", "/api/v1/pow/status").json()["status"] == "GENERATING", 60)
            assert node.api("POST", "/api/v1/stop").status == 200
            assert node.api("POST", "/api/v1/inference/up", UP, timeout=120).status == 200
            assert node.api("GET", "/api/v1/state").json()["state"] == "INFERENCE"
            assert node.api("POST", "/api/v1/stop").status == 200
        for _ in range(3):
            pow_resp, inf_resp = race(
                lambda: node.api("POST", "/api/v1/pow/init/generate", init_body(receiver.url), timeout=120),
                lambda: node.api("POST", "/api/v1/inference/up/async", UP, timeout=120),
            )
            assert sorted([pow_resp.status, inf_resp.status]) == [200, 409], (pow_resp.body, inf_resp.body)
            loser = pow_resp if pow_resp.status == 409 else inf_resp
            assert "Cannot run" in loser.json()["detail"]
            winner = "POW" if pow_resp.status == 200 else "INFERENCE"
            assert node.api("GET", "/api/v1/state").json()["state"] == winner
            assert node.api("POST", "/api/v1/stop").status == 200
            sampled = watch.samples  # the watch sees the node after each stop, not only during the races
            wait_until(lambda s=sampled: watch.samples >= s + 2, 30, message="no /health sample after a stop")
    assert not crowd.failures, crowd.failures[:5]
    assert set(crowd.statuses) == {200}, crowd.statuses
    assert set(crowd.states) <= STATES and crowd.states["POW"] and crowd.states["INFERENCE"]
    assert sum(crowd.statuses.values()) >= 1000
    assert watch.samples >= 10 and watch.most_active <= 1
    assert {p: node.pid(p) for p in pids} == pids
    assert node.api("GET", "/api/v1/state").json()["state"] == "STOPPED"
    print(f"load: {sum(crowd.statuses.values())} state polls, states {dict(crowd.states)}, "
          f"{watch.samples} health samples")


def test_slowloris_connections_do_not_stop_the_gateway_and_are_cut_at_the_head_deadline(node: Node) -> None:
    """Promise: half-open connections (a request head that never ends, or nothing at all) cost the
    gateway nothing visible: other clients are served at once, and the stalled sockets are closed once
    their head deadline passes, with a 408 when they had begun a request."""
    stalled: list[socket.socket] = []
    try:
        for i in range(600):
            sock = socket.create_connection(("127.0.0.1", node.api_port), timeout=5,
                                            source_address=(CLIENT_ADDRESS, 0))
            if i % 3 == 0:
                sock.sendall(b"GET /api/v1/state HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            elif i % 3 == 1:
                sock.sendall(b"POST /api/v1/pow/init/generate HT")
            stalled.append(sock)
        opened = time.monotonic()
        # Served while every stalled socket is still held (how fast: `make bench`, bench_edge).
        for _ in range(20):
            assert node.api("GET", "/api/v1/state", timeout=10).status == 200
        for sock in stalled[::3]:
            sock.sendall(b"a")  # a trickle does not extend the deadline
        for sock in stalled:  # one not cut by the head deadline (plus slack) times out here: a failure
            sock.settimeout(max(1.0, HEAD_TIMEOUT_S + 10 - (time.monotonic() - opened)))
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(4096):
                    answer += chunk
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer[:100]
    finally:
        for sock in stalled:
            sock.close()
    assert node.api("GET", "/health").status == 200
