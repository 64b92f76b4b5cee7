"""Faults on the bus: a peer holding a local key sends garbage, oversized and replayed frames.

Raw pyzmq on purpose (the fault is a peer that does not use our bus code). The promise of every test
here: each service drops what it cannot read, keeps its process, answers the next good request, and
the drops and refused handshakes show in ``/metrics``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

from node.identity import KeyPair, load
from tests.support.node import Node
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SERVICES = ("pow", "inference", "train")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("bus")).start()
    yield n
    n.stop()


@pytest.fixture
def context() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def dealer(ctx: zmq.Context[Any], node: Node, service: str, client: KeyPair) -> zmq.Socket[Any]:
    server = load(node.state_dir / "keys" / "local" / f"{service}.key")
    sock = ctx.socket(zmq.DEALER)
    sock.curve_serverkey = server.public.encode()
    sock.curve_publickey = client.public.encode()
    sock.curve_secretkey = client.secret.encode()
    sock.linger = 0
    sock.rcvtimeo = 5000
    sock.connect(f"ipc://{node.state_dir}/run/{service}.rpc")
    return sock


def envelope(kind: str, *, deadline_in: float = 10.0, **overrides: Any) -> bytes:
    doc = {"v": 1, "type": kind, "id": uuid.uuid4().hex, "payload": None,
           "deadline": time.time() + deadline_in}
    doc.update(overrides)
    return bytes(msgpack.packb(doc, use_bin_type=True))


def replies(sock: zmq.Socket[Any], wait_s: float, expect: int = 0) -> list[dict[str, Any]]:
    """Replies arriving within ``wait_s``; after ``expect`` of them, only a short grace for extras."""
    found = []
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000)):
            break
        found.append(msgpack.unpackb(sock.recv(), raw=False))
        if expect and len(found) >= expect:
            deadline = min(deadline, time.monotonic() + 0.3)
    return found


GARBAGE: list[list[bytes]] = [
    [b"\x00not msgpack at all\xff"],
    [msgpack.packb([1, 2, 3])],
    [envelope("status", v=99)],
    [msgpack.packb({"v": 1, "type": "status"})],  # no id
    [envelope("status", deadline="soon")],
    [b"\x91" * 200_000 + b"\xc0"],  # nesting bomb
    [b"\xdd\xff\xff\xff\xff"],  # an array that claims 4 G entries
    [b"first", b"second"],  # wrong frame count
    [envelope("status", deadline_in=-5.0)],  # already expired: a stale replay
]


def dropped(node: Node, service: str) -> float:
    """The service's dropped-frame counter, once a scrape shows it: a service that has not yet answered
    any scrape within its deadline (busy starting, on a loaded host) has no series yet."""
    prefix = f'mlnode_bus_dropped_frames_total{{service="{service}"}} '

    def shown() -> list[str]:
        text = node.api("GET", "/metrics").body.decode()
        return [line for line in text.splitlines() if line.startswith(prefix)]

    return float(wait_until(shown, 30, 0.2, f"no {prefix.strip()} series in /metrics")[0].split()[-1])


@pytest.mark.parametrize("service", SERVICES)
def test_garbage_and_replays_are_dropped_and_the_service_answers(node: Node, context: zmq.Context[Any],
                                                                 service: str) -> None:
    """Promise: malformed, expired and oversized frames are dropped; the process stays; replays of a
    live request are answered like the original (requests carry deadlines, so old ones are refused)."""
    pid, before = node.pid(service), dropped(node, service)
    cli = load(node.state_dir / "keys" / "local" / "cli.key")
    sock = dealer(context, node, service, cli)
    for frames in GARBAGE:
        sock.send_multipart(frames)
    # Nothing answers the garbage: an answer to any of it would come among (or before) the two below.
    frame = envelope("status")
    sock.send(frame)
    sock.send(frame)  # replayed within its deadline
    answers = replies(sock, 5.0, expect=2)
    assert [a["type"] for a in answers] == ["reply", "reply"]
    assert {a["id"] for a in answers} == {msgpack.unpackb(frame)["id"]}
    assert answers[0]["payload"]["service"] == service

    sock.send(envelope("no_such_request"))
    [unknown] = replies(sock, 5.0, expect=1)
    assert unknown["type"] == "error" and unknown["error"]["kind"] == "not_found"

    sock.send(b"\x00" * (9 * 1024 * 1024))  # over MAXMSGSIZE: the server drops the connection
    sock.close()
    sock = dealer(context, node, service, cli)
    sock.send(envelope("ping"))
    [pong] = replies(sock, 5.0, expect=1)
    assert pong["payload"]["service"] == service

    assert node.pid(service) == pid
    wait_until(lambda: dropped(node, service) - before >= len(GARBAGE), 30, 0.2,
               f"{service} did not count {len(GARBAGE)} dropped frames")
    assert service in node.api("GET", "/health").json()["managers"]


def test_an_unknown_key_is_refused_and_counted_by_socket(node: Node, context: zmq.Context[Any]) -> None:
    """Promise: a CURVE client whose key is not on the node's list gets no answer at all, and the refusal
    shows as mlnode_bus_auth_failures_total{service, domain} for that socket."""
    stranger = KeyPair.generate()
    for service in SERVICES:
        sock = dealer(context, node, service, stranger)
        sock.send(envelope("status"))
        assert replies(sock, 1.5) == []
        sock.close()

    def failures() -> dict[str, float]:
        found = {}
        for line in node.api("GET", "/metrics").body.decode().splitlines():
            if line.startswith("mlnode_bus_auth_failures_total{"):
                found[line.split('service="')[1].split('"')[0]] = float(line.split()[-1])
        return found

    seen = wait_until(lambda: (f := failures()) and all(f.get(s, 0) >= 1 for s in SERVICES) and f, 10)
    assert set(seen) == set(SERVICES)
    assert node.api("GET", "/health").status == 200
