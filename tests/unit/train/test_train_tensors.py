"""Tensors as chunk frames: exact reassembly, and refusal of every chunk that does not fit."""

from __future__ import annotations

import asyncio
import weakref

import pytest
import torch

from contracts.collective import Chunk, TensorSpec
from node.errors import ProtocolError
from services.train.collective.buffers import Buffers
from services.train.collective.exchange import Exchange, chunk_elements
from services.train.collective.faults import PeerFault
from services.train.collective.tensors import TensorAssembler, byte_view, chunk_spans, iter_chunks, spec_of
from services.train.compression import BLOCK, Codec, fixed_order_mean

CHUNK = 4096


def test_tensor_chunks_reassemble_exactly() -> None:
    tensors = [torch.randn(3, 1000), torch.arange(7, dtype=torch.int64), torch.zeros(0), torch.tensor(2.5)]
    chunks = list(iter_chunks(tensors, CHUNK))
    assert len([c for c in chunks if c[0] == 0]) == len(chunk_spans(12000, CHUNK)) == 3
    asm = TensorAssembler([spec_of(f"t{i}", t) for i, t in enumerate(tensors)], CHUNK)
    for tensor, chunk, payload in reversed(chunks):  # any order
        assert asm.add(tensor, chunk, bytes(payload))
    assert asm.complete
    assert all(torch.equal(x, y) for x, y in zip(asm.tensors, tensors, strict=True))


def test_assembler_refuses_chunks_that_do_not_fit() -> None:
    asm = TensorAssembler([TensorSpec("w", "float32", (3000,))], CHUNK)
    bad = [
        (1, 0, CHUNK),  # no tensor 1
        (0, 3, CHUNK),  # past the end (3000 floats are 3 chunks: 0, 1, 2)
        (0, 0, CHUNK - 4),  # payload too short
        (0, 2, CHUNK),  # the last chunk is shorter than the others
    ]
    for tensor, chunk, size in bad:
        with pytest.raises(ProtocolError):
            asm.add(tensor, chunk, bytes(size))
    assert asm.add(0, 1, bytes(CHUNK))
    assert not asm.add(0, 1, bytes(CHUNK))  # a copy of a chunk already written is let go
    assert not asm.complete


def exchange_of(codec: str = "int8") -> tuple[Exchange, list[str]]:
    """Rank 0 of a two-rank exchange of 2048 values, sending nowhere; ``acks`` lists what it acked."""
    acked: list[str] = []

    async def send(rank: int, chunk: Chunk, payload: memoryview) -> None:
        return None

    exchange = Exchange(
        step=0, ballot=(1, 0), view=(0, 1), me=0, flat=torch.arange(2048, dtype=torch.float32),
        chunk_bytes=4096, topology="scatter_gather", reduce_fn=fixed_order_mean, send=send,
        ack=acked.append, on_complete=lambda: None, codec=Codec(codec),
    )
    exchange.start()
    return exchange, acked


def chunk(phase: str, shard: int, k: int = 0) -> Chunk:
    return Chunk(r=1, step=0, ballot=(1, 0), phase=phase, shard=shard, chunk=k)  # type: ignore[arg-type]


def test_an_exchange_takes_a_chunk_that_came_twice_once_and_acks_the_copy() -> None:
    """The link re-sends what a re-opened socket may not have delivered; sometimes it had."""
    async def run() -> tuple[list[str], Exchange]:
        exchange, acked = exchange_of()
        theirs = Codec("int8").encode(torch.ones(1024))
        for copy in ("rs-1", "rs-2"):
            exchange.handle(1, chunk("rs", 0), byte_view(theirs), copy)
        for copy in ("ag-1", "ag-2"):
            exchange.handle(1, chunk("ag", 1), byte_view(theirs), copy)
        exchange.cancel()
        return acked, exchange

    acked, exchange = asyncio.run(run())
    assert acked == ["rs-1", "rs-2", "ag-1", "ag-2"] and exchange.complete
    assert torch.equal(exchange.result[1024:], torch.ones(1024))


@pytest.mark.parametrize("codec", ["none", "fp16", "int8"])
def test_an_exchange_refuses_non_finite_values_from_a_peer_and_averages_nothing(codec: str) -> None:
    """NaN/inf from a peer, in its contribution or in the mean it gathers, is its fault alone (honest
    ranks check their own values): a PeerFault naming it, the chunk acked, nothing written or gathered."""
    wire = Codec(codec)
    poisons = {"nan": float("nan"), "inf": float("inf")}
    if codec == "none":
        poisons["overflow"] = 3e38  # finite, but the mean of two such values is not

    async def run() -> None:
        for name, value in poisons.items():
            values = torch.ones(1024)
            values[7] = value
            if codec == "int8":  # an encoder never makes a NaN/inf scale: forge the wire bytes
                payload = wire.encode(torch.ones(1024))
                payload[:4].view(torch.float32)[0] = value
            elif codec == "fp16":
                payload = values.to(torch.float16).view(torch.uint8)
            else:
                payload = values.view(torch.uint8)
            exchange, acked = exchange_of(codec)
            exchange.flat[:1024] = 3e38 if name == "overflow" else 1.0
            with pytest.raises(PeerFault, match="rank") as refused:
                exchange.handle(1, chunk("rs", 0), byte_view(payload), "rs")
            assert refused.value.ranks == {1} and acked == ["rs"], name
            assert not exchange._reduced  # nothing averaged, so nothing to gather either
            if name != "overflow":
                with pytest.raises(PeerFault, match="non-finite") as refused:
                    exchange.handle(1, chunk("ag", 1), byte_view(payload), "ag")
                assert refused.value.ranks == {1} and acked == ["rs", "ag"]
            assert not exchange.complete
            exchange.cancel()

    asyncio.run(run())


def test_compressed_chunks_carry_as_many_wire_bytes_as_float32_ones() -> None:
    """Compression sends fewer messages, not smaller ones; every chunk still fits the link's frame limit."""
    chunk = 1 << 20
    expected = {"none": chunk // 4, "fp16": chunk // 2, "int8": chunk // (BLOCK + 4) * BLOCK}
    for name, elements in expected.items():
        codec = Codec(name)
        assert chunk_elements(chunk, codec) == elements
        assert chunk - 4 * BLOCK < codec.wire_nbytes(elements) <= chunk
    assert chunk_elements(4096, Codec("int8")) == 3 * BLOCK
    assert chunk_elements(512, Codec("int8")) == BLOCK  # never less than one block


def test_buffers_come_back_for_the_next_step_and_other_sizes_are_let_go() -> None:
    pool = Buffers()
    first = [pool.take(1000), pool.take(1000)]
    odd = weakref.ref(pool.take(10))
    assert first[0].data_ptr() != first[1].data_ptr()
    pool.recycle()
    again = [pool.take(1000), pool.take(1000), pool.take(1000)]
    assert {t.data_ptr() for t in again[:2]} == {t.data_ptr() for t in first}
    assert again[2].data_ptr() not in {t.data_ptr() for t in first}  # a third one is new
    assert odd() is not None  # kept: a 10-element payload was used last time
    pool.recycle()  # sizes last used: 1000 only
    assert odd() is None
