"""PoC v2 as the Network Node drives it, against the real node serving the golden tiny Qwen3 (CPU engine).

Every body is replayed without a Content-Type header. One node and one engine for the module; the
tests run in file order (STOPPED first, then serving).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from services.inference.poc.codec import decode_f16, l2
from tests.support.node import Node
from tests.support.pocv2 import SERVED_NAME, TINY_QWEN3, case, golden
from tests.support.receiver import Receiver
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

UP = {"model": str(TINY_QWEN3), "dtype": "auto", "additional_args": ["--served-model-name", SERVED_NAME]}
CASE = case("legacy_rng_seq16")
VALIDATION = golden()["validation"][0]
#: The model id as the Network Node puts it in the url: url.PathEscape twice.
ESCAPED = "Qwen%252FQwen3-235B-A22B-Instruct-2507-FP8"


def init_body(url: str, **extra: Any) -> dict[str, Any]:
    """The Go client's init body for the golden case: node 0 of 1, so the sequence is 0, 1, 2, …"""
    return {"block_hash": CASE["block_hash"], "block_height": 1000, "public_key": CASE["public_key"],
            "node_id": 0, "node_count": 1, "params": {"model": SERVED_NAME, "seq_len": CASE["seq_len"]},
            "url": url, **extra}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("pocv2")).start()
    yield n
    n.stop()


def callbacks_url(receiver: Receiver) -> str:
    return f"http://127.0.0.1:{receiver.port}/v2/poc-batches/{ESCAPED}"


def received(receiver: Receiver, suffix: str) -> list[dict[str, Any]]:
    with receiver._lock:
        raw = list(receiver.bodies.get(f"/v2/poc-batches/{ESCAPED}/{suffix}", []))
    return [json.loads(b) for b in raw]


def generated_nonces(receiver: Receiver) -> set[int]:
    return {a["nonce"] for body in received(receiver, "generated") for a in body["artifacts"]}


def test_without_an_engine(node: Node) -> None:
    assert node.api("GET", "/api/v1/inference/pow/status").json() == {"status": "NO_BACKENDS", "backends": []}
    resp = node.api("POST", "/api/v1/inference/pow/init/generate", init_body("http://127.0.0.1:9/x"))
    assert (resp.status, resp.json()) == (503, {"detail": "No vLLM backends available"})
    resp = node.api("POST", "/api/v1/inference/pow/stop", {})
    assert resp.json() == {"status": "OK", "message": "No backends to stop"}
    assert node.api("GET", "/api/v1/inference/pow/generate/nocolon").status == 400
    assert node.api("GET", "/api/v1/inference/pow/generate/5001:nope").status == 404
    state = node.api("GET", "/api/v1/state").json()
    assert state["state"] == "STOPPED"
    assert (state["poc_status"], state["inference_healthy"], state["loaded_model"]) == (None, None, None)


