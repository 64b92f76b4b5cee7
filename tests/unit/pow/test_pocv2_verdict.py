"""The §6 decision on the golden validation case: mismatches, p-value, fraud, and the §6.4 defaults."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from contracts.checked import convert
from contracts.pow_v2 import Generate, StatTest
from services.pow.v2.verdict import StatParams, decode, judge
from tests.support.pocv2 import golden

CASE = golden()["validation"][0]


def vectors(key: str) -> dict[int, str]:
    return {a["nonce"]: a["vector_b64"] for a in CASE[key]}


@pytest.mark.parametrize("result", CASE["results"], ids=lambda r: r["name"])
def test_the_golden_decisions(result: dict[str, Any]) -> None:
    sent = result["stat_test_sent"]
    stat = msgspec.UNSET if sent is None else convert(sent, StatTest)
    params = StatParams.of(stat)
    assert params == StatParams(**result["effective"])
    verdict = judge(CASE["nonces"], vectors("received_artifacts"), vectors("honest_artifacts"),
                    CASE["k_dim"], params)
    expected = result["expected"]
    assert verdict.n_total == expected["n_total"]
    assert verdict.n_mismatch == expected["n_mismatch"]
    assert verdict.mismatch_nonces == expected["mismatch_nonces"]
    assert verdict.p_value == pytest.approx(expected["p_value"], abs=1e-9)
    assert verdict.fraud_detected is expected["fraud_detected"]


def test_the_go_request_body_decodes_and_ignores_p_value_threshold() -> None:
    body = convert(CASE["go_request_example"], Generate)
    assert isinstance(body.stat_test, StatTest)
    assert StatParams.of(body.stat_test) == StatParams(0.4, 0.1, 0.01)


def test_malformed_and_non_finite_vectors_mismatch_and_empty_ones_are_skipped() -> None:
    honest = vectors("honest_artifacts")
    assert decode(vectors("received_artifacts")[5], 12) is None  # a NaN
    assert decode(vectors("received_artifacts")[6], 12) is None  # 11 values
    received = {**honest, 0: "", 1: "AAAA"}
    verdict = judge(CASE["nonces"], received, honest, 12, StatParams(0.4, 0.1, 0.01))
    assert (verdict.n_total, verdict.mismatch_nonces) == (10, [1])
    # A nonce the validator could not compute is skipped, and still counts in n_total.
    mine = {n: v for n, v in honest.items() if n != 2}
    verdict = judge(CASE["nonces"], vectors("received_artifacts"), mine, 12, StatParams(0.4, 0.1, 0.01))
    assert (verdict.n_total, verdict.mismatch_nonces) == (10, [5, 6, 7])
