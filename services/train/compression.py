"""How pseudo-gradients travel between nodes: ``none`` (float32), ``fp16``, or ``int8`` (a scale per block).

A codec turns a flat float32 payload into its wire bytes and back. Everything here is element- or
block-wise on a grid fixed by the *global* flat index (blocks of :data:`BLOCK` elements from 0), so
encoding a block-aligned slice gives the same bytes as slicing the encoded whole. That is what lets
the exchange quantise shards and chunks independently while every node, and the one-process
simulation, compute the same bits: :func:`compressed_mean` is the reference the network reproduces.

int8 follows INTELLECT-1's outer all-reduce: scale = absmax / 127 per block, values rounded to
nearest (ties to even), the scale travelling as float32 next to the block's bytes. Non-finite
input is refused: a NaN or inf would silently poison every node's weights (and has no int8 form).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from node.errors import InvalidRequest, ProtocolError

COMPRESSIONS = ("none", "fp16", "int8")
#: Elements per int8 scale. Shards and chunks are cut on this grid, so it must never change between
#: nodes of one run; 1024 keeps the scales at 0.4 % of the int8 bytes.
BLOCK = 1024
_FP16_MAX = float(torch.finfo(torch.float16).max)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class NonFinitePseudoGradient(InvalidRequest):
    """The pseudo-gradient holds NaN or inf (the inner loop diverged); it is never sent."""


@dataclass(frozen=True)
class Codec:
    """One wire format for float32 payloads; ``name`` is what ``train_config.diloco.compression`` says."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in COMPRESSIONS:
            raise InvalidRequest(
                f"compression must be one of {', '.join(COMPRESSIONS)}, got {self.name!r}"[:200]
            )

    @property
    def wire_dtype(self) -> str:
        """What chunk headers name as their dtype, so a peer with another codec is refused."""
        return {"none": "float32", "fp16": "float16", "int8": "int8"}[self.name]

    @property
    def align(self) -> int:
        """Element grid every slice handed to :meth:`encode` must start on (except the whole's end)."""
        return BLOCK if self.name == "int8" else 1

    def wire_nbytes(self, numel: int) -> int:
        """Bytes on the wire for ``numel`` elements starting on the grid."""
        if self.name == "none":
            return 4 * numel
        if self.name == "fp16":
            return 2 * numel
        return numel + 4 * -(-numel // BLOCK)

    def check(self, flat: Tensor) -> None:
        """Refuse what this format cannot carry (NaN/inf; beyond float16's range for fp16)."""
        _check_flat(flat)
        check_finite(flat)
        if self.name == "fp16" and flat.numel():
            low, high = torch.aminmax(flat)
            peak = max(-float(low), float(high))
            if peak > _FP16_MAX:
                raise NonFinitePseudoGradient(
                    f"a pseudo-gradient value ({peak:.3g}) exceeds the float16 range; "
                    "use compression int8 or none"
                )

    def encode(self, flat: Tensor, *, checked: bool = False) -> Tensor:
        """The wire form (a contiguous 1-D CPU tensor) of a flat float32 slice starting on the grid.

        int8 lays out the block scales (float32) first, then the int8 values. ``checked``: the caller
        already ran :meth:`check` on the whole payload (the exchange encodes it chunk by chunk).
        """
        if checked:
            _check_flat(flat)
        else:
            self.check(flat)
        if self.name == "none":
            return flat.contiguous()
        if self.name == "fp16":
            return flat.to(torch.float16)
        n = flat.numel()
        blocks = -(-n // BLOCK)
        if n == blocks * BLOCK:
            grid = flat.contiguous().view(blocks, BLOCK)
        else:
            grid = torch.zeros(blocks * BLOCK, dtype=torch.float32)
            grid[:n] = flat
            grid = grid.view(blocks, BLOCK)
        out = torch.empty(4 * blocks + n, dtype=torch.uint8)
        if not blocks:
            return out
        scale = out[: 4 * blocks].view(torch.float32)
        # absmax as max(max, -min): two read-only passes instead of writing |grid| out first
        torch.maximum(grid.amax(dim=1), grid.amin(dim=1).neg_(), out=scale).div_(127.0)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        # The clamp matters only for subnormal blocks, whose rounded scale can fall short of absmax/127.
        q = torch.div(grid, safe[:, None]).round_().clamp_(-127, 127)
        out[4 * blocks :].view(torch.int8).copy_(q.view(-1)[:n])
        return out

    def decode(self, wire: Tensor | memoryview | bytes, numel: int, out: Tensor | None = None) -> Tensor:
        """Float32 values of an encoded slice of ``numel`` elements: written into ``out`` when given
        (it saves the copy), else new (for ``none``, a view of ``wire``)."""
        raw = _as_bytes(wire)
        if raw.numel() != self.wire_nbytes(numel):
            raise InvalidRequest(f"{self.name} payload of {raw.numel()} bytes cannot hold {numel} elements")
        if out is not None and (out.dtype != torch.float32 or out.shape != (numel,)):
            raise ValueError(f"decode writes {numel} float32 values into a 1-D tensor of that size")
        if self.name == "none":
            values = raw.view(torch.float32)
            return values if out is None else out.copy_(values)
        if out is None:
            out = torch.empty(numel, dtype=torch.float32)
        if self.name == "fp16":
            return out.copy_(raw.view(torch.float16))
        blocks = -(-numel // BLOCK)
        scale = raw[: 4 * blocks].view(torch.float32)
        q = raw[4 * blocks :].view(torch.int8)
        full = numel // BLOCK
        body = full * BLOCK  # converting first, then scaling in place, beats a mixed-dtype multiply
        out[:body].view(full, BLOCK).copy_(q[:body].view(full, BLOCK)).mul_(scale[:full, None])
        if full < blocks:  # the last, partial block
            out[body:].copy_(q[body:]).mul_(scale[full])
        return out

    def roundtrip(self, flat: Tensor) -> Tensor:
        """What every node holds after ``flat`` went over the wire."""
        if self.name == "none":
            check_finite(flat)
            return flat
        return self.decode(self.encode(flat), flat.numel())


def all_finite(values: Tensor) -> bool:
    """True unless ``values`` (a floating-point tensor) holds NaN or inf.

    One allocation-free pass: any NaN/inf makes the sum non-finite; only then (or on an overflowing
    sum of finite values) look closer.
    """
    return not values.numel() or math.isfinite(float(values.sum())) or bool(torch.isfinite(values).all())


def check_finite(flat: Tensor) -> None:
    """Refuse NaN/inf clearly: averaged in, they would silently wreck every node's weights."""
    if not all_finite(flat):
        bad = int((~torch.isfinite(flat)).sum())
        raise NonFinitePseudoGradient(
            f"the pseudo-gradient holds {bad} non-finite value(s) (NaN/inf): the inner loop diverged; "
            "lower optim.lr or resume from an earlier checkpoint"
        )


def flatten(tensors: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
    """One contiguous float32 CPU copy of all tensors (the payload of an all-reduce), into ``out`` if
    given (a 1-D float32 tensor of exactly their total size)."""
    if not tensors:
        return torch.empty(0, dtype=torch.float32) if out is None else out
    parts = [t.detach().reshape(-1).to(device="cpu", dtype=torch.float32) for t in tensors]
    return torch.cat(parts) if out is None else torch.cat(parts, out=out)


def unflatten(flat: Tensor, shapes: Sequence[tuple[int, ...]]) -> list[Tensor]:
    """Views of ``flat`` shaped like the tensors :func:`flatten` joined."""
    out = []
    offset = 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(flat[offset : offset + n].view(shape))
        offset += n
    return out


def fixed_order_mean(tensors_by_rank: Mapping[int, Sequence[Tensor]]) -> list[Tensor]:
    """Element-wise float32 mean, summed in ascending rank order.

    Float addition is not associative, so nodes that summed in arrival order would drift apart;
    a fixed order makes every node that holds the same inputs compute the same bits.
    """
    if not tensors_by_rank:
        raise InvalidRequest("nothing to average: no rank contributed")
    ranks = sorted(tensors_by_rank)
    reference = tensors_by_rank[ranks[0]]
    for rank in ranks[1:]:
        tensors = tensors_by_rank[rank]
        if len(tensors) != len(reference):
            raise ProtocolError(
                f"rank {rank} sent {len(tensors)} pseudo-gradients, rank {ranks[0]} sent {len(reference)}"
            )
        for i, (tensor, ref) in enumerate(zip(tensors, reference, strict=True)):
            if tensor.shape != ref.shape:
                raise ProtocolError(
                    f"pseudo-gradient {i} from rank {rank} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(ref.shape)}"
                )
    out = []
    for i, ref in enumerate(reference):
        terms = [tensors_by_rank[rank][i].to(device=ref.device, dtype=torch.float32) for rank in ranks]
        # first + second in one pass (no zeros to add to, no copy of the first), then the rest in order
        acc = torch.add(terms[0], terms[1]) if len(terms) > 1 else terms[0].clone()
        for term in terms[2:]:
            acc.add_(term)
        out.append(acc.div_(len(ranks)))
    return out


def compressed_mean(tensors_by_rank: Mapping[int, Sequence[Tensor]], codec: Codec) -> list[Tensor]:
    """The reference the peer exchange reproduces bit for bit.

    Each contribution is what its rank sends (encoded, decoded), the mean is the fixed-rank-order
    float32 mean, and the mean itself goes over the wire once more (the all-gather) in the same format.
    """
    for tensors in tensors_by_rank.values():
        codec.check(flatten(tensors))
    if codec.name == "none":
        return fixed_order_mean(tensors_by_rank)
    ranks = sorted(tensors_by_rank)
    shapes = [tuple(t.shape) for t in tensors_by_rank[ranks[0]]] if ranks else []
    for rank in ranks:
        if [tuple(t.shape) for t in tensors_by_rank[rank]] != shapes:
            raise ProtocolError(f"rank {rank}'s pseudo-gradients are shaped unlike rank {ranks[0]}'s")
    sent = {rank: [codec.roundtrip(flatten(tensors_by_rank[rank]))] for rank in ranks}
    (mean,) = fixed_order_mean(sent)
    return unflatten(codec.roundtrip(mean), shapes)


def _check_flat(flat: Tensor) -> None:
    if flat.dtype != torch.float32 or flat.dim() != 1 or flat.device.type != "cpu":
        raise ValueError("a codec encodes one 1-D float32 CPU tensor")


def _as_bytes(wire: Tensor | memoryview | bytes) -> Tensor:
    if isinstance(wire, Tensor):
        if not wire.numel():
            return torch.empty(0, dtype=torch.uint8)
        return wire.contiguous().view(-1).view(torch.uint8)
    if len(wire) == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(wire, dtype=torch.uint8)