def test_generation_reaches_the_double_escaped_url(node: Node, receiver: Receiver) -> None:
    resp = node.api("POST", "/api/v1/inference/up", UP, timeout=240)
    assert (resp.status, resp.json()) == (200, {"status": "OK"}), node.logs("inference")
    state = node.api("GET", "/api/v1/state").json()
    assert (state["state"], state["poc_status"], state["inference_healthy"]) == ("INFERENCE", "IDLE", True)
    port = node.inference_port + 1

    resp = node.api("POST", "/api/v1/inference/pow/init/generate", init_body(callbacks_url(receiver)))
    assert resp.json() == {"status": "OK", "backends": 1, "n_groups": 1,
                           "results": [{"port": port, "status": "OK"}], "errors": None}, node.logs("pow")
    status = node.api("GET", "/api/v1/inference/pow/status").json()
    assert status["status"] == "GENERATING" and status["backends"][0]["port"] == port
    assert status["backends"][0]["config"]["n_groups"] == 1
    assert node.api("GET", "/api/v1/state").json()["poc_status"] == "GENERATING"
    again = node.api("POST", "/api/v1/inference/pow/init/generate", init_body(callbacks_url(receiver)))
    assert (again.status, again.json()) == (502, {"detail": {"errors": [{"port": port,
                                                                          "error": "Already generating"}]}})

    # Inference is scheduled alongside PoC on the CPU engine: chat still answers.
    chat = node.inference("POST", "/v1/chat/completions", {
        "model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert chat.status == 200, chat.body

    wait_until(lambda: set(range(40)) <= generated_nonces(receiver), 120, 0.5,
               message=f"artifacts of nonces 0..39 not delivered: {sorted(generated_nonces(receiver))[:50]}")
    stats = node.api("GET", "/api/v1/inference/pow/status").json()["backends"][0]["stats"]
    assert stats["total_processed"] >= 40 and stats["nonces_per_second"] > 0
    scrape = node.api("GET", "/metrics").body.decode()
    assert f'mlnode_pocv2_generating{{engine_port="{port}"}} 1' in scrape
    assert f'mlnode_pocv2_nonces_generated_total{{engine_port="{port}"}}' in scrape
    resp = node.api("POST", "/api/v1/inference/pow/stop", {})
    assert resp.json() == {"status": "OK", "results": [{"port": port, "status": "stopped"}], "errors": None}
    assert node.api("GET", "/api/v1/inference/pow/status").json()["status"] == "IDLE"

    body = received(receiver, "generated")[0]
    assert {k: body[k] for k in ("public_key", "block_hash", "block_height", "node_id", "encoding")} == {
        "public_key": CASE["public_key"], "block_hash": CASE["block_hash"], "block_height": 1000,
        "node_id": 0, "encoding": {"dtype": "f16", "k_dim": 12, "endian": "le"}}
    # The numbers are the golden ones (§9: L2 to vector_f16 within 2e-3).
    delivered = {a["nonce"]: a["vector_b64"] for b in received(receiver, "generated") for a in b["artifacts"]}
    for want in CASE["artifacts"]:
        if want["nonce"] in delivered:
            mine = decode_f16(delivered[want["nonce"]])
            assert l2(mine, np.asarray(want["vector_f16"], dtype=np.float32)) <= 2e-3


def test_golden_validation_end_to_end(node: Node, receiver: Receiver) -> None:
    body = {**VALIDATION["go_request_example"], "url": callbacks_url(receiver)}
    resp = node.api("POST", "/api/v1/inference/pow/generate", body)
    answer = resp.json()
    assert resp.status == 200 and answer["status"] == "queued" and answer["queued_count"] == 10, answer
    port, job_id = answer["request_id"].split(":")
    assert int(port) == node.inference_port + 1

    def verdicts() -> list[dict[str, Any]]:
        return [v for v in received(receiver, "validated") if v["request_id"] == job_id]

    (verdict,) = wait_until(verdicts, 120, 0.3, message=f"no verdict: {node.logs('pow')}")
    expected = VALIDATION["results"][0]["expected"]
    assert verdict["p_value"] == pytest.approx(expected["p_value"], abs=1e-9)
    assert {k: verdict[k] for k in ("n_total", "n_mismatch", "mismatch_nonces", "fraud_detected")} == {
        k: expected[k] for k in ("n_total", "n_mismatch", "mismatch_nonces", "fraud_detected")}
    assert (verdict["block_hash"], verdict["public_key"], verdict["node_id"], verdict["block_height"]) == (
        body["block_hash"], body["public_key"], 3, 1000)
    view = node.api("GET", f"/api/v1/inference/pow/generate/{answer['request_id']}").json()
    assert view["status"] == "completed" and view["request_id"] == answer["request_id"]
    assert view["mismatch_nonces"] == expected["mismatch_nonces"]

    # Without stat_test: the engine defaults of §6.4, answered in the call with `wait`.
    body = {k: v for k, v in body.items() if k != "stat_test"} | {"wait": True, "url": ""}
    done = node.api("POST", "/api/v1/inference/pow/generate", body, timeout=120).json()
    expected = VALIDATION["results"][1]["expected"]
    assert (done["status"], done["n_mismatch"], done["mismatch_nonces"], done["fraud_detected"]) == (
        "completed", expected["n_mismatch"], expected["mismatch_nonces"], True)


def test_refusals_while_serving(node: Node) -> None:
    base = {**VALIDATION["go_request_example"], "url": ""}
    other = {**base, "params": {"model": "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8", "seq_len": 16}}
    resp = node.api("POST", "/api/v1/inference/pow/generate", other)
    assert resp.status == 409 and "not served" in resp.json()["detail"]
    resp = node.api("POST", "/api/v1/inference/pow/generate",
                    {**base, "params": {**base["params"], "decode": True, "max_tokens": 4}})
    assert (resp.status, resp.json()) == (422, {"detail": "decode PoC scheme not supported "
                                                          "(params.decode / params.max_tokens)"})
    resp = node.api("POST", "/api/v1/inference/pow/init/generate",
                    init_body("", params={"model": SERVED_NAME, "seq_len": 16, "n_layers": 2}))
    assert resp.status == 422 and "n_layers" in resp.json()["detail"]
    resp = node.api("POST", "/api/v1/inference/pow/generate", {**base, "nonces": base["nonces"][:-1]})
    assert (resp.status, resp.json()) == (
        400, {"detail": "validation.artifacts nonces must match nonces field"})
    artifacts = [{"nonce": n, "vector_b64": "%%%"} for n in base["nonces"]]
    resp = node.api("POST", "/api/v1/inference/pow/generate",
                    {**base, "validation": {"artifacts": artifacts}})
    assert resp.status == 400 and "must be standard base64" in resp.json()["detail"]


def test_nothing_is_lost_across_kill_9_of_pow_and_a_receiver_outage(node: Node, receiver: Receiver) -> None:
    receiver.down()
    try:
        block = init_body(callbacks_url(receiver), block_height=2000)
        assert node.api("POST", "/api/v1/inference/pow/init/generate", block).status == 200

        def processed() -> int:
            backends = node.api("GET", "/api/v1/inference/pow/status").json()["backends"]
            return int((backends[0].get("stats") or {}).get("total_processed", 0))

        wait_until(lambda: processed() >= 64, 120, 0.3, message="the loop made no progress")
        old = node.pid("pow")
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: node.pid("pow") not in (0, old), 60, 0.3, message="pow was not restarted")
        wait_until(lambda: node.api("GET", "/api/v1/inference/pow/status").json()["status"] == "GENERATING",
                   60, 0.3, message=f"the loop did not resume: {node.logs('pow')}")
    finally:
        receiver.up()

    def delivered_2000() -> set[int]:
        return {a["nonce"] for b in received(receiver, "generated") if b["block_height"] == 2000
                for a in b["artifacts"]}

    wait_until(lambda: set(range(64)) <= delivered_2000(), 120, 0.5,
               message=f"nonces lost: {sorted(set(range(64)) - delivered_2000())[:20]}")
    assert node.api("POST", "/api/v1/inference/pow/stop", {}).status == 200


def test_an_engine_killed_mid_loop_costs_no_nonce(node: Node, receiver: Receiver) -> None:
    assert node.api("POST", "/api/v1/inference/pow/init/generate",
                    init_body(callbacks_url(receiver), block_height=3000)).status == 200

    def processed() -> int:
        backends = node.api("GET", "/api/v1/inference/pow/status").json()["backends"]
        return int((backends[0].get("stats") or {}).get("total_processed", 0)) if backends else 0

    wait_until(lambda: processed() >= 16, 120, 0.3, message="the loop made no progress")
    engines = node.engine_pids()
    assert engines
    for pid in engines:
        os.kill(pid, signal.SIGKILL)
    # The inference service restarts the engine on the same port; the loop waits for it and goes on.
    wait_until(lambda: set(node.engine_pids()) - set(engines), 120, 0.3, message="engine not restarted")
    wait_until(lambda: processed() >= 64, 180, 0.5, message=f"the loop did not go on: {node.logs('pow')}")

    def delivered_3000() -> set[int]:
        return {a["nonce"] for b in received(receiver, "generated") if b["block_height"] == 3000
                for a in b["artifacts"]}

    wait_until(lambda: set(range(64)) <= delivered_3000(), 120, 0.5,
               message=f"nonces lost: {sorted(set(range(64)) - delivered_3000())[:20]}")
    assert node.api("POST", "/api/v1/inference/pow/stop", {}).status == 200


def test_inference_routes_are_409_in_pow_mode(node: Node) -> None:
    assert node.api("POST", "/api/v1/stop").status == 200
    from tests.support.pow import init_dict

    assert node.api("POST", "/api/v1/pow/init", init_dict("http://127.0.0.1:9/x")).status == 200
    resp = node.api("GET", "/api/v1/inference/pow/status")
    assert (resp.status, resp.json()) == (409, {"detail": "Cannot run INFERENCE because MLNode is currently "
                                                          "in POW mode. Please stop POW first."})
    state = node.api("GET", "/api/v1/state").json()
    assert state["state"] == "POW" and state["poc_status"] is None
    assert node.api("POST", "/api/v1/stop").status == 200
