"""Ranks of a training group as a train process runs them, over real CURVE peer links on loopback.

Every :class:`Rank` has its own event loop thread, ZeroMQ context, authenticator and
:class:`~services.train.collective.group.PeerGroup`: the loop thread owns the sockets, and the caller (a
test, or a DiLoCo worker thread) waits on it. Faults are real: a stalled rank is a rank whose loop is
blocked, so it sends nothing — no data, no heartbeats, no acks — while its TCP connections stay open. A
stall lasts until the test says :meth:`Rank.resume` (after the others did what it checks), never a fixed
number of seconds: on a loaded machine the others may need longer than any guess.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
import torch
import zmq.asyncio

from bus.auth import Authenticator
from bus.peers import DOMAIN, PeerMessage
from node.identity import KeyPair
from services.train.collective.group import Member, PeerGroup
from services.train.collective.tensors import spec_of
from services.train.peers import open_group

STALL_LIMIT_S = 40  # a stall never outlives its test
CHUNK = 4096


class Rank:
    """One rank: an event loop thread with its own ZeroMQ context, authenticator and peer group."""

    def __init__(self, rank: int, world: int, keys: KeyPair, **options: Any) -> None:
        self.rank = rank
        self.keys = keys
        self._resumed = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"rank-{rank}", daemon=True)
        self.thread.start()

        async def build() -> PeerGroup:
            self.ctx = zmq.asyncio.Context()
            self.auth = Authenticator(self.ctx).start()
            return open_group(
                self.ctx,
                self.auth,
                keys,
                "tcp://127.0.0.1:0",
                rank=rank,
                world_size=world,
                chunk_bytes=CHUNK,
                **options,
            )

        self.group: PeerGroup = self.call(build)

    def submit(self, make: Callable[[], Coroutine[Any, Any, Any]]) -> concurrent.futures.Future[Any]:
        async def run() -> Any:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self.loop)

    def call(self, make: Callable[[], Coroutine[Any, Any, Any]], timeout: float = 30) -> Any:
        return self.submit(make).result(timeout)

    def do(self, fn: Callable[[], Any]) -> Any:
        """Run a plain function on this rank's loop thread (where its sockets live)."""

        async def run() -> Any:
            return fn()

        return self.call(lambda: run())

    def reduce(self, step: int, tensors: list[torch.Tensor]) -> concurrent.futures.Future[Any]:
        return self.submit(lambda: self.group.all_reduce(step, tensors))

    def stall(self) -> None:
        """Block this rank's loop until :meth:`resume`: from the outside it goes silent, its sockets
        stay connected."""
        self._resumed.clear()
        self.loop.call_soon_threadsafe(self._mute)

    def resume(self) -> None:
        self._resumed.set()

    def _mute(self) -> None:
        assert self._resumed.wait(STALL_LIMIT_S), "a stalled rank was never resumed"

    def stall_after_chunks(self, count: int) -> None:
        """Go silent in the middle of an exchange, once ``count`` data chunks have arrived."""
        seen = [0]

        def chunk(msg: PeerMessage) -> bool:
            is_chunk = kind(msg) == "chunk"
            seen[0] += is_chunk
            return seen[0] == count and is_chunk

        self.stall_after(chunk)

    def stall_after(
        self, matches: Callable[[PeerMessage], bool], then: Callable[[], Any] = lambda: None
    ) -> None:
        """Go silent until :meth:`resume` right after handling the first message that ``matches``.

        ``then`` runs as the stall begins, so a test can make something happen while this rank is mute.
        """
        link = self.group.link
        inner = link._handler
        fired = [False]
        self._resumed.clear()

        def handler(msg: PeerMessage) -> None:
            inner(msg)
            if not fired[0] and matches(msg):
                fired[0] = True
                then()
                self._mute()

        link._handler = handler

    def deaf_to(self, other: Rank) -> None:
        """Stop hearing ``other`` (its key is revoked here, as if its registration had not arrived yet)."""
        self.auth.set_allowed(DOMAIN, self.auth.allowed(DOMAIN) - {other.keys.public})

    def hear(self, other: Rank) -> None:
        self.auth.set_allowed(DOMAIN, self.auth.allowed(DOMAIN) | {other.keys.public})

    def close(self) -> None:
        self.resume()

        async def shut() -> None:
            # Whatever still runs (an all-reduce a test left waiting) ends here, not with the loop.
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            await self.group.aclose()
            self.auth.stop()
            self.ctx.destroy(linger=0)

        self.call(shut)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def make_ranks(world: int, **options: Any) -> list[Rank]:
    keys = [KeyPair.generate() for _ in range(world)]
    ranks = [Rank(r, world, keys[r], **options) for r in range(world)]
    members = [Member(keys[r].public, ranks[r].group.endpoint, r) for r in range(world)]
    for rank in ranks:

        async def setup(rank: Rank = rank) -> None:
            rank.group.set_members(members)
            rank.group.start()

        rank.call(setup)
    return ranks


