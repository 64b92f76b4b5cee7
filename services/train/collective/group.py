"""A rank's membership in a training group: all-reduce per outer step, and state transfer for rejoins.

:class:`PeerGroup` ties the pieces together on one asyncio loop: the :class:`~bus.peers.PeerLink`
(authenticated transport), a :class:`~.agreement.StepAgreement` per step (who takes part), an
:class:`~.exchange.Exchange` per attempt (moving and reducing the data), plus heartbeats so that a
peer busy with its inner steps is told apart from a dead one. Ranks come from the registry, or, for a
registered key without one, from the rank the peer states in every message (first claim wins).

State transfer (:mod:`.state`) is a second use of the same link: :meth:`PeerGroup.serve_state`
publishes a snapshot and :meth:`PeerGroup.fetch_state` pulls one from a peer. A rank left out of a
step gets :class:`Excluded` and resynchronises that way. A rank done with a step still answers late
questions about it (with the decision, or that it left): its peers see it heartbeat, so silence would
leave them waiting on it for good.

Each rank also keeps a *lineage*, a digest of every decision its state went through. It rides on the
``ready`` message, the coordinator averages only ranks of its own lineage, and a fetched snapshot
carries the lineage of the rank that served it. So state that diverged (a rank that went on alone
while partitioned, a restart from an old checkpoint) is never silently mixed into the average.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import zmq.asyncio
from torch import Tensor

from bus.auth import Authenticator
from bus.peers import PeerLink, PeerMessage
from node.errors import Conflict, InvalidRequest, MLNodeError, ProtocolError, Unavailable
from node.identity import KeyPair
from node.logging import get_logger
from services.train.collective.agreement import (
    MESSAGE_TYPES,
    Ballot,
    Decision,
    Hooks,
    StepAgreement,
    answer_after,
    answer_behind,
    answer_left,
    ballot_key,
    parse_ballot,
)
from services.train.collective.buffers import Buffers
from services.train.collective.exchange import Exchange, ReduceFn
from services.train.collective.state import KINDS as STATE_KINDS
from services.train.collective.state import StateTransfer, non_negative
from services.train.collective.tensors import DEFAULT_CHUNK_BYTES, check_chunk_bytes
from services.train.compression import Codec, flatten, unflatten

log = get_logger(__name__)

_MAX_BUFFERED = 4096
_KEEP_DECISIONS = 16
GENESIS = "genesis"
#: Key the group adds to a served state header (and removes on fetch): the lineage of that state.
LINEAGE_KEY = "_lineage"


class LoopClock:
    """Seconds during which this rank's event loop could listen: wall time minus the stretches it was
    starved (a loaded machine, a blocked loop, a long synchronous step).

    Silence is what condemns a peer, and only time we spent listening proves silence. On wall time, a
    loop that got no CPU for a second would, on waking, tick before it drained the heartbeats waiting
    in its socket and drop healthy peers. This clock lets at most ``cap`` seconds pass between two
    beats of :meth:`run`, so a starved rank's timeouts stretch by as long as it was starved.
    """

    def __init__(self, interval: float = 0.02, cap: float = 0.1) -> None:
        self.interval, self.cap = interval, cap
        self._wall = time.monotonic()
        self._value = self._wall

    def __call__(self) -> float:
        return self._value + min(time.monotonic() - self._wall, self.cap)

    def beat(self) -> None:
        now = time.monotonic()
        self._value += min(now - self._wall, self.cap)
        self._wall = now

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.beat()


class Excluded(Conflict):
    """This rank was left out of an outer step; load a peer's state (fetch_state) before going on."""


@dataclass(frozen=True)
class Member:
    """A peer as the group needs it: key, where it listens, and its rank if the registry knows it."""

    public_key: str
    endpoint: str
    rank: int | None = None


@dataclass(frozen=True)
class Reduced:
    """The average of the decided ranks' tensors, shaped like the input.

    ``tensors`` are views of the group's reused buffers: valid until its next :meth:`PeerGroup.all_reduce`.
    """

    step: int
    tensors: list[Tensor]
    ranks: tuple[int, ...]


