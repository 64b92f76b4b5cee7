"""A rank's membership in a training group: all-reduce per outer step, and state transfer for rejoins.

:class:`PeerGroup` ties the pieces together on one asyncio loop: the :class:`~bus.peers.PeerLink`
(authenticated transport), a :class:`~bus.agreement.StepAgreement` per step (who takes part), an
:class:`~bus.allreduce.Exchange` per attempt (moving and reducing the data), plus heartbeats so that a
peer busy with its inner steps is told apart from a dead one. Ranks come from the registry, or, for a
registered key without one, from the rank the peer states in every message (first claim wins).

State transfer is a second use of the same link: :meth:`PeerGroup.serve_state` publishes a snapshot
(a msgpack header plus flat tensors) and :meth:`PeerGroup.fetch_state` pulls one from a peer in
credited chunks. A rank left out of a step gets :class:`Excluded` and resynchronises that way. A rank
done with a step still answers late questions about it (with the decision, or that it left): its
peers see it heartbeat, so silence would leave them waiting on it for good.

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
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
import zmq.asyncio
from torch import Tensor

from bus.agreement import (
    MESSAGE_TYPES,
    Ballot,
    Decision,
    Hooks,
    StepAgreement,
    answer_after,
    answer_left,
    ballot_key,
    parse_ballot,
)
from bus.allreduce import Exchange, ReduceFn
from bus.auth import Authenticator
from bus.peers import PeerLink, PeerMessage
from bus.tensors import (
    DEFAULT_CHUNK_BYTES,
    ChunkHeader,
    TensorAssembler,
    check_chunk_bytes,
    dtype_name,
    iter_chunks,
    parse_dtype,
    parse_shape,
)
from node.errors import Conflict, InvalidRequest, MLNodeError, ProtocolError, Unavailable
from node.identity import KeyPair
from node.logging import get_logger

log = get_logger(__name__)

_STATE_KINDS = ("state_req", "state_hdr", "state_chunk", "state_end", "state_err")
_MAX_BUFFERED = 4096
_KEEP_DECISIONS = 16
GENESIS = "genesis"
#: Key the group adds to a served state header (and removes on fetch): the lineage of that state.
LINEAGE_KEY = "_lineage"


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
    """The average of the decided ranks' tensors, shaped like the input."""

    step: int
    tensors: list[Tensor]
    ranks: tuple[int, ...]


@dataclass
class _Fetch:
    rank: int
    heard: float
    header: dict[str, Any] | None = None
    assembler: TensorAssembler | None = None
    result: tuple[dict[str, Any], list[Tensor]] | None = None
    error: str | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event)


def _int_field(header: Mapping[str, Any], name: str) -> int:
    value = header.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"field {name!r} must be a non-negative integer")
    return value


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """One contiguous float32 CPU copy of all tensors (the payload of an all-reduce)."""
    if not tensors:
        return torch.empty(0, dtype=torch.float32)
    return torch.cat([t.detach().reshape(-1).to(device="cpu", dtype=torch.float32) for t in tensors])


