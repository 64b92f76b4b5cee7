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

With a compressing :class:`~services.train.compression.Codec` (``fp16``, ``int8``) every chunk
travels encoded, both ways: a contributor encodes its own chunks (and reduces its own share from the
decoded form, exactly what the others receive), and a reducer encodes the mean before gathering it
and keeps the decoded form itself. Shards and chunks are cut on the codec's block grid, so each chunk
encodes exactly as the matching slice of the whole payload would: the result equals
:func:`~services.train.compression.compressed_mean` whatever the view.

Nothing a peer sends is averaged in unchecked. Each mean is checked for NaN/inf right after it is
computed, while its chunk is still in cache (one allocation-free sum): if it is not finite, a
contribution was not (or was so large the sum overflowed), and those contributors are a
:class:`~.faults.PeerFault` — the chunk never reaches the result or the all-gather. Every gathered
chunk is checked the same way as it is decoded. Honest ranks check their own payload before sending
(:meth:`~services.train.compression.Codec.check`), so only a broken or hostile peer trips these.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from contracts.collective import Chunk
from node.errors import MLNodeError, ProtocolError
from node.logging import get_logger
from services.train.collective.faults import PeerFault
from services.train.collective.tensors import byte_view, check_chunk_bytes, chunk_spans
from services.train.compression import FLOAT32_MAX, Codec, NonFinitePseudoGradient, all_finite

log = get_logger(__name__)

TOPOLOGIES = ("scatter_gather", "all_to_all")

ReduceFn = Callable[[Mapping[int, Sequence[Tensor]]], list[Tensor]]
SendFn = Callable[[int, Chunk, memoryview], Awaitable[None]]
#: What a sender queue holds: makes one chunk's header and payload when its turn comes.
Outgoing = Callable[[], tuple[Chunk, memoryview]]


