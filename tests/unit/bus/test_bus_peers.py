"""Peer links on real CURVE sockets over loopback TCP: who is heard, credits, chunks, and garbage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
import torch
import zmq
import zmq.asyncio

from bus.agreement import Decision, Hooks, StepAgreement, answer_after, answer_left
from bus.auth import Authenticator
from bus.peers import DOMAIN, HEADER_LIMIT, PeerLink, PeerMessage
from bus.sockets import make_client
from bus.tensors import ChunkHeader, TensorAssembler, chunk_spans, iter_chunks
from node.errors import DeadlineExceeded, ProtocolError
from node.identity import KeyPair

pytestmark = pytest.mark.timeout(60)
CHUNK = 4096


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
        link = PeerLink(ctx, auth, keys, "tcp://127.0.0.1:0", inbox.put_nowait, chunk_bytes=CHUNK, window=2)
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
    assert msg.key == b.keys.public and msg.header == {"t": "hello", "n": 1} and msg.payload is None
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
    assert msg.header["t"] == "legit"
    assert await a.nothing_for(0.5)
    assert a.auth.failures[DOMAIN] >= 1  # refused at the CURVE handshake, before any message


async def test_a_peer_refused_before_it_was_registered_gets_through_once_it_is(nodes: list[Node]) -> None:
    a, b, _ = nodes
    b.link.set_peers({a.keys.public: a.link.endpoint})  # a has not registered b yet
    b.link.send(a.keys.public, {"t": "too-early"})
    await asyncio.sleep(0.3)
    assert a.auth.failures[DOMAIN] >= 1
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
    assert msg.header["t"] == "hello"


async def test_credited_messages_sent_before_the_peer_registered_us_arrive_once_it_does(
    nodes: list[Node],
) -> None:
    a, b, _ = nodes
    b.link.set_peers({a.keys.public: a.link.endpoint})  # a has not registered b yet
    payload = memoryview(bytes(CHUNK))
    for i in range(2):  # a whole window of data goes out on a connection that a is going to refuse
        await b.link.send_credited(a.keys.public, {"t": "data", "i": i}, payload, timeout=1)
    await asyncio.sleep(0.3)
    assert a.auth.failures[DOMAIN] >= 1
    a.link.set_peers({b.keys.public: b.link.endpoint})
    got = [await a.next(10) for _ in range(2)]
    assert [m.header["i"] for m in got] == [0, 1]  # re-sent on the re-opened connection, in order
    for msg in got:
        a.link.ack(msg)
    await b.link.send_credited(a.keys.public, {"t": "data", "i": 2}, payload, timeout=5)  # credits back
    assert (await a.next()).header["i"] == 2
    assert await a.nothing_for(0.5)  # and nothing twice


async def test_removed_key_stops_being_heard_on_an_open_connection(nodes: list[Node]) -> None:
    a, b, c = nodes
    a.link.set_peers({b.keys.public: b.link.endpoint, c.keys.public: c.link.endpoint})
    b.link.set_peers({a.keys.public: a.link.endpoint})
    c.link.set_peers({a.keys.public: a.link.endpoint})
    b.link.send(a.keys.public, {"t": "before"})
    assert (await a.next()).header["t"] == "before"
    a.link.set_peers({c.keys.public: c.link.endpoint})  # revoke b mid-run
    dropped = a.link.dropped
    b.link.send(a.keys.public, {"t": "after"})  # same TCP connection, already authenticated
    c.link.send(a.keys.public, {"t": "still-here"})
    assert (await a.next()).header["t"] == "still-here"
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
    assert (await a.next()).header["i"] == 3
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
    inc = msgpack.packb({"t": "x", "_i": 7})
    garbage = [
        [b"\xc1\xff not msgpack"],
        [msgpack.packb([1, 2, 3])],
        [msgpack.packb({"t": "x"})],  # no incarnation
        [msgpack.packb({1: "int key", "_i": 7})],
        [inc, b"payload", b"one frame too many"],
        [msgpack.packb({"t": "x", "_i": 7, "_g": "not an int"}), b"p"],
        [b"\x00" * (HEADER_LIMIT + 100), b"x"],  # bigger than the header limit, within MAXMSGSIZE
    ]
    for frames in garbage:
        raw.send_multipart(frames)
    await asyncio.sleep(0.3)
    assert a.link.dropped == len(garbage)
    raw.send_multipart([msgpack.packb({"t": "ok-from-raw", "_i": 7})])
    c.link.send(a.keys.public, {"t": "ok-from-link"})
    got = {(await a.next()).header["t"] for _ in range(2)}
    assert got == {"ok-from-raw", "ok-from-link"}
    raw.close(linger=0)


async def test_oversized_frame_is_cut_off_by_maxmsgsize(nodes: list[Node]) -> None:
    a, b, c = nodes
    a.link.set_peers({b.keys.public: b.link.endpoint, c.keys.public: c.link.endpoint})
    c.link.set_peers({a.keys.public: a.link.endpoint})
    raw: zmq.Socket[bytes] = zmq.Context.shadow(b.ctx.underlying).socket(zmq.DEALER)
    make_client(raw, b.keys, a.keys.public, 1 << 24)
    raw.connect(a.link.endpoint)
    raw.send_multipart([msgpack.packb({"t": "huge", "_i": 1}), bytes(a.link.max_bytes + 1)])
    c.link.send(a.keys.public, {"t": "fine"})
    assert (await a.next()).header["t"] == "fine"
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
    assert (await a.next()).header["i"] == 2


def test_tensor_chunks_reassemble_exactly() -> None:
    tensors = [torch.randn(3, 1000), torch.arange(7, dtype=torch.int64), torch.zeros(0), torch.tensor(2.5)]
    chunks = list(iter_chunks(tensors, CHUNK, step=1, rank=0))
    assert len([h for h, _ in chunks if h.tensor == 0]) == len(chunk_spans(12000, CHUNK)) == 3
    asm = TensorAssembler([t.dtype for t in tensors], [t.shape for t in tensors], CHUNK)
    for head, payload in reversed(chunks):  # any order
        asm.add(ChunkHeader.from_wire(head.to_wire()), bytes(payload))
    assert asm.complete
    assert all(torch.equal(x, y) for x, y in zip(asm.tensors, tensors, strict=True))


def test_assembler_refuses_chunks_that_do_not_fit() -> None:
    asm = TensorAssembler([torch.float32], [(3000,)], CHUNK)
    good = ChunkHeader(0, 0, 0, 1, CHUNK, "float32", (3000,), CHUNK)
    bad = [
        (ChunkHeader(0, 0, 1, 0, 0, "float32", (3000,), CHUNK), CHUNK),  # no tensor 1
        (ChunkHeader(0, 0, 0, 0, 0, "float16", (3000,), CHUNK), CHUNK),  # wrong dtype
        (ChunkHeader(0, 0, 0, 0, 0, "float32", (3001,), CHUNK), CHUNK),  # wrong shape
        (ChunkHeader(0, 0, 0, 0, 8, "float32", (3000,), CHUNK), CHUNK),  # off the grid
        (ChunkHeader(0, 0, 0, 5, 5 * CHUNK, "float32", (3000,), CHUNK), CHUNK),  # past the end
        (ChunkHeader(0, 0, 0, 0, 0, "float32", (3000,), CHUNK), CHUNK - 4),  # payload too short
    ]
    for head, size in bad:
        with pytest.raises(ProtocolError):
            asm.add(head, bytes(size))
    asm.add(good, bytes(good.nbytes))
    with pytest.raises(ProtocolError, match="twice"):
        asm.add(good, bytes(good.nbytes))
    assert not asm.complete
    for doc in (
        {"step": -1},
        {
            "step": 0,
            "rank": 0,
            "tensor": 0,
            "chunk": 0,
            "offset": 0,
            "nbytes": 0,
            "dtype": "complex64",
            "shape": [1],
        },
    ):
        with pytest.raises(ProtocolError):
            ChunkHeader.from_wire(doc)


# -- the agreement protocol, driven message by message ---------------------------------------------


class Net:
    """In-memory delivery between StepAgreements, with a clock, dead ranks and droppable messages.

    A rank hears a peer when a message or heartbeat of it arrives; a ``cut`` link loses everything and
    a ``paused`` rank (a blocked event loop) neither ticks nor beats, its inbox waiting for ``resume``.
    The data of a ballot completes once every member of its view has started it, while ``data_ok``.
    A finished rank answers as PeerGroup does: a commit if it applied the decision, else "leave".
    """

    def __init__(self, world: int, *, data_ok: bool = True) -> None:
        self.now = 0.0
        self.dead: set[int] = set()
        self.paused: set[int] = set()
        self.cut: set[tuple[int, int]] = set()
        self.data_ok = data_ok
        self.queue: list[tuple[int, int, dict[str, Any]]] = []
        self.held: list[tuple[int, int, dict[str, Any]]] = []
        self.heard: dict[tuple[int, int], float] = {}
        self.starts: dict[tuple[int, int], set[int]] = {}
        self.ranks = {r: self._agreement(r, world) for r in range(world)}

    def _agreement(self, me: int, world: int) -> StepAgreement:
        def send(dest: int, header: dict[str, Any]) -> None:
            self.queue.append((me, dest, header))

        def start_data(ballot: tuple[int, int], view: tuple[int, ...]) -> None:
            started = self.starts.setdefault(ballot, set())
            started.add(me)
            if self.data_ok and set(view) <= started:
                for rank in view:
                    if self.ranks[rank].started == ballot and rank not in self.dead:
                        self.ranks[rank].data_complete(ballot)

        def silent_for(peer: int) -> float:  # never heard (ourselves included): silent since 0
            return self.now - self.heard.get((me, peer), 0.0)

        hooks = Hooks(send, silent_for, start_data, set, lambda: self.now)
        return StepAgreement(5, me, range(world), range(world), hooks, timeout=1.0, join_timeout=4.0)

    def deliver(self, drop: Callable[[int, int, dict[str, Any]], bool] = lambda s, d, h: False) -> None:
        while self.queue:
            sender, dest, header = self.queue.pop(0)
            if {sender, dest} & self.dead or (sender, dest) in self.cut or drop(sender, dest, header):
                continue
            if dest in self.paused:
                self.held.append((sender, dest, header))
                continue
            self.heard[(dest, sender)] = self.now
            target = self.ranks[dest]
            if target.finished:  # what PeerGroup answers for a step it is done with
                if target.included:
                    assert target.decision is not None
                    reply = answer_after(target.decision, 5, sender, header)
                else:
                    reply = answer_left(5, header)
                if reply is not None:
                    self.queue.append((dest, sender, reply))
            else:
                target.handle(sender, header)

    def resume(self, rank: int) -> None:
        """Unblock a paused rank: it first works through what arrived meanwhile, like an event loop."""
        self.paused.discard(rank)
        self.queue[:0] = [m for m in self.held if m[1] == rank]
        self.held = [m for m in self.held if m[1] != rank]
        self.deliver()

    def advance(
        self, seconds: float, drop: Callable[[int, int, dict[str, Any]], bool] = lambda s, d, h: False
    ) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += 0.05
            live = [r for r in self.ranks if r not in self.dead | self.paused]
            for rank in live:  # heartbeats
                for peer in self.ranks:
                    if peer != rank and (rank, peer) not in self.cut and peer not in self.paused:
                        self.heard[(peer, rank)] = self.now
            for rank in live:
                self.ranks[rank].tick()
            self.deliver(drop)


def test_agreement_happy_path_decides_the_same_view_everywhere() -> None:
    net = Net(3)
    for agreement in net.ranks.values():
        agreement.begin()
    net.deliver()
    decisions = {a.decision for a in net.ranks.values()}
    assert decisions == {Decision((1, 0), (1, 0), (0, 1, 2))}
    assert all(a.included for a in net.ranks.values())


def test_a_commit_that_reached_one_member_before_the_coordinator_died_reaches_the_rest() -> None:
    net = Net(4)
    for agreement in net.ranks.values():
        agreement.begin()
    # Everything flows until rank 0 commits; its commit reaches rank 3 only, and rank 0 dies.
    # Rank 3's forwards are lost too, so ranks 1 and 2 must find out from rank 3 through the protocol.
    net.deliver(drop=lambda s, d, h: h["t"] == "commit" and ((s == 0 and d != 3) or s == 3))
    net.dead.add(0)
    decided = net.ranks[3].decision
    assert decided is not None and decided.ranks == (0, 1, 2, 3)
    assert net.ranks[1].decision is None and net.ranks[2].decision is None
    net.advance(3.0)
    # Rank 1 took over, learned from rank 3's promise that the step was decided, and re-issued it.
    for rank in (1, 2):
        decision = net.ranks[rank].decision
        assert decision is not None and (decision.ballot, decision.ranks) == (decided.ballot, decided.ranks)
        assert decision.auth == (2, 1)  # re-issued by the new coordinator, not the old commit
        assert net.ranks[rank].included


def test_a_member_that_promised_a_newer_ballot_ignores_an_older_commit() -> None:
    net = Net(3)
    agreement = net.ranks[2]
    agreement.begin()
    agreement.handle(1, {"t": "prepare", "step": 5, "ballot": [3, 1], "view": [1, 2]})
    stale = Decision((1, 0), (1, 0), (0, 1, 2))
    agreement.handle(0, {"t": "commit", "step": 5, "decision": stale.to_wire()})
    assert agreement.decision is None
    with pytest.raises(ProtocolError):
        agreement.handle(
            0, {"t": "prepare", "step": 5, "ballot": [4, 1], "view": [0, 2]}
        )  # not rank 0's ballot


def test_a_silent_member_is_suspected_and_the_coordinator_proposes_without_it() -> None:
    net = Net(3, data_ok=False)
    for agreement in net.ranks.values():
        agreement.begin()
    net.deliver()
    net.dead.add(2)
    net.data_ok = True  # without rank 2 the data of a new ballot completes
    net.advance(2.0)
    for rank in (0, 1):
        decision = net.ranks[rank].decision
        assert decision is not None and decision.ranks == (0, 1) and decision.ballot == (2, 0)


def decided(net: Net) -> set[tuple[tuple[int, int], tuple[int, ...]]]:
    """The (data ballot, ranks) of every rank's decision; one element when they all agree."""
    return {(a.decision.ballot, a.decision.ranks) for a in net.ranks.values() if a.decision is not None}


