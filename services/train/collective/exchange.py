"""The data plane of one all-reduce attempt: shards, chunks, rank-ordered reduction, gather.

The flat float32 payload is cut into one contiguous shard per member of the view. With the default
``scatter_gather`` topology each member owns one shard: every rank sends shard ``j`` to its owner
(reduce-scatter), the owner reduces it and sends the result to everyone (all-gather), so each node
sends ``2 (W-1)/W`` of the payload. With ``all_to_all`` every rank sends its whole payload to every
peer and reduces everything locally (``(W-1)`` payloads sent, one round trip less).

Either way a chunk is reduced only when the contributions of *all* members are present, by the
caller's ``reduce_fn`` over ``{rank: [chunk]}`` — the training side passes its fixed-rank-order mean,
whose element-wise float32 arithmetic gives the same bits for a slice as for the whole tensor. So the
result is bit-identical on every node and to the one-process reference, whatever the arrival order.
Received chunks stay unacknowledged until they are consumed, which is what bounds memory per sender.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from node.errors import MLNodeError, ProtocolError
from node.logging import get_logger
from services.train.collective.tensors import (
    ChunkHeader,
    byte_view,
    check_chunk_bytes,
    check_fits,
    chunk_spans,
)

log = get_logger(__name__)

TOPOLOGIES = ("scatter_gather", "all_to_all")

ReduceFn = Callable[[Mapping[int, Sequence[Tensor]]], list[Tensor]]
SendFn = Callable[[int, dict[str, Any], memoryview], Awaitable[None]]


def shard_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous element ranges covering ``[0, numel)``, sizes differing by at most one."""
    return list(itertools.pairwise(numel * j // parts for j in range(parts + 1)))


class Exchange:
    """Moves and reduces the data of one ballot; ``on_complete`` fires once ``result`` is whole."""

    def __init__(
        self,
        *,
        step: int,
        ballot: tuple[int, int],
        view: tuple[int, ...],
        me: int,
        flat: Tensor,
        chunk_bytes: int,
        topology: str,
        reduce_fn: ReduceFn,
        send: SendFn,
        ack: Callable[[Any], None],
        on_complete: Callable[[], None],
    ) -> None:
        if topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}")
        if flat.dtype != torch.float32 or flat.dim() != 1 or not flat.is_contiguous():
            raise ValueError("the all-reduce payload must be one contiguous 1-D float32 tensor")
        self.step, self.ballot, self.view, self.me = step, ballot, view, me
        self.flat = flat
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        self.topology = topology
        self.result = torch.empty_like(flat)
        self.complete = False
        self._reduce_fn = reduce_fn
        self._send = send
        self._ack = ack
        self._on_complete = on_complete
        self._bounds = shard_bounds(flat.numel(), len(view))
        self._spans = [chunk_spans((hi - lo) * 4, self.chunk_bytes) for lo, hi in self._bounds]
        self._pending: dict[tuple[int, int], dict[int, tuple[Tensor, Any]]] = {}
        self._reduced: set[tuple[int, int]] = set()
        self._gathered: set[tuple[int, int]] = set()
        self._expect: Counter[int] = Counter()
        self._got: Counter[int] = Counter()
        self._queues: dict[int, asyncio.Queue[tuple[dict[str, Any], memoryview] | None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        others = [r for r in view if r != me]
        for j, spans in enumerate(self._spans):
            if me in self.owners(j):
                for r in others:
                    self._expect[r] += len(spans)
            else:
                self._expect[view[j]] += len(spans)
        self._left = sum(len(spans) for spans in self._spans)

    def owners(self, shard: int) -> tuple[int, ...]:
        return self.view if self.topology == "all_to_all" else (self.view[shard],)

    def shard(self, tensor: Tensor, shard: int) -> Tensor:
        lo, hi = self._bounds[shard]
        return tensor[lo:hi]

    # -- sending ------------------------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for rank in self.view:
            if rank != self.me:
                self._queues[rank] = asyncio.Queue()
                self._tasks.append(loop.create_task(self._pump(rank)))
        for j, spans in enumerate(self._spans):
            view = byte_view(self.shard(self.flat, j))
            for k, (off, length) in enumerate(spans):
                for owner in self.owners(j):
                    if owner != self.me:
                        self._queues[owner].put_nowait(
                            (self._header("rs", j, k, off, length), view[off : off + length])
                        )
                if self.me in self.owners(j) and len(self.view) == 1:
                    self._reduce(j, k)

    def _header(self, phase: str, shard: int, chunk: int, offset: int, length: int) -> dict[str, Any]:
        lo, hi = self._bounds[shard]
        head = ChunkHeader(self.step, self.me, shard, chunk, offset, "float32", (hi - lo,), length)
        return {"t": "chunk", "ph": phase, "ballot": list(self.ballot), **head.to_wire()}

    async def _pump(self, rank: int) -> None:
        queue = self._queues[rank]
        while True:
            item = await queue.get()
            if item is None:
                return
            try:
                await self._send(rank, *item)
            except MLNodeError as exc:
                log.warning("allreduce_send_stopped", step=self.step, peer=rank, error=exc.message)
                return

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        for entries in self._pending.values():
            for _, msg in entries.values():
                self._ack(msg)
        self._pending.clear()

    # -- receiving ----------------------------------------------------------------------------
    def waiting_on(self) -> set[int]:
        """Ranks that still owe this rank chunks."""
        return {r for r, n in self._expect.items() if self._got[r] < n}

    def handle(self, sender: int, header: Mapping[str, Any], payload: memoryview | None, msg: Any) -> None:
        """Take one chunk of this ballot; ProtocolError (and the chunk acked) if it does not fit."""
        try:
            consumed = self._take(sender, header, payload, msg)
        except ProtocolError:
            self._ack(msg)
            raise
        if consumed:
            self._ack(msg)

    def _take(self, sender: int, header: Mapping[str, Any], payload: memoryview | None, msg: Any) -> bool:
        head = ChunkHeader.from_wire(header)
        phase = header.get("ph")
        if head.rank != sender or sender not in self.view or sender == self.me:
            raise ProtocolError(
                f"chunk from rank {sender} claims rank {head.rank} or comes from outside the view"
            )
        j, k = head.tensor, head.chunk
        if j >= len(self._bounds):
            raise ProtocolError(f"chunk for shard {j} of a {len(self._bounds)}-shard all-reduce")
        data = payload if payload is not None else memoryview(b"")
        check_fits(head, self.shard(self.result, j), self.chunk_bytes, len(data))
        lo = self._bounds[j][0] + head.offset // 4
        hi = lo + head.nbytes // 4
        if phase == "rs":
            if self.me not in self.owners(j):
                raise ProtocolError(
                    f"rank {sender} sent shard {j} to rank {self.me}, which does not reduce it"
                )
            entries = self._pending.setdefault((j, k), {})
            if sender in entries or (j, k) in self._reduced:
                raise ProtocolError(f"rank {sender} sent chunk {k} of shard {j} twice")
            part = torch.frombuffer(data, dtype=torch.float32) if len(data) else torch.empty(0)
            entries[sender] = (part, msg)
            self._got[sender] += 1
            if len(entries) == len(self.view) - 1:
                self._reduce(j, k)
            return False
        if phase == "ag":
            if self.topology != "scatter_gather" or sender != self.view[j] or (j, k) in self._gathered:
                raise ProtocolError(f"unexpected gathered chunk {k} of shard {j} from rank {sender}")
            if len(data):
                self.result[lo:hi].copy_(torch.frombuffer(data, dtype=torch.float32))
            self._gathered.add((j, k))
            self._got[sender] += 1
            self._finish_one()
            return True
        raise ProtocolError(f"chunk phase must be 'rs' or 'ag', got {phase!r}"[:80])

    def _reduce(self, j: int, k: int) -> None:
        off, length = self._spans[j][k]
        lo = self._bounds[j][0] + off // 4
        hi = lo + length // 4
        entries = self._pending.pop((j, k), {})
        parts: dict[int, list[Tensor]] = {rank: [part] for rank, (part, _msg) in entries.items()}
        parts[self.me] = [self.flat[lo:hi]]
        if hi > lo:
            self.result[lo:hi].copy_(self._reduce_fn(parts)[0])
        for _part, msg in entries.values():
            self._ack(msg)
        self._reduced.add((j, k))
        if self.topology == "scatter_gather":
            view = byte_view(self.shard(self.result, j))
            for rank in self.view:
                if rank != self.me:
                    self._queues[rank].put_nowait(
                        (self._header("ag", j, k, off, length), view[off : off + length])
                    )
        self._finish_one()

    def _finish_one(self) -> None:
        self._left -= 1
        if self._left == 0 and not self.complete:
            self.complete = True
            for queue in self._queues.values():
                queue.put_nowait(None)  # senders stop once everything queued has gone out
            self._on_complete()
