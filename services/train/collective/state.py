"""State transfer over the peer links: publish a snapshot, or pull a peer's in credited chunks.

A rank that missed outer steps (left out, restarted, partitioned away) does not replay them: it takes
the state a peer published after its last outer step and goes on from there. A snapshot is a msgpack
header plus flat tensors; the stream is ``state_hdr``, one ``state_chunk`` per chunk, ``state_end``
(or ``state_err``), all credited so a slow fetcher throttles the server instead of filling its queues.
Every chunk is checked against the announced dtypes and shapes before a byte is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
from torch import Tensor

from bus.peers import PeerLink, PeerMessage
from node.errors import InvalidRequest, MLNodeError, ProtocolError, Unavailable
from node.logging import get_logger
from services.train.collective.tensors import (
    ChunkHeader,
    TensorAssembler,
    check_chunk_bytes,
    dtype_name,
    iter_chunks,
    parse_dtype,
    parse_shape,
)

log = get_logger(__name__)

KINDS = ("state_req", "state_hdr", "state_chunk", "state_end", "state_err")
Snapshot = tuple[dict[str, Any], list[Tensor]]


@dataclass
class _Fetch:
    rank: int
    heard: float
    header: dict[str, Any] | None = None
    assembler: TensorAssembler | None = None
    result: Snapshot | None = None
    error: str | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event)


def non_negative(header: Mapping[str, Any], name: str) -> int:
    """Field ``name`` of a peer header as a non-negative int; ProtocolError otherwise."""
    value = header.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"field {name!r} must be a non-negative integer")
    return value


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
        self._snapshot: Snapshot | None = None
        self._fetches: dict[str, _Fetch] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def publish(self, header: Mapping[str, Any], tensors: Sequence[Tensor]) -> None:
        """Replace the snapshot peers get (the header must be msgpack-serialisable)."""
        try:
            msgpack.packb(dict(header), use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidRequest(f"state header is not msgpack-serialisable: {exc}") from None
        self._snapshot = (dict(header), [t.detach().to("cpu").contiguous() for t in tensors])

    async def fetch(self, candidates: Sequence[int], limit: float) -> tuple[int, Snapshot]:
        """The first snapshot one of ``candidates`` serves (tried in order, twice), with its rank."""
        reasons = []
        for candidate in list(candidates) * 2:  # a second pass covers a request lost to a reconnect
            key = self._key_of(candidate)
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
                    # Silence, not total time, ends a fetch: a big state on a busy host takes a while.
                    if fetch.result is None and time.monotonic() - fetch.heard > limit:
                        fetch.error = f"no state arrived for {limit:g} s"
                if fetch.result is not None:
                    log.info("state_fetched", peer=candidate, tensors=len(fetch.result[1]))
                    return candidate, fetch.result
                reasons.append(f"rank {candidate}: {fetch.error}")
            finally:
                self._fetches.pop(req, None)
        raise Unavailable(f"no peer served the training state ({'; '.join(reasons) or 'no peers'})")

    def handle(self, rank: int, msg: PeerMessage) -> None:
        """One ``state_*`` message from ``rank``."""
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
            self._take(fetch, kind, header, msg)
        except ProtocolError as exc:
            fetch.error = exc.message
        finally:
            self.link.ack(msg)
            fetch.event.set()

    def _take(self, fetch: _Fetch, kind: str, header: Mapping[str, Any], msg: PeerMessage) -> None:
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
            chunk = non_negative(header, "chunk_bytes")
            if chunk > self.chunk_bytes * 64:
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
        base = {"id": req, "r": self.rank}
        if snapshot is None:
            self.link.send(key, {"t": "state_err", **base, "reason": "no state published yet"})
            return
        header, tensors = snapshot
        try:
            # Credited: ordered, bounded, and held back (not dropped) while the connection re-opens.
            await self.link.send_credited(
                key,
                {
                    "t": "state_hdr",
                    **base,
                    "header": header,
                    "dtypes": [dtype_name(t.dtype) for t in tensors],
                    "shapes": [list(t.shape) for t in tensors],
                    "chunk_bytes": self.chunk_bytes,
                },
                timeout=self.timeout,
            )
            for head, payload in iter_chunks(tensors, self.chunk_bytes, step=0, rank=self.rank):
                body = {"t": "state_chunk", **base, **head.to_wire()}
                await self.link.send_credited(key, body, payload, timeout=self.timeout)
            await self.link.send_credited(key, {"t": "state_end", **base}, timeout=self.timeout)
        except MLNodeError as exc:
            log.warning("state_serve_stopped", peer=key[:8], error=exc.message)
            return
        log.info("state_served", peer=key[:8], tensors=len(tensors))

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