class _Round:
    """One step in progress: its agreement, the exchange of each ballot tried, chunks that came early."""

    def __init__(self, group: PeerGroup, step: int, flat: Tensor, peers: set[int], expected: set[int]):
        self.group = group
        self.step = step
        self.flat = flat
        self.began = time.monotonic()
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
        heard = self.group.link.last_heard(key)
        return time.monotonic() - max(heard or 0.0, self.began)

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
            chunk_bytes=group.link.chunk_bytes,
            topology=group.topology,
            reduce_fn=group.reduce_fn,
            send=group._send_credited,
            ack=group.link.ack,
            on_complete=lambda: self.completed(ballot),
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
            self.data_heard = time.monotonic()
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
            if kind == "ready" and msg.header.get("n") != self.flat.numel():
                # Different models: a configuration error on both sides, so both fail loudly.
                self.group._send_rank(rank, {"t": "refuse", "step": self.step, "n": self.flat.numel()})
                self.error = _size_mismatch(rank, self.step, msg.header.get("n"), self.flat.numel())
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
    ) -> None:
        if not 0 <= rank < world_size:
            raise InvalidRequest(f"rank must be in [0, {world_size}), got {rank}")
        if timeout <= 0:
            raise InvalidRequest(f"timeout must be positive, got {timeout}")
        self.rank = rank
        self.world_size = world_size
        self.reduce_fn = reduce_fn
        self.timeout = timeout
        self.join_timeout = join_timeout if join_timeout is not None else 4 * timeout
        self.topology = topology
        self.identity = identity
        #: Digest of every decision this rank's state went through; only equal lineages are averaged.
        self.lineage = GENESIS
        self.link = PeerLink(
            context,
            auth,
            identity,
            bind,
            self._on_message,
            chunk_bytes=check_chunk_bytes(chunk_bytes),
            window=window,
        )
        self._registered: dict[str, int | None] = {}
        self._rank_by_key: dict[str, int] = {}
        self._key_by_rank: dict[int, str] = {}
        self._round: _Round | None = None
        self._future: dict[int, list[tuple[int, PeerMessage]]] = {}
        self._decided: dict[int, Decision] = {}
        #: Steps this rank is out of: late questions about them are answered "leave", or "refuse" with
        #: our payload size (the value) when the step failed because the models differ.
        self._left: dict[int, int | None] = {}
        self._last_ranks: set[int] | None = None
        self._rejoiners: dict[int, set[int]] = {}
        self._diverged: int | None = None
        self._snapshot: tuple[dict[str, Any], list[Tensor]] | None = None
        self._fetches: dict[str, _Fetch] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None

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

    def ranks(self) -> dict[int, str]:
        """Known peer ranks and their keys."""
        return dict(self._key_by_rank)

    def start(self) -> None:
        """Start receiving and heartbeating; call from the loop that will run the all-reduces."""
        self.link.start()
        if self._heartbeat is None:
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

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
        flat = flatten(tensors)
        peers = set(self._key_by_rank) - {self.rank}
        expected = (self._last_ranks if self._last_ranks is not None else set(range(self.world_size))) | (
            self._rejoiners.pop(step, set())
        )
        rnd = _Round(self, step, flat, peers, expected - {self.rank})
        self._round = rnd
        self._left.pop(step, None)
        normal = False
        try:
            rnd.agreement.begin({"n": flat.numel()})
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
                self._remember_left(step, refused=flat.numel())
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
            return Reduced(step, _unflatten(result, shapes), decision.ranks)
        finally:
            rnd.close()
            self._round = None
            if not normal:
                self._remember_left(step)
                for key in self.link.peer_keys():
                    self.link.send(key, {"t": "leave", "step": step, "r": self.rank})

    def rejoining(self, step: int) -> set[int]:
        """Ranks that announced they will take part again at ``step``."""
        return set(self._rejoiners.get(step, ()))

    def _remember(self, step: int, decision: Decision) -> None:
        self._decided[step] = decision
        for old in sorted(self._decided)[:-_KEEP_DECISIONS]:
            del self._decided[old]

    def _remember_left(self, step: int, *, refused: int | None = None) -> None:
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
        """Publish the snapshot peers get from :meth:`fetch_state` (replaces the previous one)."""
        try:
            msgpack.packb(dict(header), use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidRequest(f"state header is not msgpack-serialisable: {exc}") from None
        stamped = {**header, LINEAGE_KEY: self.lineage}
        self._snapshot = (stamped, [t.detach().to("cpu").contiguous() for t in tensors])

    async def fetch_state(
        self, *, rank: int | None = None, timeout: float | None = None
    ) -> tuple[dict[str, Any], list[Tensor]]:
        """A peer's published snapshot: tries ``rank``, or every known peer in rank order."""
        limit = timeout if timeout is not None else self.timeout
        candidates = [rank] if rank is not None else sorted(r for r in self._key_by_rank if r != self.rank)
        reasons = []
        for candidate in candidates * 2:  # a second pass covers a request lost to a reconnect
            key = self._key_by_rank.get(candidate)
            if key is None:
                reasons.append(f"rank {candidate}: unknown")
                continue
            req = uuid.uuid4().hex
            fetch = self._fetches[req] = _Fetch(candidate, time.monotonic())
            try:
                self.link.send(key, {"t": "state_req", "id": req, "r": self.rank})
                while fetch.result is None and fetch.error is None:
                    fetch.event.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(fetch.event.wait(), min(limit / 4, 0.25))
                    if fetch.result is None and time.monotonic() - fetch.heard > limit:
                        fetch.error = f"no state arrived for {limit:g} s"
                if fetch.result is not None:
                    header, tensors = fetch.result
                    lineage = header.pop(LINEAGE_KEY, None)
                    if isinstance(lineage, str):
                        self.lineage = lineage  # this rank now holds (and must load) the peer's state
                    log.info("state_fetched", peer=candidate, tensors=len(tensors))
                    return header, tensors
                reasons.append(f"rank {candidate}: {fetch.error}")
            finally:
                self._fetches.pop(req, None)
        raise Unavailable(f"no peer served the training state ({'; '.join(reasons) or 'no peers'})")

    def _on_state(self, rank: int, msg: PeerMessage) -> None:
        header = msg.header
        kind = header["t"]
        req = header.get("id")
        if not isinstance(req, str) or len(req) > 64:
            raise ProtocolError("state message lacks a valid 'id'")
        if kind == "state_req":
            task = asyncio.get_running_loop().create_task(self._serve(msg.key, req))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        fetch = self._fetches.get(req)
        if fetch is None or fetch.rank != rank or fetch.result is not None or fetch.error is not None:
            self.link.ack(msg)
            return
        fetch.heard = time.monotonic()
        try:
            self._take_state(fetch, kind, header, msg)
        except ProtocolError as exc:
            fetch.error = exc.message
        finally:
            self.link.ack(msg)
            fetch.event.set()

    def _take_state(self, fetch: _Fetch, kind: str, header: Mapping[str, Any], msg: PeerMessage) -> None:
        if kind == "state_err":
            fetch.error = str(header.get("reason", "refused"))[:200]
        elif kind == "state_hdr":
            dtypes, shapes = header.get("dtypes"), header.get("shapes")
            if (
                not isinstance(dtypes, list)
                or not isinstance(shapes, list)
                or not isinstance(header.get("header"), dict)
            ):
                raise ProtocolError("state header lacks 'header', 'dtypes' or 'shapes'")
            chunk = _int_field(header, "chunk_bytes")
            if chunk > self.link.chunk_bytes * 64:
                raise ProtocolError(f"state chunk size {chunk} is implausible")
            fetch.header = header["header"]
            fetch.assembler = TensorAssembler(
                [parse_dtype(d) for d in dtypes], [parse_shape(s) for s in shapes], check_chunk_bytes(chunk)
            )
        elif kind == "state_chunk":
            if fetch.assembler is None:
                raise ProtocolError("state chunk before the state header")
            fetch.assembler.add(ChunkHeader.from_wire(header), msg.payload or memoryview(b""))
        elif kind == "state_end":
            if fetch.assembler is None or fetch.header is None or not fetch.assembler.complete:
                raise ProtocolError("state stream ended before every tensor arrived")
            fetch.result = (fetch.header, fetch.assembler.tensors)

    async def _serve(self, key: str, req: str) -> None:
        snapshot = self._snapshot
        if snapshot is None:
            self.link.send(
                key, {"t": "state_err", "id": req, "r": self.rank, "reason": "no state published yet"}
            )
            return
        header, tensors = snapshot
        chunk = self.link.chunk_bytes
        base = {"id": req, "r": self.rank}
        try:
            # The whole stream is credited: ordered, bounded, and held back (not dropped) while the
            # connection to the requester is being re-opened.
            await self.link.send_credited(
                key,
                {
                    "t": "state_hdr",
                    **base,
                    "header": header,
                    "dtypes": [dtype_name(t.dtype) for t in tensors],
                    "shapes": [list(t.shape) for t in tensors],
                    "chunk_bytes": chunk,
                },
                timeout=self.timeout,
            )
            for head, payload in iter_chunks(tensors, chunk, step=0, rank=self.rank):
                body = {"t": "state_chunk", **base, **head.to_wire()}
                await self.link.send_credited(key, body, payload, timeout=self.timeout)
            await self.link.send_credited(key, {"t": "state_end", **base}, timeout=self.timeout)
        except MLNodeError as exc:
            log.warning("state_serve_stopped", peer=key[:8], error=exc.message)
            return
        log.info("state_served", peer=key[:8], tensors=len(tensors))

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
        header = msg.header
        kind = header.get("t")
        rank = self._sender_rank(msg.key, header.get("r"))
        if kind == "hb":
            return
        if kind in _STATE_KINDS:
            self._on_state(rank, msg)
            return
        if kind == "rejoin":
            self.link.ack(msg)
            self._rejoiners.setdefault(_int_field(header, "step"), set()).add(rank)
            return
        if kind != "chunk" and kind != "refuse" and kind not in MESSAGE_TYPES:
            raise ProtocolError(f"unknown peer message type {kind!r}"[:100])
        step = _int_field(header, "step")
        rnd = self._round
        if rnd is not None and step == rnd.step and not rnd.finished:
            if kind == "refuse":
                rnd.error = _size_mismatch(rank, step, header.get("n"), rnd.flat.numel())
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
                self._send_rank(
                    rank, reply if refused is None else {"t": "refuse", "step": step, "n": refused}
                )
        elif (rnd is None or step > rnd.step) and kind not in ("chunk", "refuse"):
            if sum(len(v) for v in self._future.values()) < _MAX_BUFFERED:
                self._future.setdefault(step, []).append((rank, msg))
        else:
            self.link.ack(msg)

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
        for task in list(self._tasks):
            task.cancel()
        await self.link.aclose()


def next_lineage(lineage: str, step: int, decision: Decision) -> str:
    """The lineage after applying ``decision`` at ``step`` to state of ``lineage``."""
    text = f"{lineage}|{step}|{list(decision.ballot)}|{list(decision.ranks)}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _size_mismatch(rank: int, step: int, theirs: Any, ours: int) -> ProtocolError:
    log.error("peer_size_mismatch", step=step, peer=rank, theirs=theirs, ours=ours)
    return ProtocolError(
        f"rank {rank} reduces {theirs!r} elements at step {step}, this rank {ours}: the models differ"
    )


def _unflatten(flat: Tensor, shapes: Sequence[tuple[int, ...]]) -> list[Tensor]:
    out = []
    offset = 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(flat[offset : offset + n].view(shape))
        offset += n
    return out
