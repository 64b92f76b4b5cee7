"""State transfer over the peer links: publish a snapshot, or pull a peer's in credited chunks.

A rank that missed outer steps (left out, restarted, partitioned away) does not replay them: it takes
the state a peer published after its last outer step and goes on from there. The stream is
``state_hdr``, one ``state_chunk`` per chunk, ``state_end`` (or ``state_err``), all credited so a slow
fetcher throttles the server instead of filling its queues.

The server is untrusted. The header must describe exactly one of the layouts the fetcher accepts —
its own model's tensors: names, dtypes, shapes and so total bytes — before a byte is allocated (a
header naming a 100 GB tensor would otherwise be an OOM, and a crash loop as the restarted process
fetches it again). Each chunk must be one of that layout's grid at its exact length, and the floating
point tensors must be finite before the snapshot is handed over. A server that breaks one of these
rules is a :class:`~.faults.PeerFault`; one whose stream merely stalls or loses a message fails the
fetch, and the fetcher tries the next peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from bus.peers import PeerLink, PeerMessage
from contracts.collective import (
    StateChunk,
    StateEnd,
    StateError,
    StateHeader,
    StateMessage,
    StateRequest,
    TensorSpec,
)
from node.errors import InvalidRequest, MLNodeError, ProtocolError, Unavailable
from node.logging import get_logger
from services.train.collective.faults import PeerFault
from services.train.collective.tensors import (
    TensorAssembler,
    check_chunk_bytes,
    iter_chunks,
    spec_nbytes,
    spec_of,
)
from services.train.compression import all_finite

log = get_logger(__name__)

#: Layouts a fetcher accepts: each is the exact list of tensors a state may hold.
Layouts = Sequence[Sequence[TensorSpec]]


@dataclass(frozen=True)
class Snapshot:
    """A rank's state as a peer gets it: the steps it stands at, its lineage, its named tensors."""

    outer_step: int
    inner_step: int
    lineage: str
    names: tuple[str, ...]
    tensors: list[Tensor]


@dataclass
class _Fetch:
    rank: int
    heard: float
    layouts: list[tuple[TensorSpec, ...]]
    header: StateHeader | None = None
    assembler: TensorAssembler | None = None
    result: Snapshot | None = None
    error: str | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event)


