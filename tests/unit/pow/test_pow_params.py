"""PowParams: validation of the client's params object and the derived sizes."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from node.errors import InvalidRequest
from services.pow.params import PowParams

GOLDEN = json.loads((Path(__file__).parents[2] / "data" / "pow_v1_golden.json").read_text())
CASES = GOLDEN["cases"]
PRODUCTION = {"dim": 1792, "n_layers": 64, "n_heads": 64, "n_kv_heads": 64, "vocab_size": 8196,
              "ffn_dim_multiplier": 10, "multiple_of": 8192, "norm_eps": 0.00001, "rope_theta": 10000,
              "use_scaled_rope": False, "seq_len": 256}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_derived_sizes_match_reference(case: dict) -> None:
    p = PowParams.from_dict(case["params"])
    assert p.n_params_total == case["n_params_total"]
    assert p.pool_size == case["pool_size"]
    assert p.ffn_hidden == case["ffn_hidden"]


def test_production_shape_as_the_client_sends_it() -> None:
    p = PowParams.from_dict(PRODUCTION)
    assert isinstance(p.rope_theta, float) and isinstance(p.ffn_dim_multiplier, float)
    assert p.head_dim == 28
    assert p.ffn_hidden == 49152
    assert p.n_params_total == sum(math.prod(shape) for _, shape in p.parameter_shapes())
    assert p.n_params_total == 17_763_122_944
    assert p.pool_size == 888_156_147
    assert p.non_embedding_params == p.n_params_total - 8196 * 1792
    assert p.flops_per_nonce == 2 * p.non_embedding_params * 256
    assert 9.0e12 < p.flops_per_nonce < 9.2e12


def test_parameter_names_follow_the_reference() -> None:
    p = PowParams.from_dict(CASES[1]["params"])  # gqa: k/v narrower than q
    shapes = dict(p.parameter_shapes())
    assert shapes["tok_embeddings.weight"] == (512, 256)
    assert shapes["layers.1.attention.wk.weight"] == (64, 256)
    assert shapes["layers.0.feed_forward.w2.weight"] == (256, 1024)
    assert shapes["norm.weight"] == (256,)
    assert len(shapes) == 1 + 9 * p.n_layers + 2


def test_round_trip_and_frozen() -> None:
    p = PowParams.from_dict(PRODUCTION)
    assert PowParams.from_dict(p.to_dict()) == p
    assert json.loads(json.dumps(p.to_dict())) == p.to_dict()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.dim = 3  # type: ignore[misc]


def test_unknown_fields_are_ignored() -> None:
    assert PowParams.from_dict({**PRODUCTION, "max_seq_len": 4096}) == PowParams.from_dict(PRODUCTION)


def _with(**changes: Any) -> dict[str, Any]:
    return {**PRODUCTION, **changes}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({k: v for k, v in PRODUCTION.items() if k != "dim"}, "dim"),
        (_with(dim=True), "dim"),
        (_with(dim=1792.0), "dim"),
        (_with(dim="1792"), "dim"),
        (_with(n_layers=0), "n_layers"),
        (_with(seq_len=-1), "seq_len"),
        (_with(norm_eps=float("nan")), "norm_eps"),
        (_with(rope_theta=float("inf")), "rope_theta"),
        (_with(rope_theta=0), "rope_theta"),
        (_with(ffn_dim_multiplier=False), "ffn_dim_multiplier"),
        (_with(use_scaled_rope=0), "use_scaled_rope"),
        (_with(use_scaled_rope=True), "use_scaled_rope"),
        (_with(n_heads=60), "dim"),
        (_with(n_kv_heads=48), "n_heads"),
        (_with(dim=1800, n_heads=120, n_kv_heads=120), "dim / params.n_heads"),
        (_with(vocab_size=1), "vocab_size"),
    ],
)
def test_bad_params_are_rejected_naming_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        PowParams.from_dict(body)
    assert f"params.{field}" in info.value.message
    assert "\n" not in info.value.message


def test_params_must_be_an_object() -> None:
    with pytest.raises(InvalidRequest, match="params must be an object"):
        PowParams.from_dict([1, 2])