class _Round:
    """One step in progress: its agreement, the exchange of each ballot tried, chunks that came early."""

    def __init__(self, group: PeerGroup, step: int, flat: Tensor, peers: set[int], expected: set[int]):
        self.group = group
        self.step = step
        self.flat = flat
        self.began = group.clock()
        self.event = asyncio.Event()
        self.error: MLNodeError | None = None
        self.exchanges: dict[Ballot, Exchange] = {}
        self.current: Exchange | None = None
        self.data_heard = -math.inf
        self.early: list[tuple[int, PeerMessage]] = []
        hooks = Hooks(
            send=group._send_rank,
            silent_for=self.silent_for,
            start_data=self.start_data,
            waiting_on=lambda: self.current.waiting_on() if self.current else set(),
            data_heard=lambda: self.data_heard,
            clock=group.clock,
        )
        self.agreement = StepAgreement(
            step,
            group.rank,
            peers,
            expected,
            hooks,
            timeout=group.timeout,
            join_timeout=group.join_timeout,
            lineage=group.lineage,
            quorum=group.quorum,
        )

    @property
    def finished(self) -> bool:
        return self.error is not None or self.agreement.finished

    def silent_for(self, rank: int) -> float:
        if rank == self.group.rank:
            return 0.0
        key = self.group._key_by_rank.get(rank)
        if key is None:
            return math.inf
        heard = self.group._heard.get(key)
        return self.group.clock() - max(heard if heard is not None else -math.inf, self.began)

    def start_data(self, ballot: Ballot, view: tuple[int, ...]) -> None:
        if self.current is not None:
            self.current.cancel()
        group = self.group
        exchange = Exchange(
            step=self.step,
            ballot=ballot,
            view=view,
            me=group.rank,
            flat=self.flat,
            chunk_bytes=group.chunk_bytes,
            topology=group.topology,
            reduce_fn=group.reduce_fn,
            send=group._send_credited,
            ack=group.link.ack,
            on_complete=lambda: self.completed(ballot),
            codec=group.codec,
            result=group.buffers.take(self.flat.numel()),
        )
        self.exchanges[ballot] = exchange
        self.current = exchange
        exchange.start()
        early, self.early = self.early, []
        for rank, msg in early:
            self.take_chunk(rank, msg)

    def completed(self, ballot: Ballot) -> None:
        self.agreement.data_complete(ballot)
        self.wake()

    def take_chunk(self, rank: int, msg: PeerMessage) -> None:
        ballot = parse_ballot(msg.header.get("ballot"))
        current = self.current
        if current is not None and current.ballot == ballot:
            self.data_heard = self.group.clock()
            try:
                current.handle(rank, msg.header, msg.payload, msg)
            except ProtocolError as exc:
                log.warning("allreduce_bad_chunk", step=self.step, peer=rank, error=exc.message)
                self.agreement.suspect({rank})
        elif self._may_start(ballot) and len(self.early) < _MAX_BUFFERED:
            # Its start message is still on its way (the sender heard it first, maybe from another
            # rank): keep the chunk, unacknowledged, instead of losing it for good.
            self.early.append((rank, msg))
        else:
            self.group.link.ack(msg)

    def _may_start(self, ballot: Ballot) -> bool:
        promised = self.agreement.promised
        return ballot not in self.exchanges and (
            promised is None or ballot_key(ballot) >= ballot_key(promised)
        )

    def handle(self, rank: int, msg: PeerMessage) -> None:
        kind = msg.header.get("t")
        if kind == "chunk":
            self.take_chunk(rank, msg)
        else:
            ours = self.group.payload_facts(self.flat)
            if kind == "ready" and _facts(msg.header) != ours:
                # Different models or formats: a configuration error on both sides, so both fail loudly.
                self.group._send_rank(rank, {"t": "refuse", "step": self.step, **ours})
                self.error = _mismatch(rank, self.step, msg.header, ours)
            else:
                self.agreement.handle(rank, msg.header)
        self.wake()

    def wake(self) -> None:
        if self.finished:
            self.event.set()

    def close(self) -> None:
        for exchange in self.exchanges.values():
            exchange.cancel()
        for _rank, msg in self.early:
            self.group.link.ack(msg)
        self.early.clear()


