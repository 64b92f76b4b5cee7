"""Tensors as chunked raw frames: the header that describes a chunk, and the code that checks it.

Peer links carry tensors as a small msgpack header plus one raw payload frame per chunk, so a big
tensor never becomes one giant message (``MAXMSGSIZE`` stays at the chunk size) and the receiver can
start working before the whole tensor arrived. Everything a chunk header claims is checked against
what the receiver expects before a byte of its payload is used: a peer with a different model, or a
corrupt frame, yields a :class:`~node.errors.ProtocolError`, never a write out of bounds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from node.errors import ProtocolError

DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 4096

#: Wire names of the dtypes a peer may send; anything else is refused.
DTYPES: dict[str, torch.dtype] = {
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
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_DIMS = 16


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ProtocolError(f"dtype {dtype} cannot travel over a peer link") from None


def parse_dtype(name: Any) -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise ProtocolError(f"chunk header field 'dtype' is not a known dtype: {name!r}"[:200])
    return DTYPES[name]


def parse_shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or len(value) > _MAX_DIMS:
        raise ProtocolError("chunk header field 'shape' must be a list of at most 16 sizes")
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 40 for n in value):
        raise ProtocolError("chunk header field 'shape' holds a size that is not a non-negative integer")
    return tuple(value)


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


@dataclass(frozen=True)
class ChunkHeader:
    """What one chunk frame holds: bytes ``[offset, offset+nbytes)`` of tensor ``tensor``."""

    step: int
    rank: int
    tensor: int
    chunk: int
    offset: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "rank": self.rank,
            "tensor": self.tensor,
            "chunk": self.chunk,
            "offset": self.offset,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
        }

    @classmethod
    def from_wire(cls, doc: Mapping[str, Any]) -> ChunkHeader:
        values = {}
        for name in ("step", "rank", "tensor", "chunk", "offset", "nbytes"):
            value = doc.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ProtocolError(f"chunk header field {name!r} must be a non-negative integer")
            values[name] = value
        dtype = doc.get("dtype")
        parse_dtype(dtype)
        return cls(dtype=str(dtype), shape=parse_shape(doc.get("shape")), **values)


def iter_chunks(
    tensors: Sequence[Tensor], chunk_bytes: int, *, step: int, rank: int, first_index: int = 0
) -> Iterator[tuple[ChunkHeader, memoryview]]:
    """Headers and zero-copy payloads of every chunk of ``tensors`` (contiguous CPU tensors)."""
    for i, tensor in enumerate(tensors):
        view = byte_view(tensor)
        name = dtype_name(tensor.dtype)
        shape = tuple(tensor.shape)
        for k, (off, length) in enumerate(chunk_spans(len(view), chunk_bytes)):
            header = ChunkHeader(step, rank, first_index + i, k, off, name, shape, length)
            yield header, view[off : off + length]


class TensorAssembler:
    """Fills preallocated tensors from chunks, refusing any chunk that does not fit the plan exactly.

    Each chunk must carry the dtype and shape the receiver expects, sit on the chunk grid, and arrive
    once; :attr:`complete` turns true when every byte of every tensor has been written.
    """

    def __init__(self, dtypes: Sequence[torch.dtype], shapes: Sequence[Sequence[int]], chunk_bytes: int):
        if len(dtypes) != len(shapes):
            raise ProtocolError("tensor stream declares a different number of dtypes and shapes")
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        self.tensors = [
            torch.empty(tuple(shape), dtype=dtype) for dtype, shape in zip(dtypes, shapes, strict=True)
        ]
        self._views = [byte_view(t) for t in self.tensors]
        self._missing = [
            {k for k, _ in enumerate(chunk_spans(len(view), chunk_bytes))} for view in self._views
        ]
        self._left = sum(len(m) for m in self._missing)

    @property
    def complete(self) -> bool:
        return self._left == 0

    def add(self, header: ChunkHeader, payload: memoryview | bytes) -> None:
        i = header.tensor
        if i >= len(self.tensors):
            raise ProtocolError(f"chunk for tensor {i} of a stream of {len(self.tensors)} tensors")
        check_fits(header, self.tensors[i], self.chunk_bytes, len(payload))
        if header.chunk not in self._missing[i]:
            raise ProtocolError(f"chunk {header.chunk} of tensor {i} arrived twice")
        if header.nbytes:
            self._views[i][header.offset : header.offset + header.nbytes] = payload
        self._missing[i].discard(header.chunk)
        self._left -= 1


def check_fits(header: ChunkHeader, target: Tensor, chunk_bytes: int, payload_len: int) -> None:
    """Raise ProtocolError unless ``header`` names an on-grid chunk of ``target`` and the payload matches."""
    if header.dtype != dtype_name(target.dtype) or header.shape != tuple(target.shape):
        raise ProtocolError(
            f"chunk of tensor {header.tensor} is {header.dtype}{list(header.shape)}, "
            f"expected {dtype_name(target.dtype)}{list(target.shape)}"
        )
    total = target.numel() * target.element_size()
    count = max(1, -(-total // chunk_bytes))
    offset = header.chunk * chunk_bytes
    if header.chunk >= count or (header.offset, header.nbytes) != (offset, min(chunk_bytes, total - offset)):
        raise ProtocolError(
            f"chunk {header.chunk} of tensor {header.tensor} claims bytes "
            f"[{header.offset}, {header.offset + header.nbytes}) off the {chunk_bytes}-byte grid"
        )
    if payload_len != header.nbytes:
        raise ProtocolError(f"chunk payload is {payload_len} bytes, its header says {header.nbytes}")
