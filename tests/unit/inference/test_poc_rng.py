"""PoC v2 primitives (§5.1-§5.3) against every golden rng value."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from services.inference.poc import rng, seeds
from tests.support.pocv2 import golden

F32_ULP4 = 4 * np.finfo(np.float32).eps


def _close_ulp(got: torch.Tensor, want: list[float], ulps: float = 4) -> None:
    """Within ``ulps`` float32 ulp of each listed value (absolute floor of one ulp of 1 near zero)."""
    w = np.asarray(want, dtype=np.float64)
    g = got.double().numpy()
    tol = ulps * np.finfo(np.float32).eps * np.maximum(np.abs(w), 1.0)
    assert g.shape == w.shape
    assert np.all(np.abs(g - w) <= tol), np.max(np.abs(g - w))


def test_seed32_and_the_check_values() -> None:
    for entry in golden()["rng"]["seed_from_string"]:
        assert seeds.seed32(entry["s"]) == entry["seed"]
    assert seeds.seed32("abc") == 3128432319
    assert seeds.mm3(0, 0) == 4279838538


def test_mm3_scalar_and_vectorised_agree_with_golden() -> None:
    for entry in golden()["rng"]["murmur3"]:
        assert [seeds.mm3(k, entry["seed"]) for k in entry["keys"]] == entry["hashes"]
        keys = torch.tensor(entry["keys"], dtype=torch.int64)
        assert rng.mm3(keys, entry["seed"]).tolist() == entry["hashes"]


def test_mm3_stays_exact_at_the_uint32_edges() -> None:
    keys = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)
    for seed in (0, 1, 2**31, 2**32 - 1):
        assert rng.mm3(keys, seed).tolist() == [seeds.mm3(k, seed) for k in keys.tolist()]


def test_uniform_and_normal_streams() -> None:
    r = golden()["rng"]
    uni = r["uniform"]
    u = rng.mm3(torch.arange(uni["n"]), uni["seed"]).to(torch.float32) * rng.TWO_POW_M32
    _close_ulp(u, uni["values"])
    for entry in r["normal"]:
        _close_ulp(rng.gauss([entry["seed"]], entry["n"])[0], entry["values"])


def test_legacy_and_stronger_inputs_small() -> None:
    r = golden()["rng"]
    legacy, strong = r["legacy_small"], r["concat_murmur_small"]
    assert seeds.seed32(legacy["seed_string"]) == legacy["seed"]
    assert seeds.sub_seeds(strong["seed_string"]) == strong["sub_seeds"]
    count = legacy["seq_len"] * legacy["dim"]
    _close_ulp(rng.inputs_legacy(legacy["seed_string"], count), legacy["values"])
    _close_ulp(rng.inputs_stronger(strong["seed_string"], count), strong["values"])
    assert strong["segment_lengths"] == [4] * 7 + [2]


def test_stronger_segments_are_independent_streams() -> None:
    text = "x_y_nonce5"
    whole = rng.inputs_stronger(text, 8 * 7 + 3)  # segments of 8, the last one 3 long
    subs = seeds.sub_seeds(text)
    torch.testing.assert_close(whole[:8], rng.gauss([subs[0]], 8)[0], rtol=0, atol=0)
    torch.testing.assert_close(whole[-3:], rng.gauss([subs[7]], 3)[0], rtol=0, atol=0)


def test_householder_vector_of_layer0() -> None:
    r = golden()["rng"]
    v = rng.householder_vectors(r["block_hash"], 2, 64)
    _close_ulp(v[0], r["householder_layer0_dim64"])
    assert math.isclose(float(torch.linalg.vector_norm(v[1])), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_generators_respect_the_device(device: str) -> None:
    if device == "meta":
        out = rng.gauss([1, 2], 5, device="meta")
        assert out.device.type == "meta" and out.shape == (2, 5)
    else:
        assert rng.nonce_inputs("b", "p", 3, 4, 6, stronger=True).shape == (4, 6)