class PeerGroup:
    """This rank's side of a training group; create, :meth:`set_members`, :meth:`start`, then reduce."""

    def __init__(
        self,
        context: zmq.asyncio.Context,
        auth: Authenticator,
        identity: KeyPair,
        bind: str,
        *,
        rank: int,
        world_size: int,
        reduce_fn: ReduceFn,
        timeout: float = 30.0,
        join_timeout: float | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        window: int = 8,
        topology: str = "scatter_gather",
        compression: str = "none",
    ) -> None:
        if not 0 <= rank < world_size:
            raise InvalidRequest(f"rank must be in [0, {world_size}), got {rank}")
        if timeout <= 0:
            raise InvalidRequest(f"timeout must be positive, got {timeout}")
        self.rank = rank
        self.world_size = world_size
        #: A majority of the registered world: the fewest ranks that may decide an outer step.
        self.quorum = world_size // 2 + 1
        self.reduce_fn = reduce_fn
        self.timeout = timeout
        self.join_timeout = join_timeout if join_timeout is not None else 4 * timeout
        self.topology = topology
        #: How pseudo-gradients travel (``train_config.diloco.compression``); every rank must agree.
        self.codec = Codec(compression)
        self.identity = identity
        #: Digest of every decision this rank's state went through; only equal lineages are averaged.
        self.lineage = GENESIS
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        self.link = PeerLink(
            context, auth, identity, bind, self._on_message, max_payload=self.chunk_bytes, window=window
        )
        self._registered: dict[str, int | None] = {}
        self._rank_by_key: dict[str, int] = {}
        self._key_by_rank: dict[int, str] = {}
        self._round: _Round | None = None
        #: The staging copy of each step's payload and its results, reused step after step.
        self.buffers = Buffers()
        self._future: dict[int, list[tuple[int, PeerMessage]]] = {}
        self._decided: dict[int, Decision] = {}
        #: Steps this rank is out of: late questions about them are answered "leave", or "refuse" with
        #: our payload facts (the value) when the step failed because the models or formats differ.
        self._left: dict[int, dict[str, Any] | None] = {}
        self._last_ranks: set[int] | None = None
        self._rejoiners: dict[int, set[int]] = {}
        self._diverged: int | None = None
        self.state = StateTransfer(self.link, rank, self.chunk_bytes, timeout, self._key_of)
        #: The agreement's time: only the time this rank could listen counts towards a peer's silence.
        self.clock = LoopClock(interval=min(0.02, timeout / 20), cap=min(0.1, timeout / 5))
        #: When (on :attr:`clock`) each peer key was last heard.
        self._heard: dict[str, float] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._clock_task: asyncio.Task[None] | None = None

    @property
    def endpoint(self) -> str:
        return self.link.endpoint

    # -- membership ---------------------------------------------------------------------------
    def set_members(self, members: Iterable[Member]) -> None:
        """Exactly these peers may talk to this rank from now on (this node's own entry is skipped)."""
        registered: dict[str, int | None] = {}
        endpoints: dict[str, str] = {}
        for member in members:
            if member.public_key == self.identity.public:
                if member.rank is not None and member.rank != self.rank:
                    raise InvalidRequest(
                        f"this node is registered as rank {member.rank} but runs rank {self.rank}"
                    )
                continue
            if member.rank is not None and not 0 <= member.rank < self.world_size:
                raise InvalidRequest(f"peer rank {member.rank} is outside [0, {self.world_size})")
            registered[member.public_key] = member.rank
            endpoints[member.public_key] = member.endpoint
        self._registered = registered
        self._rank_by_key = {k: r for k, r in self._rank_by_key.items() if k in registered}
        self._rank_by_key.update({k: r for k, r in registered.items() if r is not None})
        self._key_by_rank = {r: k for k, r in self._rank_by_key.items()}
        self.link.set_peers(endpoints)
        for key in endpoints:
            self.link.send(key, {"t": "hb", "r": self.rank})

    def _key_of(self, rank: int) -> str | None:
        return self._key_by_rank.get(rank)

    def ranks(self) -> dict[int, str]:
        """Known peer ranks and their keys."""
        return dict(self._key_by_rank)

    def start(self) -> None:
        """Start receiving and heartbeating; call from the loop that will run the all-reduces."""
        self.link.start()
        loop = asyncio.get_running_loop()
        if self._clock_task is None:
            self.clock.beat()  # the time before start did not count: nobody was listening
            self._clock_task = loop.create_task(self.clock.run())
        if self._heartbeat is None:
            self._heartbeat = loop.create_task(self._beat())

    async def _beat(self) -> None:
        interval = max(self.timeout / 4, 0.01)
        while True:
            for key in self.link.peer_keys():
                self.link.send(key, {"t": "hb", "r": self.rank})
            await asyncio.sleep(interval)

    # -- all-reduce ---------------------------------------------------------------------------
    async def all_reduce(self, step: int, tensors: Sequence[Tensor]) -> Reduced:
        """Average ``tensors`` over the live ranks of ``step``, summed in rank order, same bits everywhere."""
        if self._round is not None:
            raise Conflict(f"an all-reduce (step {self._round.step}) is already running")
        if step in self._decided:
            raise InvalidRequest(f"step {step} was already reduced")
        if self._diverged is not None:
            diverged, self._diverged = self._diverged, None
            raise Excluded(f"peers decided step {diverged} differently; resynchronise before step {step}")
        shapes = [tuple(t.shape) for t in tensors]
        self.buffers.recycle()  # the previous step's result is given up (see Reduced)
        flat = flatten(tensors, self.buffers.take(sum(t.numel() for t in tensors)))
        self.codec.check(flat)  # NaN/inf is refused here, before any peer counts on this rank
        peers = set(self._key_by_rank) - {self.rank}
        expected = (self._last_ranks if self._last_ranks is not None else set(range(self.world_size))) | (
            self._rejoiners.pop(step, set())
        )
        rnd = _Round(self, step, flat, peers, expected - {self.rank})
        self._round = rnd
        self._left.pop(step, None)
        normal = False
        try:
            rnd.agreement.begin(self.payload_facts(flat))
            for old in [s for s in self._future if s <= step]:
                for rank, msg in self._future.pop(old):
                    if old == step:
                        rnd.handle(rank, msg)
                    else:
                        self.link.ack(msg)
            tick = min(max(self.timeout / 8, 0.01), 0.25)
            while not rnd.finished:
                rnd.event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(rnd.event.wait(), tick)
                rnd.agreement.tick()
            normal = True
            if rnd.error is not None:
                # The models differ: the peer must fail as well, even if our one "refuse" got lost.
                self._remember_left(step, refused=self.payload_facts(flat))
                raise rnd.error
            decision = rnd.agreement.decision
            if decision is None or not rnd.agreement.included:
                self._last_ranks = None
                self._remember_left(step)
                raise Excluded(
                    rnd.agreement.excluded_reason or f"rank {self.rank} was left out of step {step}"
                )
            self._remember(step, decision)
            self._last_ranks = set(decision.ranks)
            self.lineage = next_lineage(self.lineage, step, decision)
            result = rnd.exchanges[decision.ballot].result
            return Reduced(step, unflatten(result, shapes), decision.ranks)
        finally:
            rnd.close()
            self._round = None
            if not normal:
                self._remember_left(step)
                for key in self.link.peer_keys():
                    self.link.send(key, {"t": "leave", "step": step, "r": self.rank})

    def payload_facts(self, flat: Tensor) -> dict[str, Any]:
        """What must match between ranks for their payloads to be reduced together."""
        return {"n": flat.numel(), "c": self.codec.name}

    @property
    def waiting_for_quorum(self) -> bool:
        """True while the running step cannot be decided: too few ranks reachable (a partition)."""
        rnd = self._round
        return rnd is not None and not rnd.finished and rnd.agreement.waiting_for_quorum

    def rejoining(self, step: int) -> set[int]:
        """Ranks that announced they will take part again at ``step``."""
        return set(self._rejoiners.get(step, ()))

    def _remember(self, step: int, decision: Decision) -> None:
        self._decided[step] = decision
        for old in sorted(self._decided)[:-_KEEP_DECISIONS]:
            del self._decided[old]

    def _remember_left(self, step: int, *, refused: dict[str, Any] | None = None) -> None:
        # A peer may still count on this rank for the step (in its view, or as its coordinator), and
        # our heartbeats tell it we are alive: only an answer tells it to go on without us.
        self._left[step] = refused
        for old in sorted(self._left)[:-_KEEP_DECISIONS]:
            del self._left[old]

    async def rejoin(self, step: int) -> None:
        """Tell every peer this rank will take part again from ``step`` (after loading their state)."""
        self._last_ranks = None
        notice = {"t": "rejoin", "step": step, "r": self.rank}
        results = await asyncio.gather(
            *(self.link.send_credited(key, notice, timeout=self.timeout) for key in self.link.peer_keys()),
            return_exceptions=True,
        )
        for error in results:
            if isinstance(error, MLNodeError):
                log.warning("rejoin_notice_failed", step=step, error=error.message)

    # -- state transfer -----------------------------------------------------------------------
    def serve_state(self, header: Mapping[str, Any], tensors: Sequence[Tensor]) -> None:
        """Publish the snapshot peers get from :meth:`fetch_state`, stamped with this rank's lineage."""
        self.state.publish({**header, LINEAGE_KEY: self.lineage}, tensors)

    async def fetch_state(
        self, *, rank: int | None = None, timeout: float | None = None
    ) -> tuple[dict[str, Any], list[Tensor]]:
        """A peer's published snapshot: tries ``rank``, or every known peer in rank order.

        This rank then holds (and must load) the peer's state, so it takes on the peer's lineage.
        """
        limit = timeout if timeout is not None else self.timeout
        candidates = [rank] if rank is not None else sorted(r for r in self._key_by_rank if r != self.rank)
        _served_by, (header, tensors) = await self.state.fetch(candidates, limit)
        lineage = header.pop(LINEAGE_KEY, None)
        if isinstance(lineage, str):
            self.lineage = lineage
        return header, tensors

    # -- dispatch -----------------------------------------------------------------------------
    def _send_rank(self, rank: int, header: dict[str, Any]) -> None:
        key = self._key_by_rank.get(rank)
        if key is not None:
            self.link.send(key, {**header, "r": self.rank})

    async def _send_credited(self, rank: int, header: dict[str, Any], payload: memoryview) -> None:
        key = self._key_by_rank.get(rank)
        if key is None:
            raise Unavailable(f"rank {rank} has no registered key")
        await self.link.send_credited(key, {**header, "r": self.rank}, payload)

    def _sender_rank(self, key: str, claimed: Any) -> int:
        if not isinstance(claimed, int) or isinstance(claimed, bool) or not 0 <= claimed < self.world_size:
            raise ProtocolError(f"message lacks a rank in [0, {self.world_size})")
        known = self._rank_by_key.get(key)
        if known is not None:
            if known != claimed:
                raise ProtocolError(f"peer {key[:8]} is rank {known} but claims rank {claimed}")
            return known
        if claimed == self.rank or claimed in self._key_by_rank or key not in self._registered:
            raise ProtocolError(f"peer {key[:8]} claims rank {claimed}, which is taken")
        self._rank_by_key[key] = claimed
        self._key_by_rank[claimed] = key
        log.info("peer_rank_learned", peer=key[:8], rank=claimed)
        return claimed

    def _on_message(self, msg: PeerMessage) -> None:
        self._heard[msg.key] = self.clock()
        header = msg.header
        kind = header.get("t")
        rank = self._sender_rank(msg.key, header.get("r"))
        if kind == "hb":
            return
        if kind in STATE_KINDS:
            self.state.handle(rank, msg)
            return
        if kind == "rejoin":
            self.link.ack(msg)
            self._rejoiners.setdefault(non_negative(header, "step"), set()).add(rank)
            return
        if kind != "chunk" and kind != "refuse" and kind not in MESSAGE_TYPES:
            raise ProtocolError(f"unknown peer message type {kind!r}"[:100])
        step = non_negative(header, "step")
        rnd = self._round
        if rnd is not None and step == rnd.step and not rnd.finished:
            if kind == "refuse":
                rnd.error = _mismatch(rank, step, header, self.payload_facts(rnd.flat))
                rnd.wake()
                return
            rnd.handle(rank, msg)
        elif step in self._decided:
            self._answer_decided(step, rank, msg)
        elif step in self._left:
            self.link.ack(msg)
            reply = answer_left(step, header)
            refused = self._left[step]
            if reply is not None:
                self._send_rank(rank, reply if refused is None else {"t": "refuse", "step": step, **refused})
        elif (rnd is None or step > rnd.step) and kind not in ("chunk", "refuse") and not self._past(step):
            if sum(len(v) for v in self._future.values()) < _MAX_BUFFERED:
                self._future.setdefault(step, []).append((rank, msg))
        else:
            self.link.ack(msg)
            reply = answer_behind(step, min(self._decided), msg.header) if self._past(step) else None
            if reply is not None:
                # Older than all we remember: say so, or the late rank waits on us for good.
                self._send_rank(rank, reply)

    def _past(self, step: int) -> bool:
        """True if ``step`` is older than every decision this rank still remembers."""
        return bool(self._decided) and step < min(self._decided)

    def _answer_decided(self, step: int, rank: int, msg: PeerMessage) -> None:
        self.link.ack(msg)
        decision = self._decided[step]
        if msg.header.get("t") == "commit":
            try:
                theirs = Decision.from_wire(msg.header.get("decision"))
            except ProtocolError:
                return
            if theirs != decision and (theirs.ballot, theirs.ranks) != (decision.ballot, decision.ranks):
                log.error("step_diverged", step=step, ours=decision.to_wire(), theirs=theirs.to_wire())
                self._diverged = step
            return
        reply = answer_after(decision, step, rank, msg.header)
        if reply is not None:
            self._send_rank(rank, reply)

    # -- lifecycle ----------------------------------------------------------------------------
    async def aclose(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._clock_task is not None:
            self._clock_task.cancel()
        self.state.close()
        await self.link.aclose()


def next_lineage(lineage: str, step: int, decision: Decision) -> str:
    """The lineage after applying ``decision`` at ``step`` to state of ``lineage``."""
    text = f"{lineage}|{step}|{list(decision.ballot)}|{list(decision.ranks)}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _facts(header: Mapping[str, Any]) -> dict[str, Any]:
    """A peer's payload facts; a peer that does not name its compression sends float32."""
    return {"n": header.get("n"), "c": header.get("c", "none")}


def _mismatch(rank: int, step: int, header: Mapping[str, Any], ours: Mapping[str, Any]) -> ProtocolError:
    theirs = _facts(header)
    log.error("peer_payload_mismatch", step=step, peer=rank, theirs=theirs, ours=dict(ours))
    if theirs["n"] != ours["n"]:
        return ProtocolError(
            f"rank {rank} reduces {theirs['n']!r} elements at step {step}, this rank {ours['n']}: "
            "the models differ"
        )
    return ProtocolError(
        f"rank {rank} sends pseudo-gradients with compression {str(theirs['c'])[:16]!r} at step {step}, "
        f"this rank {ours['c']!r}: every node of a run needs the same train_config.diloco.compression"
    )