def kind(msg: PeerMessage) -> str:
    """The type tag of a received message."""
    return str(msgspec.msgpack.decode(msg.body)["t"])


def bits(tensors: list[torch.Tensor]) -> list[bytes]:
    """The exact float32 bits of ``tensors``: equal lists mean bit-identical values."""
    return [t.contiguous().view(torch.int32).numpy().tobytes() for t in tensors]


def serve(rank: Rank, outer_step: int, tensors: list[torch.Tensor]) -> None:
    """Publish ``tensors`` (named t0, t1, ...) as ``rank``'s state."""
    names = [f"t{i}" for i in range(len(tensors))]
    rank.do(lambda: rank.group.serve_state(outer_step, 0, names, tensors))


def layout(tensors: list[torch.Tensor]) -> list[list[Any]]:
    """The one layout a fetcher of ``tensors`` (as :func:`serve` names them) accepts."""
    return [[spec_of(f"t{i}", t) for i, t in enumerate(tensors)]]


def connect(ranks: list[Rank], members: list[Member]) -> None:
    """Register ``members`` with every rank (each skips its own entry) and start them."""
    for rank in ranks:

        async def setup(rank: Rank = rank) -> None:
            rank.group.set_members(members)
            rank.group.start()

        rank.call(setup)


#: What a rank sends, rewritten by :func:`rewrite_sends`: (message, payload) -> (message, payload).
Rewrite = Callable[[Any, Any], tuple[Any, Any]]


def rewrite_sends(rank: Rank, rewrite: Rewrite) -> None:
    """Make ``rank`` a liar: every message it sends (credited or not) goes out as ``rewrite`` makes it.

    The rank otherwise runs the real protocol over its real CURVE links; only what leaves it changes.
    """
    link = rank.group.link
    send, send_credited = link.send, link.send_credited

    def lying_send(key: str, message: Any, payload: Any = None) -> bool:
        return send(key, *rewrite(message, payload))

    async def lying_send_credited(
        key: str, message: Any, payload: Any = None, *, timeout: Any = None
    ) -> None:
        await send_credited(key, *rewrite(message, payload), timeout=timeout)

    link.send = lying_send  # type: ignore[method-assign]
    link.send_credited = lying_send_credited  # type: ignore[method-assign]


#: float32 NaN, little-endian: the first value of a float32 chunk, or the first scale of an int8 one.
NAN32 = b"\x00\x00\xc0\x7f"


def poisoned(payload: Any) -> bytes:
    """``payload`` with its first four bytes made a float32 NaN."""
    return NAN32 + bytes(payload)[4:]


def dropped_keys(rank: Rank) -> dict[str, str]:
    """The peers ``rank`` dropped for breaking the protocol: key -> reason."""
    return {str(d["public_key"]): str(d["reason"]) for d in rank.do(rank.group.dropped)}