def shard_bounds(numel: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """``parts`` contiguous element ranges covering ``[0, numel)``, starting on multiples of ``align``,
    sizes differing by at most ``align``."""
    units = -(-numel // align)
    return list(itertools.pairwise(min(numel, units * j // parts * align) for j in range(parts + 1)))


def chunk_elements(chunk_bytes: int, codec: Codec) -> int:
    """Elements per chunk: as many as ``chunk_bytes`` of the wire form hold, on the codec's block grid.

    Sized by wire bytes, compression sends fewer messages rather than smaller ones: each message costs
    the same handling (header, credit, ack) whatever its size.
    """
    if codec.align == 1:
        return chunk_bytes // codec.wire_nbytes(1)
    return max(1, chunk_bytes // codec.wire_nbytes(codec.align)) * codec.align


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
        codec: Codec | None = None,
        result: Tensor | None = None,
    ) -> None:
        if topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}")
        if flat.dtype != torch.float32 or flat.dim() != 1 or not flat.is_contiguous():
            raise ValueError("the all-reduce payload must be one contiguous 1-D float32 tensor")
        self.step, self.ballot, self.view, self.me = step, ballot, view, me
        self.flat = flat
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        self.topology = topology
        self.codec = codec if codec is not None else Codec("none")
        if result is not None and (result.dtype != flat.dtype or result.shape != flat.shape):
            raise ValueError("the result buffer must be shaped like the payload")
        #: Where the mean lands (a buffer the caller reuses, or a fresh one).
        self.result = result if result is not None else torch.empty_like(flat)
        self.complete = False
        self._reduce_fn = reduce_fn
        self._send = send
        self._ack = ack
        self._on_complete = on_complete
        self._bounds = shard_bounds(flat.numel(), len(view), self.codec.align)
        per_chunk = chunk_elements(self.chunk_bytes, self.codec)
        # (element offset in the shard, element count) of every chunk of every shard
        self._spans = [chunk_spans(hi - lo, per_chunk) for lo, hi in self._bounds]
        #: This rank's own chunks in wire form, encoded when first needed (sent, or reduced here).
        self._wires: dict[tuple[int, int], Tensor] = {}
        self._pending: dict[tuple[int, int], dict[int, tuple[memoryview, Any]]] = {}
        self._reduced: set[tuple[int, int]] = set()
        self._gathered: set[tuple[int, int]] = set()
        self._expect: Counter[int] = Counter()
        self._got: Counter[int] = Counter()
        self._queues: dict[int, asyncio.Queue[Outgoing | None]] = {}
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
        # Chunks are encoded by the sender tasks as their turn comes, not all up front: encoding
        # then overlaps with ZeroMQ's I/O thread encrypting and sending the previous chunks.
        for j, spans in enumerate(self._spans):
            for k in range(len(spans)):
                for owner in self.owners(j):
                    if owner != self.me:
                        self._queues[owner].put_nowait(functools.partial(self._contribution, j, k))
                if self.me in self.owners(j) and len(self.view) == 1:
                    self._reduce(j, k)

    def _wire(self, j: int, k: int) -> Tensor:
        """This rank's chunk ``(j, k)`` as it travels (encoded once, whoever asks first)."""
        wire = self._wires.get((j, k))
        if wire is None:
            off, length = self._spans[j][k]
            lo = self._bounds[j][0] + off
            wire = self.codec.encode(self.flat[lo : lo + length], checked=True)  # the group checked
            self._wires[(j, k)] = wire
        return wire

    def _contribution(self, j: int, k: int) -> tuple[Chunk, memoryview]:
        return self._chunk("rs", j, k), byte_view(self._wire(j, k))

    def _chunk(self, phase: Literal["rs", "ag"], shard: int, chunk: int) -> Chunk:
        return Chunk(r=self.me, step=self.step, ballot=self.ballot, phase=phase, shard=shard, chunk=chunk)

    async def _pump(self, rank: int) -> None:
        queue = self._queues[rank]
        while True:
            item = await queue.get()
            if item is None:
                return
            try:
                await self._send(rank, *item())
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

    def handle(self, sender: int, chunk: Chunk, payload: memoryview | None, msg: Any) -> None:
        """Take one chunk of this ballot from ``sender``; ProtocolError (and the chunk acked) if it does
        not fit, :class:`~.faults.PeerFault` if values in it (or in the mean it completed) are not finite."""
        try:
            consumed = self._take(sender, chunk, payload, msg)
        except _Consumed as exc:  # refused by the reduction, which acked every chunk it took
            raise exc.fault from None
        except ProtocolError:
            self._ack(msg)
            raise
        if consumed:
            self._ack(msg)

    def _take(self, sender: int, chunk: Chunk, payload: memoryview | None, msg: Any) -> bool:
        if sender not in self.view or sender == self.me:
            raise ProtocolError(f"chunk from rank {sender}, which is outside the view {list(self.view)}")
        j, k = chunk.shard, chunk.chunk
        data = payload if payload is not None else memoryview(b"")
        self._check_fits(j, k, len(data))
        off, length = self._spans[j][k]
        lo = self._bounds[j][0] + off
        hi = lo + length
        if chunk.phase == "rs":
            if self.me not in self.owners(j):
                raise ProtocolError(
                    f"rank {sender} sent shard {j} to rank {self.me}, which does not reduce it"
                )
            entries = self._pending.setdefault((j, k), {})
            if sender in entries or (j, k) in self._reduced:
                return _duplicate(self.step, sender, chunk.phase, j, k)
            entries[sender] = (data, msg)
            self._got[sender] += 1
            if len(entries) == len(self.view) - 1:
                try:
                    self._reduce(j, k)
                except PeerFault as fault:
                    raise _Consumed(fault) from None
            return False
        if self.topology != "scatter_gather" or sender != self.view[j]:
            raise ProtocolError(f"unexpected gathered chunk {k} of shard {j} from rank {sender}")
        if (j, k) in self._gathered:
            return _duplicate(self.step, sender, chunk.phase, j, k)
        if hi > lo:
            mean = self.codec.decode(data, hi - lo, out=self.result[lo:hi])
            if not all_finite(mean):  # the chunk is still in cache: one more read of it, no allocation
                raise PeerFault(
                    f"rank {sender} gathered non-finite values (NaN/inf) into shard {j} at step {self.step}",
                    (sender,),
                )
        self._gathered.add((j, k))
        self._got[sender] += 1
        self._finish_one()
        return True

    def _check_fits(self, j: int, k: int, payload_len: int) -> None:
        """Refuse a chunk unless it is exactly one chunk of this exchange's grid, in its format."""
        if j >= len(self._spans) or k >= len(self._spans[j]):
            raise ProtocolError(
                f"chunk {k} of shard {j} is off the grid of this {len(self._spans)}-shard all-reduce"
            )
        expected = self.codec.wire_nbytes(self._spans[j][k][1])
        if payload_len != expected:
            raise ProtocolError(
                f"chunk {k} of shard {j} carries {payload_len} bytes, expected {expected} "
                f"({self.codec.name} compression)"
            )

    def _reduce(self, j: int, k: int) -> None:
        off, length = self._spans[j][k]
        lo = self._bounds[j][0] + off
        hi = lo + length
        codec = self.codec
        entries = self._pending.pop((j, k), {})
        parts = {rank: [codec.decode(data, length)] for rank, (data, _msg) in entries.items()}
        # Our own share as every other rank would decode it (for none: the float32 slice itself).
        own = self._wire(j, k)
        parts[self.me] = [own if codec.name == "none" else codec.decode(own, length)]
        if self.topology == "scatter_gather":
            del self._wires[(j, k)]  # nobody else gets it
        wire: Tensor | None = None
        if hi > lo:
            mean = self._reduce_fn(parts)[0]
            if len(parts) > 1 and not all_finite(mean):  # one read of the fresh mean, no allocation
                for _data, msg in entries.values():
                    self._ack(msg)
                raise self._refusal(j, k, parts)
            if codec.name == "none":
                self.result[lo:hi].copy_(mean)
            else:
                wire = codec.encode(mean, checked=True)  # a mean of finite values
                codec.decode(wire, length, out=self.result[lo:hi])
        for _data, msg in entries.values():
            self._ack(msg)
        self._reduced.add((j, k))
        if self.topology == "scatter_gather":
            payload = byte_view(wire if wire is not None else self.result[lo:hi])
            gathered = (self._chunk("ag", j, k), payload)
            for rank in self.view:
                if rank != self.me:
                    self._queues[rank].put_nowait(functools.partial(_same, gathered))
        self._finish_one()

    def _finish_one(self) -> None:
        self._left -= 1
        if self._left == 0 and not self.complete:
            self.complete = True
            for queue in self._queues.values():
                queue.put_nowait(None)  # senders stop once everything queued has gone out
            self._on_complete()


    def _refusal(self, j: int, k: int, parts: Mapping[int, Sequence[Tensor]]) -> PeerFault:
        """Whose contribution made a mean non-finite: non-finite values, else (the sum overflowed) values
        beyond ``FLOAT32_MAX / len(view)``, the most a mean of the view can hold without overflowing."""
        peers = {rank: tensors[0] for rank, tensors in parts.items() if rank != self.me}
        bad = sorted(rank for rank, tensor in peers.items() if not bool(torch.isfinite(tensor).all()))
        what = "non-finite values (NaN/inf)"
        if not bad:
            limit = FLOAT32_MAX / len(self.view)
            bad = sorted(rank for rank, tensor in peers.items() if float(tensor.abs().max()) > limit)
            what = f"values beyond {limit:.3g} (their mean overflows float32)"
        if not bad:
            raise NonFinitePseudoGradient(
                f"this rank's pseudo-gradient holds values beyond {FLOAT32_MAX / len(self.view):.3g}: "
                "averaged over the view they overflow float32 (the inner loop diverged)"
            )
        return PeerFault(f"rank(s) {bad} sent {what} for shard {j}, chunk {k} at step {self.step}", bad)


class _Consumed(Exception):
    """A fault found by a reduction, which already acked every chunk it took (the current one too)."""

    def __init__(self, fault: PeerFault) -> None:
        super().__init__(fault.message)
        self.fault = fault


def _same(item: tuple[Chunk, memoryview]) -> tuple[Chunk, memoryview]:
    return item


def _duplicate(step: int, sender: int, phase: str, shard: int, chunk: int) -> bool:
    """A chunk that came twice: the link re-sends what a socket it re-opened may not have delivered,
    and sometimes it had. The first copy counts; the second is consumed (acked) without suspicion."""
    log.info("allreduce_duplicate_chunk", step=step, peer=sender, phase=phase, shard=shard, chunk=chunk)
    return True