def test_a_coordinator_still_missing_its_own_data_repeats_start_to_a_member_that_lost_it() -> None:
    net = Net(3)
    for agreement in net.ranks.values():
        agreement.begin()

    def lost(sender: int, dest: int, header: dict[str, Any]) -> bool:
        return header["t"] == "start" and dest == 2 and net.now < 1.5  # e.g. a connection re-opened

    net.deliver(drop=lost)
    # Rank 0 waits for rank 2's data, rank 2 for the start; both alive. Past the timeout, but well
    # before rank 2 would give up on its coordinator (5 s), a repeated start must have gone through.
    net.advance(2.0, drop=lost)
    assert decided(net) == {((1, 0), (0, 1, 2))}
    assert all(a.included for a in net.ranks.values())


def test_a_coordinator_whose_member_moved_to_a_newer_ballot_is_told_so_and_learns_the_outcome() -> None:
    net = Net(3, data_ok=False)  # rank 0 is slow: no exchange completes until it is gone
    net.cut.add((0, 1))  # rank 1 never hears rank 0 (its connection is still being re-opened)
    net.paused.add(0)  # rank 0 reaches the all-reduce a little later
    net.ranks[1].begin()
    net.ranks[2].begin()
    net.deliver(drop=lambda s, d, h: (s, d) == (1, 2) and h["t"] == "ready")  # rank 2 never hears it
    net.advance(0.3)
    net.resume(0)
    net.ranks[0].begin()
    net.advance(1.2)
    # Rank 1 gave up on rank 0 and runs ballot [2, 1] with rank 2, but rank 0's [2, 0] took rank 2
    # over: rank 2 is alive and will never report done for [2, 1].
    one, two = net.ranks[1], net.ranks[2]
    assert two.promised == (2, 0) and two.coordinator == 0
    assert one.proposal is None and one.coordinator == 0  # a nack told rank 1: it stopped waiting
    net.dead.add(0)  # rank 0 dies mid-exchange; rank 2 goes on alone, never having had rank 1's ready
    net.data_ok = True
    net.advance(2.0)
    assert two.decision is not None and two.decision.ranks == (2,)
    assert one.finished and not one.included  # rank 1 asked rank 2 how the step ended


def test_data_reported_done_before_a_newer_promise_is_decided_again_so_no_rank_diverges() -> None:
    net = Net(3)
    for agreement in net.ranks.values():
        agreement.begin()

    def stall_zero(sender: int, dest: int, header: dict[str, Any]) -> bool:
        if header["t"] == "start" and dest == 2:
            net.paused.add(0)  # rank 0's loop blocks once it holds the result of ballot [1, 0]
        return False

    net.deliver(drop=stall_zero)
    # Every rank holds the result; the members' "done" wait in rank 0's inbox.
    assert all(a.completed == {(1, 0)} for a in net.ranks.values()) and not decided(net)
    net.advance(1.5)  # the survivors give up on rank 0 and rank 1 takes over
    net.resume(0)  # rank 0 wakes up to every member's done for ballot [1, 0], and decides it
    net.advance(0.5)
    assert decided(net) == {((1, 0), (0, 1, 2))}  # the survivors decided the same average
    assert net.ranks[1].decision is not None and net.ranks[1].decision.auth == (2, 1)
