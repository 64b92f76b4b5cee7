"""Validation of proof batches (spec section 8): the binomial test and the ValidatedBatch document."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest

from node.errors import InvalidRequest
from services.pow.validation import (
    NON_FINITE_DIST,
    binomtest_greater,
    count_invalid,
    validated_batch,
)
from tests.support.pow import validate_batch

GOLDEN = json.loads((Path(__file__).parents[2] / "data" / "pow_v1_golden.json").read_text())
R = 1.4013564660458173
FIELDS = ["public_key", "block_hash", "block_height", "nonces", "dist", "node_id", "received_dist",
          "r_target", "fraud_threshold", "n_invalid", "probability_honest", "fraud_detected"]


def _exact_tail(k: int, n: int, p: float) -> float:
    q = Fraction(p)
    return float(sum(math.comb(n, i) * q**i * (1 - q) ** (n - i) for i in range(k, n + 1)))


@pytest.mark.parametrize("row", GOLDEN["binomtest_greater"], ids=lambda r: f"k{r['k']}-n{r['n']}")
def test_binomtest_matches_the_reference_values(row: dict) -> None:
    assert binomtest_greater(row["k"], row["n"], row["p"]) == pytest.approx(row["pvalue"], rel=1e-12)


@pytest.mark.parametrize(("k", "n", "p"), [(1, 3, 0.5), (2, 50, 0.01), (40, 300, 5e-4), (250, 300, 0.9),
                                             (3, 10, 0.3), (299, 300, 0.999)])
def test_binomtest_matches_exact_rational_arithmetic(k: int, n: int, p: float) -> None:
    assert binomtest_greater(k, n, p) == pytest.approx(_exact_tail(k, n, p), rel=1e-11, abs=1e-300)


def test_binomtest_edges() -> None:
    assert binomtest_greater(0, 0, 5e-4) == 1.0
    assert binomtest_greater(0, 200, 5e-4) == 1.0
    assert binomtest_greater(3, 3, 0.0) == 0.0
    assert binomtest_greater(3, 3, 1.0) == 1.0
    assert binomtest_greater(1, 10**6, 5e-4) == pytest.approx(1.0, abs=1e-12)
    assert binomtest_greater(300, 300, 5e-4) == 0.0  # underflows to 0, never NaN
    values = [binomtest_greater(k, 500, 5e-4) for k in range(8)]
    assert values == sorted(values, reverse=True)
    with pytest.raises(ValueError):
        binomtest_greater(5, 3, 0.1)


def test_count_invalid_rules() -> None:
    nan = float("nan")
    assert count_invalid([1.0, 1.2], [1.0, 1.2], R) == 0
    assert count_invalid([R], [1.0], R) == 0  # recomputed exactly at r_target is not "> r_target"
    assert count_invalid([R + 1e-9], [1.0], R) == 1
    assert count_invalid([nan], [1.0], R) == 1
    assert count_invalid([1.0], [R], R) == 1  # a claim at r_target was never a valid nonce
    assert count_invalid([1.0], [1.9], R) == 1  # the reference would crash here; we count it
    with pytest.raises(ValueError):
        count_invalid([1.0], [], R)


def test_validated_batch_fields_and_verdict() -> None:
    doc = validated_batch(public_key="pk", block_hash="BH", block_height=7, nonces=[1, 2, 3],
                          received_dist=[1.0, 1.1, 1.2], recomputed_dist=[1.0, 1.1, 1.5], node_id=0,
                          r_target=R, fraud_threshold=1e-7)
    assert list(doc) == FIELDS
    assert doc["n_invalid"] == 1
    assert doc["probability_honest"] == pytest.approx(binomtest_greater(1, 3, 5e-4))
    assert doc["fraud_detected"] is False
    assert doc["dist"] == [1.0, 1.1, 1.5] and doc["received_dist"] == [1.0, 1.1, 1.2]
    json.dumps(doc, allow_nan=False)


def test_many_invalid_nonces_are_fraud() -> None:
    n = 200
    doc = validated_batch(public_key="pk", block_hash="BH", block_height=7, nonces=list(range(n)),
                          received_dist=[1.0] * n, recomputed_dist=[1.0] * 195 + [1.6] * 5, node_id=0,
                          r_target=R, fraud_threshold=1e-7)
    assert doc["n_invalid"] == 5
    assert doc["probability_honest"] == pytest.approx(7.306115882423385e-08, rel=1e-12)
    assert doc["fraud_detected"] is True


def test_empty_batch_is_honest() -> None:
    doc = validated_batch(public_key="pk", block_hash="BH", block_height=7, nonces=[], received_dist=[],
                          recomputed_dist=[], node_id=0, r_target=R, fraud_threshold=1e-7)
    assert doc["probability_honest"] == 1.0 and doc["fraud_detected"] is False and doc["n_invalid"] == 0


def test_non_finite_recomputed_distance_is_invalid_and_json_safe() -> None:
    doc = validated_batch(public_key="pk", block_hash="BH", block_height=7, nonces=[1],
                          received_dist=[1.0], recomputed_dist=[float("nan")], node_id=0, r_target=R,
                          fraud_threshold=1e-7)
    assert doc["n_invalid"] == 1 and doc["dist"] == [NON_FINITE_DIST]
    json.dumps(doc, allow_nan=False)


def test_mismatched_lengths_are_rejected_naming_the_field() -> None:
    with pytest.raises(InvalidRequest, match="dist has 1 values but nonces has 2"):
        validated_batch(public_key="pk", block_hash="BH", block_height=7, nonces=[1, 2], received_dist=[1.0],
                        recomputed_dist=[1.0, 1.0], node_id=0, r_target=R, fraud_threshold=1e-7)


def test_validate_batch_reads_a_proof_batch_dict() -> None:
    batch = {"public_key": "pk", "block_hash": "BH", "block_height": 9, "nonces": [4], "dist": [1.2],
             "node_id": 0}
    doc = validate_batch(batch, [1.25], r_target=R, fraud_threshold=1e-7)
    assert doc["nonces"] == [4] and doc["dist"] == [1.25] and doc["received_dist"] == [1.2]
    assert doc["block_height"] == 9 and doc["n_invalid"] == 0
