"""Tensors as chunk frames: exact reassembly, and refusal of every chunk that does not fit."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import pytest
import torch

from node.errors import ProtocolError
from services.train.collective.buffers import Buffers
from services.train.collective.exchange import Exchange, chunk_elements
from services.train.collective.tensors import ChunkHeader, TensorAssembler, chunk_spans, iter_chunks
from services.train.compression import BLOCK, Codec, fixed_order_mean

CHUNK = 4096


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


def test_an_exchange_takes_a_chunk_that_came_twice_once_and_acks_the_copy() -> None:
    """The link re-sends what a re-opened socket may not have delivered; sometimes it had."""
    async def run() -> tuple[list[str], Exchange]:
        acked: list[str] = []

        async def send(rank: int, header: dict[str, Any], payload: memoryview) -> None:
            return None

        flat = torch.arange(2048, dtype=torch.float32)
        exchange = Exchange(
            step=0, ballot=(1, 0), view=(0, 1), me=0, flat=flat, chunk_bytes=4096, topology="scatter_gather",
            reduce_fn=fixed_order_mean, send=send, ack=acked.append, on_complete=lambda: None,
            codec=Codec("int8"),
        )
        exchange.start()
        theirs = Codec("int8").encode(torch.ones(1024))
        rs = {"t": "chunk", "ph": "rs", "ballot": [1, 0], "step": 0, "rank": 1, "tensor": 0, "chunk": 0,
              "offset": 0, "dtype": "int8", "shape": [1024], "nbytes": theirs.numel()}
        for copy in ("rs-1", "rs-2"):
            exchange.handle(1, rs, memoryview(theirs.numpy()), copy)
        ag = {**rs, "ph": "ag", "tensor": 1}
        for copy in ("ag-1", "ag-2"):
            exchange.handle(1, ag, memoryview(theirs.numpy()), copy)
        exchange.cancel()
        return acked, exchange

    acked, exchange = asyncio.run(run())
    assert acked == ["rs-1", "rs-2", "ag-1", "ag-2"] and exchange.complete
    assert torch.equal(exchange.result[1024:], torch.ones(1024))


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
