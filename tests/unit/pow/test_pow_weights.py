"""The weight pool and how parameters are cut from it (spec section 4), bit-exact against the reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from services.pow.params import PowParams
from services.pow.rng import param_offset, pool_rng
from services.pow.weights import generate_pool, parameter_values

GOLDEN = json.loads((Path(__file__).parents[2] / "data" / "pow_v1_golden.json").read_text())
CASES = GOLDEN["cases"]


def _one_draw(block_hash: str, size: int) -> np.ndarray:
    return pool_rng(block_hash).normal(0.0, 0.02, size=size).astype(np.float32).astype(np.float16)


@pytest.mark.parametrize("chunk", [1, 997, 4096, 50_000, 1 << 20])
def test_chunked_pool_equals_one_big_normal_draw(chunk: int) -> None:
    size = 20_011 if chunk == 1 else 123_457
    pool = generate_pool("0xAB", size, chunk=chunk)
    assert pool.dtype == torch.float16 and pool.shape == (size,)
    assert np.array_equal(pool.numpy(), _one_draw("0xAB", size))


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden_weights_first_and_last_values(case: dict) -> None:
    params = PowParams.from_dict(case["params"])
    pool = generate_pool(case["block_hash"], params.pool_size)
    shapes = dict(params.parameter_shapes())
    for name, first4 in case["weights_first4"].items():
        values = parameter_values(pool, case["block_hash"], name, math.prod(shapes[name]))
        assert values[:4].tolist() == first4, name
    for name, last4 in case["weights_last4"].items():
        values = parameter_values(pool, case["block_hash"], name, math.prod(shapes[name]))
        assert values[-4:].tolist() == last4, name


def test_golden_covers_both_the_slice_and_the_tile_path() -> None:
    tiny = next(c for c in CASES if c["name"] == "tiny_unit")
    params = PowParams.from_dict(tiny["params"])
    shapes = dict(params.parameter_shapes())
    # w1 (1024 x 128) is larger than the pool (93,446): tiled and rotated.
    assert math.prod(shapes["layers.0.feed_forward.w1.weight"]) > params.pool_size
    assert math.prod(shapes["layers.0.feed_forward.w2.weight"]) > params.pool_size
    # wq (128 x 128) fits: a window of the pool.
    assert math.prod(shapes["layers.0.attention.wq.weight"]) <= params.pool_size


def _reference_values(pool: np.ndarray, block_hash: str, name: str, n: int) -> np.ndarray:
    """Spec section 4, written the obvious (memory-hungry) way."""
    off = param_offset(block_hash, name)
    size = pool.size
    if n <= size:
        start = off % (size - n + 1)
        return pool[start : start + n]
    tiled = np.concatenate([np.tile(pool, n // size), pool[: n % size]])
    shift = off % n
    return np.roll(tiled, -shift) if shift else tiled


@pytest.mark.parametrize("n", [1, 50, 1000, 1001, 2000, 3003, 10_000, 10_007])
@pytest.mark.parametrize("name", ["layers.0.feed_forward.w1.weight", "output.weight", "x"])
def test_parameter_values_match_the_obvious_construction(n: int, name: str) -> None:
    pool = generate_pool("0x01", 1000)
    got = parameter_values(pool, "0x01", name, n)
    assert got.shape == (n,)
    assert np.array_equal(got.numpy(), _reference_values(pool.numpy(), "0x01", name, n))


def test_window_is_a_view_of_the_pool() -> None:
    pool = generate_pool("0x01", 1000)
    got = parameter_values(pool, "0x01", "norm.weight", 64)
    assert got.untyped_storage().data_ptr() == pool.untyped_storage().data_ptr()
