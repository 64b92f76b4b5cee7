"""End-to-end distances against the reference, and the layout choices that must not change them."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from services.pow.compute import ComputeGroup, discover_groups
from services.pow.model import PowModel, build_model, layer_devices
from services.pow.params import PowParams
from services.pow.weights import generate_pool

GOLDEN = json.loads((Path(__file__).parents[2] / "data" / "pow_v1_golden.json").read_text())
CASES = {c["name"]: c for c in GOLDEN["cases"]}
CPU = torch.device("cpu")
# head_dim 28 like production, grouped-query attention, a vocabulary that is not a power of two.
ODD_SHAPE = dict(dim=112, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim_multiplier=1.0,
                 multiple_of=64, norm_eps=1e-5, rope_theta=10000, use_scaled_rope=False, seq_len=9)


@cache
def _pool(block_hash: str, size: int) -> torch.Tensor:
    return generate_pool(block_hash, size)


def _distances(model: PowModel, block_hash: str, public_key: str, nonces: list[int]) -> np.ndarray:
    return ComputeGroup(0, block_hash, model, batch_size=4).distances(public_key, nonces)


def _build(params: PowParams, block_hash: str, **kwargs: object) -> PowModel:
    options = {"devices": [CPU], "dtype": torch.float32, **kwargs}
    return build_model(_pool(block_hash, params.pool_size), block_hash, params, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_golden_nonce_within_tolerance(name: str) -> None:
    case = CASES[name]
    params = PowParams.from_dict(case["params"])
    group = discover_groups(case["block_hash"], params, "cpu")[0]
    got = group.distances(case["public_key"], case["nonces"])
    assert got.dtype == np.float64 and got.shape == (len(case["nonces"]),)
    assert np.max(np.abs(got - case["dist_reference_fp16"])) < 2e-4
    assert np.max(np.abs(got - case["dist_fp32_compute"])) < 1e-4


@pytest.mark.parametrize("name", ["tiny_unit", "gqa"])
def test_fp16_compute_mode_tracks_the_fp16_reference_closely(name: str) -> None:
    """The GPU arithmetic (fp16 end to end), run on the CPU: far tighter than the 2e-4 bar."""
    case = CASES[name]
    params = PowParams.from_dict(case["params"])
    model = _build(params, case["block_hash"], dtype=torch.float16, head_multiple=8)
    got = _distances(model, case["block_hash"], case["public_key"], case["nonces"])
    assert np.max(np.abs(got - case["dist_reference_fp16"])) < 2e-5


def test_padded_heads_give_the_same_distances() -> None:
    params = PowParams.from_dict(ODD_SHAPE)
    plain = _distances(_build(params, "0x0d"), "0x0d", "pk", list(range(6)))
    padded_model = _build(params, "0x0d", head_multiple=8)
    assert padded_model.head_stride == 32
    assert padded_model.layers[0].wqkv.shape == ((4 + 2 + 2) * 32, 112)
    padded = _distances(padded_model, "0x0d", "pk", list(range(6)))
    assert np.max(np.abs(plain - padded)) < 1e-9


@pytest.mark.parametrize("chunk", [64, 100, 1000])
def test_ffn_chunking_gives_the_same_distances(chunk: int) -> None:
    case = CASES["mainnet_shaped_small"]
    params = PowParams.from_dict(case["params"])
    whole = _distances(_build(params, case["block_hash"]), case["block_hash"], case["public_key"], [0, 2])
    chunked = _distances(_build(params, case["block_hash"], ffn_chunk=chunk), case["block_hash"],
                         case["public_key"], [0, 2])
    assert np.max(np.abs(whole - chunked)) < 1e-6


def test_layers_split_over_a_block_of_devices() -> None:
    params = PowParams.from_dict(ODD_SHAPE)
    single = _distances(_build(params, "0x0d"), "0x0d", "pk", [3, 4, 5])
    split = _build(params, "0x0d", devices=[CPU, CPU])
    assert [layer.device for layer in split.layers] == [CPU, CPU]
    assert np.array_equal(_distances(split, "0x0d", "pk", [3, 4, 5]), single)


def test_layer_devices_are_contiguous_runs() -> None:
    a, b, c = (torch.device("meta", i) for i in range(3))
    placed = layer_devices(64, [a, b, c])
    assert placed[:22] == [a] * 22 and placed[22:44] == [b] * 22 and placed[44:] == [c] * 20
    assert layer_devices(2, [a, b, c]) == [a, b]
    with pytest.raises(ValueError):
        layer_devices(4, [])


def test_forward_rejects_a_wrong_input_shape() -> None:
    params = PowParams.from_dict(ODD_SHAPE)
    model = _build(params, "0x0d")
    with pytest.raises(ValueError, match="seq_len"):
        model.forward(torch.zeros(1, params.seq_len + 1, params.dim))
    assert model.forward(torch.zeros(2, params.seq_len, params.dim)).shape == (2, params.vocab_size)
