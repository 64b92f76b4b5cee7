"""Tensors as chunked raw frames: how a tensor is cut, described and put back together, checked.

Peer links carry tensors as a small typed header plus one raw payload frame per chunk, so a big
tensor never becomes one giant message (``MAXMSGSIZE`` stays at the chunk size) and the receiver can
start working before the whole tensor arrived. A receiver allocates only tensors it expects
(:class:`~contracts.collective.TensorSpec`, compared with its own model first) and takes a chunk only
if it is one of the grid it expects, at its exact length: a peer with a different model, or a corrupt
frame, yields a :class:`~node.errors.ProtocolError`, never a write out of bounds or an allocation it
chose.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, get_args

import torch
from torch import Tensor

from contracts.collective import MIN_CHUNK_BYTES, DtypeName, TensorSpec
from node.errors import ProtocolError

DEFAULT_CHUNK_BYTES = 1 << 20

#: The dtypes a tensor may travel in, by their wire names (:data:`contracts.collective.DtypeName`).
DTYPES: dict[DtypeName, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
assert set(DTYPES) == set(get_args(DtypeName)), "the contract and the collective name the same dtypes"
_NAMES: dict[torch.dtype, DtypeName] = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> DtypeName:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ProtocolError(f"dtype {dtype} cannot travel over a peer link") from None


def spec_of(name: str, tensor: Tensor) -> TensorSpec:
    """How ``tensor`` is described on the wire under ``name``."""
    return TensorSpec(name, dtype_name(tensor.dtype), tuple(tensor.shape))


def spec_nbytes(spec: TensorSpec) -> int:
    return math.prod(spec.shape) * DTYPES[spec.dtype].itemsize


def check_chunk_bytes(chunk_bytes: int) -> int:
    """Chunks are whole multiples of 8 bytes so that no element of any dtype straddles two chunks."""
    if chunk_bytes < MIN_CHUNK_BYTES or chunk_bytes % 8:
        raise ValueError(f"chunk_bytes must be a multiple of 8 and >= {MIN_CHUNK_BYTES}, got {chunk_bytes}")
    return chunk_bytes


def chunk_spans(nbytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of every chunk of a ``nbytes``-long buffer; one empty chunk when it is empty."""
    if nbytes == 0:
        return [(0, 0)]
    return [(off, min(chunk_bytes, nbytes - off)) for off in range(0, nbytes, chunk_bytes)]


def byte_view(tensor: Tensor) -> memoryview:
    """A zero-copy view of a contiguous CPU tensor's bytes (ZeroMQ sends straight from it)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("byte_view needs a contiguous CPU tensor")
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    array: Any = flat.view(torch.uint8).numpy()
    return memoryview(array)


def iter_chunks(tensors: Sequence[Tensor], chunk_bytes: int) -> Iterator[tuple[int, int, memoryview]]:
    """``(tensor index, chunk index, zero-copy payload)`` of every chunk of ``tensors`` (contiguous, CPU)."""
    for i, tensor in enumerate(tensors):
        view = byte_view(tensor)
        for k, (off, length) in enumerate(chunk_spans(len(view), chunk_bytes)):
            yield i, k, view[off : off + length]


class TensorAssembler:
    """Fills tensors from chunks, refusing any chunk that is not one of the plan's, at its length.

    The tensors are allocated here, so the caller must have checked ``specs`` against what it expects
    (a state transfer compares them with its own model). :attr:`complete` turns true when every
    chunk of every tensor has been written.
    """

    def __init__(self, specs: Sequence[TensorSpec], chunk_bytes: int):
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        self.tensors = [torch.empty(spec.shape, dtype=DTYPES[spec.dtype]) for spec in specs]
        self._views = [byte_view(t) for t in self.tensors]
        self._spans = [chunk_spans(len(view), chunk_bytes) for view in self._views]
        self._missing = [set(range(len(spans))) for spans in self._spans]
        self._left = sum(len(m) for m in self._missing)

    @property
    def complete(self) -> bool:
        return self._left == 0

    def add(self, tensor: int, chunk: int, payload: memoryview | bytes) -> bool:
        """Write chunk ``chunk`` of tensor ``tensor``; False for a copy of one already written."""
        if tensor >= len(self.tensors):
            raise ProtocolError(f"chunk for tensor {tensor} of a stream of {len(self.tensors)} tensors")
        spans = self._spans[tensor]
        if chunk >= len(spans):
            raise ProtocolError(f"chunk {chunk} of tensor {tensor}, which has {len(spans)} chunks")
        offset, length = spans[chunk]
        if len(payload) != length:
            raise ProtocolError(
                f"chunk {chunk} of tensor {tensor} carries {len(payload)} bytes, expected {length}"
            )
        if chunk not in self._missing[tensor]:
            return False
        if length:
            self._views[tensor][offset : offset + length] = payload
        self._missing[tensor].discard(chunk)
        self._left -= 1
        return True
