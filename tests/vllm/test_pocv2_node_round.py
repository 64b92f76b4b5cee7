"""PoC v2 through the node's routes with vLLM as the engine: the Go client's round and the golden verdict.

Same flow as tests/integration/test_pocv2_round.py (CPU engine), on the tier's one vLLM engine serving the
golden tiny Qwen3 in float32.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from services.inference.poc.codec import decode_f16, l2
from tests.support.pocv2 import SERVED_NAME, case, golden
from tests.support.receiver import Receiver
from tests.support.waiting import wait_until
from tests.vllm.conftest import Served

CASE = case("legacy_rng_seq16")
VALIDATION = golden()["validation"][0]
ESCAPED = "Qwen%252FQwen3-235B-A22B-Instruct-2507-FP8"


@pytest.fixture
def receiver() -> Any:
    r = Receiver()
    yield r
    r.close()


def _received(receiver: Receiver, suffix: str) -> list[dict[str, Any]]:
    with receiver._lock:
        raw = list(receiver.bodies.get(f"/v2/poc-batches/{ESCAPED}/{suffix}", []))
    return [json.loads(b) for b in raw]


def test_generation_and_golden_validation_through_the_node(
        vllm_serving: Served, receiver: Receiver) -> None:
    node = vllm_serving.node
    url = f"http://127.0.0.1:{receiver.port}/v2/poc-batches/{ESCAPED}"
    init = {"block_hash": CASE["block_hash"], "block_height": 1000, "public_key": CASE["public_key"],
            "node_id": 0, "node_count": 1, "params": {"model": SERVED_NAME, "seq_len": CASE["seq_len"]},
            "url": url}
    resp = node.api("POST", "/api/v1/inference/pow/init/generate", init)
    assert resp.status == 200 and resp.json()["backends"] == 1, resp.body
    try:
        assert node.api("GET", "/api/v1/inference/pow/status").json()["status"] == "GENERATING"

        def delivered() -> dict[int, str]:
            return {a["nonce"]: a["vector_b64"]
                    for b in _received(receiver, "generated") for a in b["artifacts"]}

        wait_until(lambda: set(range(18)) <= set(delivered()), 600, 0.5,
                   message=f"artifacts not delivered: {node.logs('pow')}")
    finally:
        assert node.api("POST", "/api/v1/inference/pow/stop", {}).status == 200
    got = delivered()
    for want in CASE["artifacts"]:
        if want["nonce"] in got:
            golden_f16 = np.asarray(want["vector_f16"], dtype=np.float32)
            assert l2(decode_f16(got[want["nonce"]]), golden_f16) <= 2e-3

    body = {**VALIDATION["go_request_example"], "url": "", "wait": True}
    done = node.api("POST", "/api/v1/inference/pow/generate", body, timeout=600).json()
    expected = VALIDATION["results"][0]["expected"]
    assert (done["status"], done["n_mismatch"], done["mismatch_nonces"], done["fraud_detected"]) == (
        "completed", expected["n_mismatch"], expected["mismatch_nonces"], expected["fraud_detected"]), done
    assert done["p_value"] == pytest.approx(expected["p_value"], abs=1e-9)
