"""PoC v2 post-processing (§5.5): the pick in CUDA's order, the rotation chain, the fp16 encoding."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from services.inference.poc import codec, fingerprint, pick, rng, seeds
from tests.support.pocv2 import golden


def test_pick_indices_in_cuda_order() -> None:
    r = golden()["rng"]
    for entry in r["pick_indices"]:
        assert seeds.pick_seed(r["block_hash"], r["public_key"], entry["nonce"], entry["k"]) == entry["seed"]
        scores = pick.pick_scores(
            r["block_hash"], r["public_key"], [entry["nonce"]], entry["dim"], entry["k"], torch.device("cpu")
        )
        got = pick.pick_indices(scores, entry["k"])[0].tolist()
        assert got == entry["indices_cuda_order"]
        assert sorted(got) == entry["indices_sorted"]
        assert scores[0, got].tolist() == entry["scores_of_indices"]


def test_spec_order_with_ties_takes_the_lower_tied_indices_last() -> None:
    scores = torch.tensor([[5, 1, 3, 3, 0, 3, 9]])
    # theta = 3 (3rd smallest of k=4 ... ) -> below theta: 1 (score 1), 4 (score 0); ties at 2, 3, 5.
    assert pick.spec_order(scores, 4).tolist() == [[1, 4, 2, 3]]
    assert pick.spec_order(scores, 3).tolist() == [[1, 4, 2]]
    with pytest.raises(ValueError, match="exceeds"):
        pick.pick_indices(scores, 8)


def test_haar_rotation_chain() -> None:
    r = golden()["rng"]
    haar = r["haar"]
    k = haar["k"]
    w0 = rng.gauss([seeds.haar_seed(r["block_hash"], r["public_key"], haar["nonce"], k, 0)], k)[0]
    want_w0 = torch.tensor(haar["first_reflection_vector_unnormalized"])
    torch.testing.assert_close(w0, want_w0, atol=1e-6, rtol=0)
    w = rng.haar_vectors(r["block_hash"], r["public_key"], [haar["nonce"]], k)
    e0 = torch.zeros(1, k)
    e0[0, 0] = 1.0
    ones = torch.full((1, k), 1.0 / np.sqrt(k), dtype=torch.float32)
    want_e0 = torch.tensor(haar["rotate_e0"])
    torch.testing.assert_close(fingerprint.rotate(e0, w)[0], want_e0, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        fingerprint.rotate(ones, w)[0], torch.tensor(haar["rotate_ones_over_sqrt12"]), atol=1e-6, rtol=0
    )


def test_fp16_encoding_round_trip() -> None:
    enc = golden()["rng"]["fp16_encoding"]
    b64 = codec.encode_f16(enc["input_f32"])
    assert b64 == enc["b64"]
    assert base64.b64decode(b64).hex() == enc["hex"]
    decoded = codec.decode_f16(b64)
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, np.asarray(enc["f16_values"], dtype=np.float32))


@pytest.mark.parametrize("bad", ["not base64!", "AAA", "AA=="[:3], "AQ=="])
def test_decode_rejects_what_is_not_whole_halves(bad: str) -> None:
    with pytest.raises(ValueError):
        codec.decode_f16(bad)


def test_l2_is_float32() -> None:
    a = np.asarray([3.0, 0.0], dtype=np.float32)
    assert codec.l2(a, np.zeros(2, dtype=np.float32)) == 3.0


def test_non_finite_hidden_states_are_dropped() -> None:
    hidden = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    hidden[1, 5] = float("nan")
    hidden[2, 0] = float("inf")
    found, dropped = fingerprint.artifacts(hidden, "bh", "pk", [10, 11, 12], 12)
    assert [a["nonce"] for a in found] == [10]
    assert dropped == [11, 12]
    assert len(codec.decode_f16(str(found[0]["vector_b64"]))) == 12


def test_intermediates_of_the_first_golden_nonce() -> None:
    c = golden()["cases"][0]
    inter = c["intermediates_first_nonce"]
    e = rng.nonce_inputs(c["block_hash"], c["public_key"], inter["nonce"], c["seq_len"], 64, stronger=False)
    flat = e.reshape(-1)
    torch.testing.assert_close(flat[:8], torch.tensor(inter["inputs_embeds_first8"]), atol=1e-6, rtol=0)
    torch.testing.assert_close(flat[-8:], torch.tensor(inter["inputs_embeds_last8"]), atol=1e-6, rtol=0)
