"""The pseudo-gradient wire formats: error bounds, same bits for any block-aligned slicing, refusals."""

from __future__ import annotations

import itertools

import pytest
import torch

from node.errors import InvalidRequest
from services.train.compression import (
    BLOCK,
    COMPRESSIONS,
    Codec,
    NonFinitePseudoGradient,
    compressed_mean,
    fixed_order_mean,
    flatten,
)


def sample(numel: int = 3 * BLOCK + 517, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Blocks of very different magnitudes: per-block scales must keep the small ones precise.
    scales = torch.logspace(-6, 1, -(-numel // BLOCK)).repeat_interleave(BLOCK)[:numel]
    return torch.randn(numel, generator=gen) * scales


def test_wire_sizes_are_what_the_bytes_on_the_wire_cost() -> None:
    n = 10 * BLOCK + 3
    x = sample(n)
    for name, size in {"none": 4 * n, "fp16": 2 * n, "int8": n + 4 * 11}.items():
        codec = Codec(name)
        assert codec.wire_nbytes(n) == size == codec.encode(x).numel() * codec.encode(x).element_size()
    assert Codec("int8").wire_nbytes(1 << 20) / Codec("none").wire_nbytes(1 << 20) < 0.252


def test_round_trip_error_is_bounded_per_block() -> None:
    x = sample()
    assert torch.equal(Codec("none").roundtrip(x), x)
    fp16 = Codec("fp16").roundtrip(x)
    # float16 keeps 11 significant bits; values below its normal range lose relative precision.
    assert torch.all((fp16 - x).abs() <= x.abs() * 2.0**-11 + 2.0**-25)
    int8 = Codec("int8").roundtrip(x)
    for lo in range(0, x.numel(), BLOCK):
        block, got = x[lo : lo + BLOCK], int8[lo : lo + BLOCK]
        half_step = float(block.abs().max()) / 127 / 2
        assert float((got - block).abs().max()) <= half_step * (1 + 1e-6)
        assert float(got.abs().max()) == pytest.approx(float(block.abs().max()), rel=1e-6)  # absmax exact


@pytest.mark.parametrize("name", COMPRESSIONS)
def test_encoding_is_deterministic_and_slices_on_the_block_grid_encode_as_the_whole(name: str) -> None:
    codec = Codec(name)
    x = sample(seed=3)
    whole = codec.roundtrip(x.clone())
    assert torch.equal(codec.encode(x), codec.encode(x.clone()))
    cuts = [0, BLOCK, 3 * BLOCK, x.numel()]
    parts = [codec.decode(codec.encode(x[a:b]), b - a) for a, b in itertools.pairwise(cuts)]
    assert torch.cat(parts).view(torch.int32).tolist() == whole.view(torch.int32).tolist()


def test_zeros_and_empty_payloads_stay_exact() -> None:
    int8 = Codec("int8")
    x = torch.zeros(2 * BLOCK)
    x[BLOCK + 5] = -3.0  # one block all zeros (scale 0), one with a single value
    out = int8.roundtrip(x)
    assert torch.equal(out, x)
    for name in COMPRESSIONS:
        codec = Codec(name)
        assert codec.encode(torch.empty(0)).numel() == 0
        assert codec.decode(codec.encode(torch.empty(0)), 0).numel() == 0


@pytest.mark.parametrize("name", COMPRESSIONS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pseudo_gradients_are_refused_not_sent(name: str, bad: float) -> None:
    x = sample()
    x[7] = bad
    with pytest.raises(NonFinitePseudoGradient, match="1 non-finite value"):
        Codec(name).encode(x)
    with pytest.raises(NonFinitePseudoGradient, match="diverged"):
        compressed_mean({0: [sample(seed=1)], 1: [x]}, Codec(name))


def test_subnormal_blocks_keep_their_signs() -> None:
    """A subnormal block's scale rounds below absmax/127, so values can divide out to 128: int8 must clamp,
    or the largest value would wrap around to -128."""
    tiny = torch.finfo(torch.float32).smallest_normal * 2.0**-23  # the smallest subnormal
    for multiple in (128, 255, 5000):
        x = torch.zeros(BLOCK)
        x[:3] = torch.tensor([multiple, -multiple, multiple - 1]) * tiny
        scale = float(x.abs().max()) / 127
        assert float((x / scale).abs().max()) > 127  # the case the clamp exists for
        got = Codec("int8").roundtrip(x)
        assert torch.equal(torch.sign(got[:3]), torch.sign(x[:3]))
        assert float((got - x).abs().max()) <= float(x.abs().max()) / 100  # subnormals: coarse, not wrong


@pytest.mark.parametrize("name", COMPRESSIONS)
def test_decode_into_a_given_tensor_writes_the_same_values_there(name: str) -> None:
    codec = Codec(name)
    x = sample(seed=5)
    wire = codec.encode(x)
    target = torch.full((x.numel() + 2,), 7.0)
    into = codec.decode(wire, x.numel(), out=target[1:-1])
    assert into.data_ptr() == target[1:].data_ptr()
    assert torch.equal(target[1:-1], codec.decode(wire, x.numel())) and target[0] == target[-1] == 7.0
    with pytest.raises(ValueError, match="1-D tensor of that size"):
        codec.decode(wire, x.numel(), out=target)


def test_fp16_refuses_values_beyond_its_range_and_names_the_way_out() -> None:
    x = torch.tensor([1.0, 7.0e4])
    with pytest.raises(NonFinitePseudoGradient, match=r"float16 range.*int8 or none"):
        Codec("fp16").encode(x)
    assert Codec("int8").roundtrip(x)[1] == pytest.approx(7.0e4)


def test_a_payload_of_the_wrong_length_or_an_unknown_format_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="cannot hold"):
        Codec("int8").decode(bytearray(100), 100)
    with pytest.raises(InvalidRequest, match="must be one of none, fp16, int8"):
        Codec("zstd")


def test_compressed_mean_is_the_mean_of_what_went_over_the_wire() -> None:
    shapes = [(37, 129), (5000,), (1,), (0,)]
    gen = torch.Generator().manual_seed(4)
    data = {r: [torch.randn(s, generator=gen) * 10 ** (r - 1) for s in shapes] for r in range(3)}
    assert all(
        torch.equal(a, b)
        for a, b in zip(compressed_mean(data, Codec("none")), fixed_order_mean(data), strict=True)
    )
    for name in ("fp16", "int8"):
        codec = Codec(name)
        got = compressed_mean(data, codec)
        assert [tuple(t.shape) for t in got] == shapes
        sent = {r: [codec.roundtrip(flatten(ts))] for r, ts in data.items()}
        expected = codec.roundtrip(fixed_order_mean(sent)[0])
        assert torch.equal(flatten(got), expected)
        exact = flatten(fixed_order_mean(data))
        assert float((flatten(got) - exact).abs().max()) < 0.05 * float(exact.abs().max())