class StateTransfer:
    """Serves this rank's snapshot and fetches peers'; ``key_of`` maps a rank to its peer key."""

    def __init__(
        self,
        link: PeerLink,
        rank: int,
        chunk_bytes: int,
        timeout: float,
        key_of: Callable[[int], str | None],
    ) -> None:
        self.link = link
        self.rank = rank
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        self.timeout = timeout
        self._key_of = key_of
        self._snapshot: tuple[Snapshot, tuple[TensorSpec, ...]] | None = None
        self._fetches: dict[str, _Fetch] = {}
        #: The one transfer each peer gets at a time (a new request replaces its previous one).
        self._serving: dict[str, asyncio.Task[None]] = {}

    def publish(
        self, outer_step: int, inner_step: int, lineage: str, names: Sequence[str], tensors: Sequence[Tensor]
    ) -> None:
        """Replace the snapshot peers get."""
        if len(names) != len(tensors) or len(set(names)) != len(names):
            raise InvalidRequest("a state needs one distinct name per tensor")
        copies = [t.detach().to("cpu").contiguous() for t in tensors]
        snapshot = Snapshot(outer_step, inner_step, lineage, tuple(names), copies)
        self._snapshot = (snapshot, tuple(spec_of(n, t) for n, t in zip(names, copies, strict=True)))

    async def fetch(self, candidates: Sequence[int], limit: float, layouts: Layouts) -> tuple[int, Snapshot]:
        """The first snapshot one of ``candidates`` serves in one of ``layouts`` (tried in order, twice),
        with the rank that served it."""
        accepted = [tuple(layout) for layout in layouts]
        reasons = []
        for candidate in list(candidates) * 2:  # a second pass covers a request lost to a reconnect
            key = self._key_of(candidate)
            if key is None:
                reasons.append(f"rank {candidate}: unknown")
                continue
            req = uuid.uuid4().hex
            fetch = self._fetches[req] = _Fetch(candidate, time.monotonic(), accepted)
            try:
                self.link.send(key, StateRequest(r=self.rank, id=req))
                while fetch.result is None and fetch.error is None:
                    fetch.event.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(fetch.event.wait(), min(limit / 4, 0.25))
                    # Silence, not total time, ends a fetch: a big state on a busy host takes a while.
                    if fetch.result is None and time.monotonic() - fetch.heard > limit:
                        fetch.error = f"no state arrived for {limit:g} s"
                if fetch.result is not None:
                    log.info("state_fetched", peer=candidate, tensors=len(fetch.result.tensors))
                    return candidate, fetch.result
                reasons.append(f"rank {candidate}: {fetch.error}")
            finally:
                self._fetches.pop(req, None)
        raise Unavailable(f"no peer served the training state ({'; '.join(reasons) or 'no peers'})")

    def handle(self, rank: int, message: StateMessage, msg: PeerMessage) -> None:
        """One state message from ``rank``; :class:`~.faults.PeerFault` if it breaks the rules above."""
        if isinstance(message, StateRequest):
            self._serve_later(msg.key, message.id)
            return
        fetch = self._fetches.get(message.id)
        if fetch is None or fetch.rank != rank or fetch.result is not None or fetch.error is not None:
            self.link.ack(msg)  # late, or for a fetch we gave up: nothing to do with it
            return
        fetch.heard = time.monotonic()
        try:
            self._take(fetch, message, msg)
        except PeerFault as fault:
            fetch.error = fault.message
            raise
        except ProtocolError as exc:
            fetch.error = exc.message
        finally:
            self.link.ack(msg)
            fetch.event.set()

    def _take(self, fetch: _Fetch, message: StateMessage, msg: PeerMessage) -> None:
        if isinstance(message, StateError):
            fetch.error = f"refused: {message.reason}"
        elif isinstance(message, StateHeader):
            if fetch.header is not None:
                raise PeerFault(f"rank {fetch.rank} sent a second state header", (fetch.rank,))
            if message.tensors not in fetch.layouts:
                unlike = _unlike(message.tensors, fetch.layouts)
                raise PeerFault(f"rank {fetch.rank} served a state that is not this model's: {unlike}",
                                (fetch.rank,))
            fetch.header = message
            fetch.assembler = TensorAssembler(message.tensors, message.chunk_bytes)  # checked: our size
        elif isinstance(message, StateChunk):
            if fetch.assembler is None:
                raise ProtocolError("state chunk before the state header")  # the header may be lost
            try:
                fetch.assembler.add(message.tensor, message.chunk, msg.payload or memoryview(b""))
            except ProtocolError as exc:
                raise PeerFault(f"rank {fetch.rank} sent a state chunk off its grid: {exc.message}",
                                (fetch.rank,)) from None
        elif isinstance(message, StateEnd):
            header, assembler = fetch.header, fetch.assembler
            if header is None or assembler is None or not assembler.complete:
                raise ProtocolError("state stream ended before every tensor arrived")
            for spec, tensor in zip(header.tensors, assembler.tensors, strict=True):
                if tensor.is_floating_point() and not all_finite(tensor):
                    raise PeerFault(
                        f"rank {fetch.rank} served a state whose {spec.name} holds NaN/inf", (fetch.rank,)
                    )
            names = tuple(spec.name for spec in header.tensors)
            fetch.result = Snapshot(header.outer_step, header.inner_step, header.lineage, names,
                                    assembler.tensors)

    def _serve_later(self, key: str, req: str) -> None:
        previous = self._serving.pop(key, None)
        if previous is not None:
            previous.cancel()  # it asked again: the old transfer is of no use to it any more
        task = asyncio.get_running_loop().create_task(self._serve(key, req))
        self._serving[key] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._serving.get(key) is done:
                del self._serving[key]

        task.add_done_callback(forget)

    async def _serve(self, key: str, req: str) -> None:
        published = self._snapshot
        if published is None:
            self.link.send(key, StateError(r=self.rank, id=req, reason="no state published yet"))
            return
        snapshot, specs = published
        try:
            # Credited: ordered, bounded, and held back (not dropped) while the connection re-opens.
            header = StateHeader(
                r=self.rank, id=req, outer_step=snapshot.outer_step, inner_step=snapshot.inner_step,
                lineage=snapshot.lineage, tensors=specs, chunk_bytes=self.chunk_bytes,
            )
            await self.link.send_credited(key, header, timeout=self.timeout)
            for tensor, chunk, payload in iter_chunks(snapshot.tensors, self.chunk_bytes):
                body = StateChunk(r=self.rank, id=req, tensor=tensor, chunk=chunk)
                await self.link.send_credited(key, body, payload, timeout=self.timeout)
            await self.link.send_credited(key, StateEnd(r=self.rank, id=req), timeout=self.timeout)
        except MLNodeError as exc:
            log.warning("state_serve_stopped", peer=key[:8], error=exc.message)
            return
        log.info("state_served", peer=key[:8], tensors=len(snapshot.tensors))

    def close(self) -> None:
        for task in list(self._serving.values()):
            task.cancel()


def _unlike(theirs: Sequence[TensorSpec], layouts: Sequence[Sequence[TensorSpec]]) -> str:
    """Where a served layout first departs from the closest one we accept, in a few words."""
    ours = min(layouts, key=lambda layout: abs(len(layout) - len(theirs)), default=())
    for i, (a, b) in enumerate(zip(theirs, ours, strict=False)):
        if a != b:
            return (f"tensor {i} is {a.name} {a.dtype}{list(a.shape)}, "
                    f"expected {b.name} {b.dtype}{list(b.shape)}")[:300]
    size = sum(spec_nbytes(s) for s in theirs)
    return f"{len(theirs)} tensors ({size} bytes), expected {len(ours)}"
