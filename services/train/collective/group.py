"""A rank's membership in a training group: all-reduce per outer step, and state transfer for rejoins.

:class:`PeerGroup` ties the pieces together on one asyncio loop: the :class:`~bus.peers.PeerLink`
(authenticated transport), a :class:`~.agreement.StepAgreement` per step (who takes part), an
:class:`~.exchange.Exchange` per attempt (moving and reducing the data), plus heartbeats so that a
peer busy with its inner steps is told apart from a dead one. Ranks come from the registry, or, for a
registered key without one, from the rank the peer states in every message (first claim wins; never
rank 0, the preferred coordinator, which only the registry gives).

State transfer (:mod:`.state`) is a second use of the same link: :meth:`PeerGroup.serve_state`
publishes a snapshot and :meth:`PeerGroup.fetch_state` pulls one from a peer. A rank left out of a
step gets :class:`Excluded` and resynchronises that way. A rank done with a step still answers late
questions about it (with the decision, or that it left): its peers see it heartbeat, so silence would
leave them waiting on it for good.

Each rank also keeps a *lineage*, a digest of every decision its state went through. It rides on the
``ready`` message, the coordinator averages only ranks of its own lineage, and a fetched snapshot
carries the lineage of the rank that served it. So state that diverged (a rank that went on alone
while partitioned, a restart from an old checkpoint) is never silently mixed into the average.

**Peers are untrusted input.** :meth:`PeerGroup._on_message` is the one edge: every message is decoded
there into its :mod:`contracts.collective` type and checked against the registry and the world (its
sender speaks only for its own rank, every rank it names is in the world, only chunks carry payloads)
before anything acts on it. Messages about steps more than :data:`HORIZON` ahead of this rank are not
kept, and each peer may park at most :data:`_MAX_BUFFERED_PER_PEER` for later steps. A peer that
breaks the protocol (:class:`~.faults.PeerFault`: a message that does not decode or claims another
rank, NaN/inf data, a state that is not this model's) is *dropped*: logged once as ``peer_dropped``,
left out of the step in progress and of every later one, and no longer heard or answered until its
registration changes. Payloads whose facts (size, compression) differ from ours are a configuration
mismatch, not a fault; see :meth:`_Round.misfit` for when that fails the step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import msgspec
from torch import Tensor

from bus.auth import Authenticator
from bus.peers import PeerLink, PeerMessage
from bus.sockets import AsyncContext
from contracts.collective import (
    AgreementMessage,
    AnyMessage,
    Chunk,
    Commit,
    Compression,
    Facts,
    Heartbeat,
    Leave,
    Ready,
    Refuse,
    Rejoin,
    StateChunk,
    StateEnd,
    StateError,
    StateHeader,
    StateRequest,
    StepMessage,
)
from node.errors import Conflict, InvalidRequest, MLNodeError, ProtocolError, Unavailable
from node.identity import KeyPair
from node.logging import get_logger
from services.train.collective.agreement import (
    GENESIS,
    Ballot,
    Decision,
    Hooks,
    StepAgreement,
    answer_after,
    answer_behind,
    answer_left,
    ballot_key,
)
from services.train.collective.buffers import Buffers
from services.train.collective.exchange import Exchange, ReduceFn
from services.train.collective.faults import PeerFault
from services.train.collective.state import Layouts, Snapshot, StateTransfer
from services.train.collective.tensors import DEFAULT_CHUNK_BYTES, check_chunk_bytes
from services.train.compression import Codec, NonFinitePseudoGradient, flatten, unflatten

log = get_logger(__name__)

_MAX_BUFFERED = 4096
#: Messages one peer may have parked for steps this rank has not begun (a few per step suffice).
_MAX_BUFFERED_PER_PEER = 64
#: Chunks of one peer kept while their ballot's start is on its way, per chunk its window allows.
_EARLY_PER_CREDIT = 4
_KEEP_DECISIONS = 16
#: How many steps past its own a rank keeps messages for: a live peer is at most one step ahead
#: (two would mean it decided a step without us, which its answers tell us anyway).
HORIZON = 2
_decoder = msgspec.msgpack.Decoder(AnyMessage)
_STATE_MESSAGES = (StateRequest, StateHeader, StateChunk, StateEnd, StateError)


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

    def __init__(
        self, group: PeerGroup, step: int, flat: Tensor, facts: Facts, peers: set[int], expected: set[int]
    ):
        self.group = group
        self.step = step
        self.flat = flat
        self.facts = facts
        self.began = group.clock()
        self.event = asyncio.Event()
        self.error: MLNodeError | None = None
        #: Whether :attr:`error` is a mismatch of payload facts (late questions then get "refuse").
        self.mismatched = False
        #: Ranks whose payload facts differ from ours, as they said.
        self.misfits: dict[int, Facts] = {}
        self.exchanges: dict[Ballot, Exchange] = {}
        self.current: Exchange | None = None
        self.data_heard = -math.inf
        self.early: list[tuple[int, Chunk, PeerMessage]] = []
        self._early_count: Counter[int] = Counter()
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
        self._early_count.clear()
        for rank, chunk, msg in early:
            group.guarded(rank, functools.partial(self.take_chunk, rank, chunk, msg))

    def completed(self, ballot: Ballot) -> None:
        self.agreement.data_complete(ballot)
        self.wake()

    def take_chunk(self, rank: int, chunk: Chunk, msg: PeerMessage) -> None:
        current = self.current
        if current is not None and current.ballot == chunk.ballot:
            self.data_heard = self.group.clock()
            try:
                current.handle(rank, chunk, msg.payload, msg)
            except PeerFault:
                raise
            except ProtocolError as exc:  # maybe not its fault (see faults.py): out of this step only
                log.warning("allreduce_bad_chunk", step=self.step, peer=rank, error=exc.message)
                self.agreement.suspect({rank})
            except NonFinitePseudoGradient as exc:  # our own values overflow the mean
                self.error = exc
        elif (
            self._may_start(chunk.ballot)
            and len(self.early) < _MAX_BUFFERED
            and self._early_count[rank] < _EARLY_PER_CREDIT * self.group.link.window
        ):
            # Its start message is still on its way (the sender heard it first, maybe from another
            # rank): keep the chunk, unacknowledged, instead of losing it for good.
            self.early.append((rank, chunk, msg))
            self._early_count[rank] += 1
        else:
            self.group.link.ack(msg)

    def _may_start(self, ballot: Ballot) -> bool:
        promised = self.agreement.promised
        return ballot not in self.exchanges and (
            promised is None or ballot_key(ballot) >= ballot_key(promised)
        )

    def handle(self, rank: int, message: StepMessage, msg: PeerMessage) -> None:
        """One message of this step from ``rank``; :class:`~.faults.PeerFault` if it broke the protocol."""
        if isinstance(message, Chunk):
            self.take_chunk(rank, message, msg)
        elif isinstance(message, Refuse):
            self.group.link.ack(msg)
            if message.facts == self.facts:
                raise PeerFault(f"rank {rank} refused step {self.step} for payload facts equal to ours", ())
            self.misfit(rank, message.facts)
        elif isinstance(message, Ready) and message.facts != self.facts:
            self.group._send_rank(rank, Refuse(r=self.group.rank, step=self.step, facts=self.facts))
            self.misfit(rank, message.facts)
        else:
            self.group.link.ack(msg)
            self.agreement.handle(rank, cast(AgreementMessage, message))  # what is left is the agreement's
        self.wake()

    def misfit(self, rank: int, theirs: Facts) -> None:
        """``rank``'s payload cannot be averaged with ours (another model size or compression).

        The step fails here — loudly: it is a configuration error — only once the ranks that may share
        our facts can no longer make a quorum, i.e. more than ``world - quorum`` ranks differ. Until
        then the differing ranks are left out of the step like failed ones. So the side that holds a
        majority of the world goes on and the minority fails, and a single peer's ``refuse`` removes
        only that peer from a step of three or more ranks (with two, either side's refuse fails both:
        neither is a majority on its own, as for the quorum itself).
        """
        if rank in self.misfits or self.finished:
            return
        self.misfits[rank] = theirs
        group = self.group
        fails = len(self.misfits) > group.world_size - group.quorum
        (log.error if fails else log.warning)(
            "peer_payload_mismatch", step=self.step, peer=rank, theirs=_show(theirs), ours=_show(self.facts),
            differing=sorted(self.misfits), fails_step=fails,
        )
        if fails:
            self.error = _mismatch(rank, self.step, theirs, self.facts)
            self.mismatched = True
        else:
            self.agreement.exclude({rank})

    def drop(self, rank: int) -> None:
        """``rank`` was dropped: out of this step, and its parked chunks let go."""
        if not self.finished:
            self.agreement.exclude({rank})
        for _rank, _chunk, msg in [e for e in self.early if e[0] == rank]:
            self.group.link.ack(msg)
        self.early = [e for e in self.early if e[0] != rank]
        self._early_count.pop(rank, None)
        self.wake()

    def wake(self) -> None:
        if self.finished:
            self.event.set()

    def close(self) -> None:
        for exchange in self.exchanges.values():
            exchange.cancel()
        for _rank, _chunk, msg in self.early:
            self.group.link.ack(msg)
        self.early.clear()


class PeerGroup:
    """This rank's side of a training group; create, :meth:`set_members`, :meth:`start`, then reduce."""

    def __init__(
        self,
        context: AsyncContext,
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
            context, auth, identity, bind, self._on_message, max_payload=self.chunk_bytes, window=window,
            on_violation=lambda key, reason: self._drop(key, f"broken frame: {reason}"),
        )
        self._registered: dict[str, int | None] = {}
        self._rank_by_key: dict[str, int] = {}
        self._key_by_rank: dict[int, str] = {}
        #: Peers that broke the protocol, with the reason: not heard until their registration changes.
        self._dropped: dict[str, str] = {}
        self._round: _Round | None = None
        #: The staging copy of each step's payload and its results, reused step after step.
        self.buffers = Buffers()
        self._future: dict[int, list[tuple[int, StepMessage, PeerMessage]]] = {}
        self._future_count: Counter[int] = Counter()
        self._decided: dict[int, Decision] = {}
        #: Steps this rank is out of: late questions about them are answered "leave", or "refuse" with
        #: our payload facts (the value) when the step failed because the models or formats differ.
        self._left: dict[int, Facts | None] = {}
        self._last_ranks: set[int] | None = None
        self._rejoiners: dict[int, set[int]] = {}
        self._diverged: int | None = None
        #: The newest step this rank runs or is about to run (None until it knows).
        self._position: int | None = None
        #: What our payload is (set by the first all-reduce; constant for the run).
        self._facts: Facts | None = None
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
        changed = {k for k, r in self._registered.items() if registered.get(k, -1) != r}
        self._registered = registered
        self._rank_by_key = {k: r for k, r in self._rank_by_key.items() if k in registered}
        self._rank_by_key.update({k: r for k, r in registered.items() if r is not None})
        self._key_by_rank = {r: k for k, r in self._rank_by_key.items()}
        # A registration that changed (or went away) gives a dropped peer a fresh start.
        self._dropped = {k: v for k, v in self._dropped.items() if k in registered and k not in changed}
        self.link.set_peers(endpoints)
        for key in endpoints:
            if key not in self._dropped:
                self.link.send(key, Heartbeat(r=self.rank))

    def _key_of(self, rank: int) -> str | None:
        key = self._key_by_rank.get(rank)
        return None if key is None or key in self._dropped else key

    def ranks(self) -> dict[int, str]:
        """Known peer ranks and their keys (dropped peers left out)."""
        return {r: k for r, k in self._key_by_rank.items() if k not in self._dropped}

    def dropped(self) -> list[dict[str, object]]:
        """The peers dropped for breaking the protocol, and why."""
        return [
            {"public_key": key, "rank": self._rank_by_key.get(key), "reason": reason}
            for key, reason in self._dropped.items()
        ]

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
                if key not in self._dropped:
                    self.link.send(key, Heartbeat(r=self.rank))
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
        facts = self._facts = self.payload_facts(flat)
        self._position = step
        for old in [s for s in self._rejoiners if s < step]:
            del self._rejoiners[old]
        dropped = self._dropped_ranks()
        peers = set(self._key_by_rank) - {self.rank} - dropped
        expected = (self._last_ranks if self._last_ranks is not None else set(range(self.world_size))) | (
            self._rejoiners.pop(step, set())
        )
        rnd = _Round(self, step, flat, facts, peers, expected - {self.rank} - dropped)
        self._round = rnd
        self._left.pop(step, None)
        normal = False
        try:
            rnd.agreement.begin(facts)
            for old in [s for s in self._future if s <= step]:
                for rank, message, msg in self._future.pop(old):
                    self._future_count[rank] -= 1
                    if old == step and not rnd.finished and rank not in self._dropped_ranks():
                        self.guarded(rank, functools.partial(rnd.handle, rank, message, msg))
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
                # The models differ: the peers must fail as well, even if our "refuse" got lost.
                self._remember_left(step, refused=facts if rnd.mismatched else None)
                raise rnd.error
            decision = rnd.agreement.applied
            if decision is None:
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
                    if key not in self._dropped:
                        self.link.send(key, Leave(r=self.rank, step=step))

    def payload_facts(self, flat: Tensor) -> Facts:
        """What must match between ranks for their payloads to be reduced together."""
        return Facts(n=flat.numel(), c=cast(Compression, self.codec.name))

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

    def _remember_left(self, step: int, *, refused: Facts | None = None) -> None:
        # A peer may still count on this rank for the step (in its view, or as its coordinator), and
        # our heartbeats tell it we are alive: only an answer tells it to go on without us.
        self._left[step] = refused
        for old in sorted(self._left)[:-_KEEP_DECISIONS]:
            del self._left[old]

    async def rejoin(self, step: int) -> None:
        """Tell every peer this rank will take part again from ``step`` (after loading their state)."""
        self._last_ranks = None
        self._position = step
        notice = Rejoin(r=self.rank, step=step)
        keys = [key for key in self.link.peer_keys() if key not in self._dropped]
        results = await asyncio.gather(
            *(self.link.send_credited(key, notice, timeout=self.timeout) for key in keys),
            return_exceptions=True,
        )
        for error in results:
            if isinstance(error, MLNodeError):
                log.warning("rejoin_notice_failed", step=step, error=error.message)

    # -- state transfer -----------------------------------------------------------------------
    def serve_state(
        self, outer_step: int, inner_step: int, names: Sequence[str], tensors: Sequence[Tensor]
    ) -> None:
        """Publish the snapshot peers get from :meth:`fetch_state`, stamped with this rank's lineage."""
        self.state.publish(outer_step, inner_step, self.lineage, names, tensors)

    async def fetch_state(
        self, layouts: Layouts, *, rank: int | None = None, timeout: float | None = None
    ) -> Snapshot:
        """A peer's published snapshot in one of ``layouts`` (this rank's own model: see
        :mod:`.state`): tries ``rank``, or every known peer in rank order.

        This rank then holds (and must load) the peer's state, so it takes on the peer's lineage.
        """
        limit = timeout if timeout is not None else self.timeout
        candidates = [rank] if rank is not None else sorted(r for r in self.ranks() if r != self.rank)
        _served_by, snapshot = await self.state.fetch(candidates, limit, layouts)
        self.lineage = snapshot.lineage
        return snapshot

    # -- the edge: every peer message comes in here ----------------------------------------------
    def _send_rank(self, rank: int, message: StepMessage) -> None:
        key = self._key_of(rank)
        if key is not None:
            self.link.send(key, message)

    async def _send_credited(self, rank: int, message: Chunk, payload: memoryview) -> None:
        key = self._key_of(rank)
        if key is None:
            raise Unavailable(f"rank {rank} has no registered key")
        await self.link.send_credited(key, message, payload)

    def _on_message(self, msg: PeerMessage) -> None:
        key = msg.key
        if key in self._dropped:
            return  # not heard any more; its credits are not returned either
        self._heard[key] = self.clock()
        try:
            message = self._decode(msg)
            rank = self._sender_rank(key, message.r)
            self._dispatch(rank, message, msg)
        except PeerFault as fault:
            self._fault(key, fault)

    def guarded(self, rank: int, handle: Callable[[], None]) -> None:
        """Run ``handle()`` (work on a message of ``rank`` taken up later) dropping whom it faults."""
        try:
            handle()
        except PeerFault as fault:
            key = self._key_by_rank.get(rank)
            if key is not None:
                self._fault(key, fault)

    def _decode(self, msg: PeerMessage) -> AnyMessage:
        """The message as its contract's type, checked against what only this group knows."""
        try:
            message: AnyMessage = _decoder.decode(msg.body)
        except msgspec.ValidationError as exc:
            raise PeerFault(f"malformed message: {exc}"[:300], ()) from None
        except msgspec.DecodeError:
            raise PeerFault("undecodable message", ()) from None
        outside = [r for r in (message.r, *message.ranks()) if r >= self.world_size]
        if outside:
            name = type(message).__name__
            raise PeerFault(f"{name} names rank {outside[0]} of a world of {self.world_size}", ())
        if msg.payload is not None and not isinstance(message, Chunk | StateChunk):
            raise PeerFault(f"{type(message).__name__} message carries a payload", ())
        return message

    def _sender_rank(self, key: str, claimed: int) -> int:
        known = self._rank_by_key.get(key)
        if known is not None:
            if known != claimed:
                raise PeerFault(f"peer is rank {known} but claims rank {claimed}", ())
            return known
        if key not in self._registered:
            raise PeerFault("not a registered peer of this task", ())
        if claimed == 0:
            raise PeerFault("registered without a rank, it claims rank 0 (only the registry gives it)", ())
        if claimed == self.rank or claimed in self._key_by_rank:
            raise PeerFault(f"registered without a rank, it claims rank {claimed}, which is taken", ())
        self._rank_by_key[key] = claimed
        self._key_by_rank[claimed] = key
        log.info("peer_rank_learned", peer=key[:8], rank=claimed)
        return claimed

    def _dispatch(self, rank: int, message: AnyMessage, msg: PeerMessage) -> None:
        if isinstance(message, Heartbeat):
            return
        if isinstance(message, _STATE_MESSAGES):
            self.state.handle(rank, message, msg)
            return
        if isinstance(message, Rejoin):
            self.link.ack(msg)
            if self._in_horizon(message.step) and (
                message.step in self._rejoiners or len(self._rejoiners) < _KEEP_DECISIONS
            ):
                self._rejoiners.setdefault(message.step, set()).add(rank)
            return
        step = message.step
        rnd = self._round
        if rnd is not None and step == rnd.step and not rnd.finished:
            rnd.handle(rank, message, msg)
            return
        if isinstance(message, Ready) and self._facts is not None and message.facts != self._facts:
            self.link.ack(msg)  # whatever the step: the models or formats differ, say so
            self._send_rank(rank, Refuse(r=self.rank, step=step, facts=self._facts))
        elif step in self._decided:
            self._answer_decided(step, rank, message, msg)
        elif step in self._left:
            self.link.ack(msg)
            reply = answer_left(self.rank, message)
            refused = self._left[step]
            if reply is not None and refused is not None:
                reply = Refuse(r=self.rank, step=step, facts=refused)
            if reply is not None:
                self._send_rank(rank, reply)
        elif (rnd is None or step > rnd.step) and not isinstance(message, Chunk | Refuse | Rejoin) and (
            not self._past(step)
        ):
            self._park(rank, message, msg)
        else:
            self.link.ack(msg)
            reply = answer_behind(min(self._decided), self.rank, message) if self._past(step) else None
            if reply is not None:
                # Older than all we remember: say so, or the late rank waits on us for good.
                self._send_rank(rank, reply)

    def _in_horizon(self, step: int) -> bool:
        return self._position is None or step <= self._position + HORIZON

    def _park(self, rank: int, message: StepMessage, msg: PeerMessage) -> None:
        """Keep a message of a step this rank has not begun; beyond the horizon or the peer's share it is
        let go (a phase message is repeated while it matters)."""
        if (
            not self._in_horizon(message.step)
            or self._future_count[rank] >= _MAX_BUFFERED_PER_PEER
            or sum(self._future_count.values()) >= _MAX_BUFFERED
        ):
            self.link.ack(msg)
            return
        self._future.setdefault(message.step, []).append((rank, message, msg))
        self._future_count[rank] += 1

    def _past(self, step: int) -> bool:
        """True if ``step`` is older than every decision this rank still remembers."""
        return bool(self._decided) and step < min(self._decided)

    def _answer_decided(self, step: int, rank: int, message: StepMessage, msg: PeerMessage) -> None:
        self.link.ack(msg)
        decision = self._decided[step]
        if isinstance(message, Commit):
            theirs = message.decision
            if theirs != decision and (theirs.ballot, theirs.ranks) != (decision.ballot, decision.ranks):
                log.error("step_diverged", step=step, ours=msgspec.to_builtins(decision),
                          theirs=msgspec.to_builtins(theirs))
                self._diverged = step
            return
        reply = answer_after(decision, self.rank, message)
        if reply is not None:
            self._send_rank(rank, reply)

    # -- dropping a peer that broke the protocol -------------------------------------------------
    def _fault(self, sender: str, fault: PeerFault) -> None:
        keys = [sender] if not fault.ranks else [k for r in fault.ranks if (k := self._key_by_rank.get(r))]
        for key in keys:
            self._drop(key, fault.message)

    def _drop(self, key: str, reason: str) -> None:
        if key in self._dropped or key not in self._registered:
            return
        self._dropped[key] = reason
        rank = self._rank_by_key.get(key)
        log.warning("peer_dropped", peer=key[:8], rank=rank, reason=reason)
        if rank is None:
            return
        if self._last_ranks is not None:
            self._last_ranks.discard(rank)
        for ranks in self._rejoiners.values():
            ranks.discard(rank)
        for step, parked in list(self._future.items()):
            for _rank, _message, msg in [p for p in parked if p[0] == rank]:
                self.link.ack(msg)
            self._future[step] = [p for p in parked if p[0] != rank]
        self._future_count.pop(rank, None)
        if self._round is not None:
            self._round.drop(rank)

    def _dropped_ranks(self) -> set[int]:
        return {r for k in self._dropped if (r := self._rank_by_key.get(k)) is not None}

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


def _show(facts: Facts) -> dict[str, object]:
    return {"n": facts.n, "c": facts.c}


def _mismatch(rank: int, step: int, theirs: Facts, ours: Facts) -> ProtocolError:
    if theirs.n != ours.n:
        return ProtocolError(
            f"rank {rank} reduces {theirs.n} elements at step {step}, this rank {ours.n}: the models differ"
        )
    return ProtocolError(
        f"rank {rank} sends pseudo-gradients with compression {theirs.c!r} at step {step}, "
        f"this rank {ours.c!r}: every node of a run needs the same train_config.diloco.compression"
    )
