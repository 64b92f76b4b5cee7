"""Peer links on real CURVE sockets over loopback TCP: who is heard, credits, chunks, and garbage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import msgspec
import pytest
import zmq
import zmq.asyncio

from bus.auth import Authenticator
from bus.peers import DOMAIN, HEADER_LIMIT, PeerLink, PeerMessage
from bus.sockets import make_client
from node.errors import DeadlineExceeded
from node.identity import KeyPair
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(60)
CHUNK = 4096


def body(msg: PeerMessage) -> Any:
    """What the sender sent, decoded (the link hands it on undecoded)."""
    return msgspec.msgpack.decode(msg.body)


@dataclass
class Node:
    ctx: zmq.asyncio.Context
    auth: Authenticator
    keys: KeyPair
    link: PeerLink
    inbox: asyncio.Queue[PeerMessage] = field(default_factory=asyncio.Queue)

    async def next(self, timeout: float = 5.0) -> PeerMessage:
        return await asyncio.wait_for(self.inbox.get(), timeout)

    async def nothing_for(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.inbox.get(), seconds)
        except TimeoutError:
            return True
        return False


@pytest.fixture
async def nodes() -> AsyncIterator[list[Node]]:
    made: list[Node] = []
    for _ in range(3):
        ctx = zmq.asyncio.Context()
        auth = Authenticator(ctx).start()
        keys = KeyPair.generate()
        inbox: asyncio.Queue[PeerMessage] = asyncio.Queue()
        link = PeerLink(ctx, auth, keys, "tcp://127.0.0.1:0", inbox.put_nowait, max_payload=CHUNK, window=2)
        link.start()
        made.append(Node(ctx, auth, keys, link, inbox))
    yield made
    for node in made:
        await node.link.aclose()
        node.auth.stop()
        node.ctx.destroy(linger=0)


def wire(a: Node, b: Node) -> None:
    """Make a and b peers of each other (and of nobody else).

    Each admits the other before either connects: otherwise, on a busy machine, a's handshake can reach
    b before b registered a, and a's first message is lost with the refused connection (the case of
    test_a_peer_refused_before_it_was_registered_gets_through_once_it_is).
    """
    a.auth.set_allowed(DOMAIN, {b.keys.public})
    b.auth.set_allowed(DOMAIN, {a.keys.public})
    a.link.set_peers({b.keys.public: b.link.endpoint})
    b.link.set_peers({a.keys.public: a.link.endpoint})


async def test_registered_peer_is_heard_with_its_authenticated_key(nodes: list[Node]) -> None:
    a, b, _ = nodes
    wire(a, b)
    assert b.link.send(a.keys.public, {"t": "hello", "n": 1})
    msg = await a.next()
    assert msg.key == b.keys.public and body(msg) == {"t": "hello", "n": 1} and msg.payload is None
    assert a.link.last_heard(b.keys.public) is not None
    assert a.auth.allowed(DOMAIN) == {b.keys.public}


async def test_stranger_with_a_valid_curve_key_is_refused(nodes: list[Node]) -> None:
    a, b, stranger = nodes
    wire(a, b)
    # The stranger knows a's address and public key and holds a real keypair, but nobody registered it.
    stranger.link.set_peers({a.keys.public: a.link.endpoint})
    for i in range(3):
        stranger.link.send(a.keys.public, {"t": "intrude", "i": i})
    b.link.send(a.keys.public, {"t": "legit"})
    msg = await a.next()
    assert body(msg)["t"] == "legit"
    await until(lambda: a.auth.failures[DOMAIN] >= 1, what="the stranger refused at the CURVE handshake")
    assert await a.nothing_for(0.5)  # and none of its messages came through


async def test_a_peer_refused_before_it_was_registered_gets_through_once_it_is(nodes: list[Node]) -> None:
    a, b, _ = nodes
    b.link.set_peers({a.keys.public: a.link.endpoint})  # a has not registered b yet
    b.link.send(a.keys.public, {"t": "too-early"})
    await until(lambda: a.auth.failures[DOMAIN] >= 1, what="the CURVE handshake refused")
    # libzmq never retries a refused CURVE handshake by itself; the link re-opens the connection.
    a.link.set_peers({b.keys.public: b.link.endpoint})
    deadline = asyncio.get_running_loop().time() + 10
    while True:  # b keeps talking, as its heartbeats would
        b.link.send(a.keys.public, {"t": "hello"})
        try:
            msg = await a.next(0.2)
            break
        except TimeoutError:
            assert asyncio.get_running_loop().time() < deadline
    assert body(msg)["t"] == "hello"


async def test_credited_messages_sent_before_the_peer_registered_us_arrive_once_it_does(
    nodes: list[Node],
) -> None:
    a, b, _ = nodes
    b.link.set_peers({a.keys.public: a.link.endpoint})  # a has not registered b yet
    payload = memoryview(bytes(CHUNK))
    for i in range(2):  # a whole window of data goes out on a connection that a is going to refuse
        await b.link.send_credited(a.keys.public, {"t": "data", "i": i}, payload, timeout=1)
    await until(lambda: a.auth.failures[DOMAIN] >= 1, what="the CURVE handshake refused")
    a.link.set_peers({b.keys.public: b.link.endpoint})
    got = [await a.next(10) for _ in range(2)]
    assert [body(m)["i"] for m in got] == [0, 1]  # re-sent on the re-opened connection, in order
    for msg in got:
        a.link.ack(msg)
    await b.link.send_credited(a.keys.public, {"t": "data", "i": 2}, payload, timeout=5)  # credits back
    assert body(await a.next())["i"] == 2
    assert await a.nothing_for(0.5)  # and nothing twice


async def test_removed_key_stops_being_heard_on_an_open_connection(nodes: list[Node]) -> None:
    a, b, c = nodes
    a.link.set_peers({b.keys.public: b.link.endpoint, c.keys.public: c.link.endpoint})
    b.link.set_peers({a.keys.public: a.link.endpoint})
    c.link.set_peers({a.keys.public: a.link.endpoint})
    b.link.send(a.keys.public, {"t": "before"})
    assert body(await a.next())["t"] == "before"
    a.link.set_peers({c.keys.public: c.link.endpoint})  # revoke b mid-run
    dropped = a.link.dropped
    b.link.send(a.keys.public, {"t": "after"})  # same TCP connection, already authenticated
    c.link.send(a.keys.public, {"t": "still-here"})
    assert body(await a.next())["t"] == "still-here"
    assert await a.nothing_for(0.3)
    assert a.link.dropped == dropped + 1
    assert a.auth.allowed(DOMAIN) == {c.keys.public}


async def test_credits_bound_what_a_slow_receiver_makes_the_sender_queue(nodes: list[Node]) -> None:
    a, b, _ = nodes
    wire(a, b)
    payload = memoryview(bytes(CHUNK))
    for i in range(2):  # the window is 2
        await b.link.send_credited(a.keys.public, {"t": "data", "i": i}, payload, timeout=1)
    with pytest.raises(DeadlineExceeded):
        await b.link.send_credited(a.keys.public, {"t": "data", "i": 2}, payload, timeout=0.3)
    first = await a.next()
    await a.next()
    assert first.credit is not None and bytes(first.payload or b"") == bytes(CHUNK)
    a.link.ack(first)  # one credit back -> exactly one more message may go
    await b.link.send_credited(a.keys.public, {"t": "data", "i": 3}, payload, timeout=2)
    assert body(await a.next())["i"] == 3
    with pytest.raises(DeadlineExceeded):
        await b.link.send_credited(a.keys.public, {"t": "data", "i": 4}, payload, timeout=0.3)


async def test_garbage_frames_are_dropped_and_the_receiver_keeps_working(nodes: list[Node]) -> None:
    a, b, c = nodes
    a.link.set_peers({b.keys.public: b.link.endpoint, c.keys.public: c.link.endpoint})
    c.link.set_peers({a.keys.public: a.link.endpoint})
    # b is registered with a, but speaks through a raw CURVE socket that sends whatever it likes.
    raw: zmq.Socket[bytes] = zmq.Context.shadow(b.ctx.underlying).socket(zmq.DEALER)
    make_client(raw, b.keys, a.keys.public, 1 << 22)
    raw.connect(a.link.endpoint)
    inc = msgpack.packb({"i": 7, "m": {"t": "x"}})
    garbage = [
        [b"\xc1\xff not msgpack"],
        [msgpack.packb([1, 2, 3])],
        [msgpack.packb({"m": {"t": "x"}})],  # no incarnation
        [msgpack.packb({1: "int key", "i": 7})],
        [inc, b"payload", b"one frame too many"],
        [msgpack.packb({"i": 7, "g": "not an int", "m": {"t": "x"}}), b"p"],
        [msgpack.packb({"i": -1, "m": {"t": "x"}})],  # out of range
        [msgpack.packb({"i": 7, "m": {"t": "x"}, "extra": 1})],  # a field the link does not know
        [msgpack.packb({"i": 7})],  # neither a message nor an ack
        [msgpack.packb({"i": 7, "a": 1, "m": {"t": "x"}})],  # both
        [b"\x00" * (HEADER_LIMIT + 100), b"x"],  # bigger than the header limit, within MAXMSGSIZE
    ]
    for frames in garbage:
        raw.send_multipart(frames)
    raw.send_multipart([msgpack.packb({"i": 7, "m": {"t": "ok-from-raw"}})])
    c.link.send(a.keys.public, {"t": "ok-from-link"})
    got = {body(await a.next())["t"] for _ in range(2)}
    assert got == {"ok-from-raw", "ok-from-link"}
    assert a.link.dropped == len(garbage)  # one connection keeps order: all were read before the good one
    raw.close(linger=0)


async def test_oversized_frame_is_cut_off_by_maxmsgsize(nodes: list[Node]) -> None:
    a, b, c = nodes
    a.link.set_peers({b.keys.public: b.link.endpoint, c.keys.public: c.link.endpoint})
    c.link.set_peers({a.keys.public: a.link.endpoint})
    raw: zmq.Socket[bytes] = zmq.Context.shadow(b.ctx.underlying).socket(zmq.DEALER)
    make_client(raw, b.keys, a.keys.public, 1 << 24)
    raw.connect(a.link.endpoint)
    raw.send_multipart([msgpack.packb({"i": 1, "m": {"t": "huge"}}), bytes(a.link.max_bytes + 1)])
    c.link.send(a.keys.public, {"t": "fine"})
    assert body(await a.next())["t"] == "fine"
    assert await a.nothing_for(0.3)  # libzmq dropped the connection instead of buffering the frame
    raw.close(linger=0)


async def test_a_restarted_peer_gets_fresh_credits(nodes: list[Node]) -> None:
    a, b, _ = nodes
    wire(a, b)
    a.link.send(b.keys.public, {"t": "hello"})
    await b.next()
    payload = memoryview(bytes(16))
    for i in range(2):
        await b.link.send_credited(a.keys.public, {"t": "data", "i": i}, payload, timeout=1)
    await a.next()
    await a.next()
    # a "restarts" (new incarnation) without acknowledging: its credits would never come back.
    a.link.incarnation += 1
    a.link.send(b.keys.public, {"t": "hello-again"})
    await b.next()
    await b.link.send_credited(a.keys.public, {"t": "data", "i": 2}, payload, timeout=1)
    assert body(await a.next())["i"] == 2


async def test_an_ack_the_link_could_not_send_is_owed_and_paid_once_it_can(nodes: list[Node]) -> None:
    # Seen under load: our connection to a sender is still being re-opened (it registered our key a
    # moment late) while its chunks arrive; every ack dropped then would shrink its window for good.
    link = nodes[0].link
    sent: list[tuple[str, int]] = []
    refuse = [3]

    def send_ack(key: str, credit: int) -> bool:
        if refuse[0] > 0:
            refuse[0] -= 1
            return False
        sent.append((key, credit))
        return True

    peer_key = KeyPair.generate().public
    link.set_peers({peer_key: "tcp://127.0.0.1:9"})
    link._send_ack = send_ack  # type: ignore[method-assign]
    link.ack(PeerMessage(peer_key, msgspec.Raw(msgpack.packb({"t": "chunk"})), None, credit=4))
    link.ack(PeerMessage(peer_key, msgspec.Raw(msgpack.packb({"t": "hb"}))))  # not credited: no ack
    await until(lambda: bool(sent), what="the owed ack sent")
    assert link._paying is not None
    await asyncio.wait_for(link._paying, 10)  # the payer is done: nothing is owed, nothing more will go
    assert sent == [(peer_key, 4)] and refuse == [0] and link._owed == []


async def test_a_registered_peer_sending_broken_frames_is_reported_to_the_links_owner(
    nodes: list[Node],
) -> None:
    """The link cannot tell a bug from an attack, but it knows who sent the frame: its owner decides (the
    training group drops such a peer)."""
    a, b, _ = nodes
    seen: list[tuple[str, str]] = []
    inbox: asyncio.Queue[PeerMessage] = asyncio.Queue()
    link = PeerLink(a.ctx, a.auth, KeyPair.generate(), "tcp://127.0.0.1:0", inbox.put_nowait,
                    on_violation=lambda key, reason: seen.append((key, reason)))
    link.start()
    try:
        link.set_peers({b.keys.public: b.link.endpoint})
        raw: zmq.Socket[bytes] = zmq.Context.shadow(b.ctx.underlying).socket(zmq.DEALER)
        make_client(raw, b.keys, link.keypair.public, 1 << 22)
        raw.connect(link.endpoint)
        raw.send_multipart([msgpack.packb({"i": 7, "m": {"t": "x"}, "extra": 1})])
        raw.send_multipart([msgpack.packb({"i": 7, "m": {"t": "fine"}})])
        assert body(await asyncio.wait_for(inbox.get(), 5)) == {"t": "fine"}
        assert len(seen) == 1 and seen[0][0] == b.keys.public and "extra" in seen[0][1]
        raw.close(linger=0)
    finally:
        await link.aclose()
