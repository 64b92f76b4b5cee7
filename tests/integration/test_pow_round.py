"""A PoC round as the Network Node drives it, against the real node and a real callback receiver."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.node import Node
from tests.support.pow import CASE, R_TARGET, init_body, init_dict
from tests.support.receiver import Receiver
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REFERENCE = dict(zip(CASE["nonces"], CASE["dist_reference_fp16"], strict=True))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("pow")).start()
    yield n
    n.stop()


def generated(receiver: Receiver) -> tuple[list[int], list[float]]:
    nonces: list[int] = []
    dists: list[float] = []
    for batch in receiver.received("generated"):
        nonces += batch["nonces"]
        dists += batch["dist"]
    return nonces, dists


def model_builds(node: Node) -> int:
    return sum(1 for e in node.log_lines("pow") if e.get("event") == "pow_model_built")


def test_the_clients_round(node: Node, receiver: Receiver) -> None:
    assert node.api("POST", "/api/v1/stop").json() == {"status": "OK"}
    assert node.api("GET", "/api/v1/pow/status").json()["status"] == "NOT_LOADED"
    resp = node.api("POST", "/api/v1/pow/init/generate", init_body(receiver.url))
    assert resp.status == 200, resp.body
    assert resp.json()["status"] == "OK"
    assert resp.json()["pow_status"]["status"] in ("LOADING", "GENERATING")
    assert node.api("GET", "/api/v1/state").json()["state"] == "POW"

    # Generated batches arrive with valid nonces only, from this node's slot, with the network's numbers.
    wait_until(lambda: len(generated(receiver)[0]) >= 6, 90, message="no generated batches arrived")
    nonces, dists = generated(receiver)
    assert all(d < R_TARGET for d in dists)
    assert all(n % 2 == 1 for n in nonces), "node_id 1 of 2 computes odd nonces only"
    checked = [n for n in nonces if n in REFERENCE]
    assert checked, "expected golden nonces among the first results"
    for n in checked:
        assert abs(dists[nonces.index(n)] - REFERENCE[n]) < 2e-4
    expected_first = [n for n in sorted(REFERENCE) if n % 2 == 1 and REFERENCE[n] < R_TARGET]
    assert nonces[: len(expected_first)] == expected_first, "no valid golden nonce may be skipped"
    for batch in receiver.received("generated"):
        assert list(batch) == ["public_key", "block_hash", "block_height", "nonces", "dist", "node_id"]
        assert (batch["block_height"], batch["node_id"]) == (12345, 1)
        assert batch["public_key"] == CASE["public_key"]
    status = node.api("GET", "/api/v1/pow/status").json()
    assert status["status"] == "GENERATING" and status["is_model_initialized"] is True
    assert status["nonces_computed"] >= status["valid_found"] >= len(nonces)

    # The same body again switches to validation without rebuilding the model.
    builds = model_builds(node)
    resp = node.api("POST", "/api/v1/pow/init/validate", init_body(receiver.url))
    assert resp.status == 200 and resp.json()["pow_status"]["status"] == "VALIDATING"
    assert model_builds(node) == builds == 1

    honest = {"public_key": CASE["public_key"], "block_hash": CASE["block_hash"], "block_height": 12345,
              "nonces": nonces[:20], "dist": dists[:20], "node_id": 0}
    assert node.api("POST", "/api/v1/pow/validate", honest).status == 200
    fabricated = {"public_key": CASE["public_key"], "block_hash": CASE["block_hash"], "block_height": 12345,
                  "nonces": list(range(1000, 1040)), "dist": [0.5] * 40, "node_id": 0}
    assert node.api("POST", "/api/v1/pow/validate", fabricated).status == 200
    results = wait_until(lambda: len(receiver.received("validated")) >= 2 and receiver.received("validated"),
                         60, message="validated batches did not arrive")
    first, second = results[:2]
    assert list(first) == ["public_key", "block_hash", "block_height", "nonces", "dist", "node_id",
                           "received_dist", "r_target", "fraud_threshold", "n_invalid",
                           "probability_honest", "fraud_detected"]
    assert first["nonces"] == honest["nonces"] and first["received_dist"] == honest["dist"]
    assert first["n_invalid"] == 0 and first["fraud_detected"] is False and first["probability_honest"] == 1.0
    for mine, theirs in zip(first["dist"], honest["dist"], strict=True):
        assert abs(mine - theirs) < 1e-9
    assert second["nonces"] == fabricated["nonces"]
    assert second["n_invalid"] >= 3 and second["fraud_detected"] is True

    resp = node.api("POST", "/api/v1/stop")
    assert resp.json() == {"status": "OK"}
    assert node.api("GET", "/api/v1/state").json()["state"] == "STOPPED"
    assert node.api("GET", "/api/v1/pow/status").json()["status"] == "NOT_LOADED"


def test_bad_bodies_get_a_reason(node: Node, receiver: Receiver) -> None:
    good = json.loads(init_body(receiver.url))
    cases: list[tuple[Any, str]] = [
        ({**good, "node_id": -1}, "Node ID and node count must be set"),
        ({**good, "node_count": -1}, "Node ID and node count must be set"),
        ({k: v for k, v in good.items() if k != "block_hash"}, "block_hash"),
        ({**good, "r_target": "1.4"}, "r_target"),
        ({**good, "params": {**good["params"], "dim": 127}}, "dim"),
        ({**good, "params": {**good["params"], "use_scaled_rope": True}}, "use_scaled_rope"),
        ({**good, "url": "ftp://x"}, "url"),
        ([1, 2], "object"),
    ]
    for body, reason in cases:
        resp = node.api("POST", "/api/v1/pow/init/generate", body)
        assert resp.status == 400, (body, resp.body)
        assert reason in resp.json()["detail"]
    assert node.api("POST", "/api/v1/pow/phase/generate").json() == {"detail": "PoW is not running"}
    assert node.api("POST", "/api/v1/pow/validate", {"nonces": []}).status == 400

    assert node.api("POST", "/api/v1/pow/init", init_body(receiver.url)).status == 200
    batch = {"public_key": "k", "block_hash": CASE["block_hash"], "block_height": 1, "nonces": [1, 2],
             "dist": [1.0], "node_id": 0}
    for change, reason in [({}, "nonces has 2 entries but dist has 1"),
                           ({"block_hash": "0xFF", "dist": [1.0, 1.0]}, "does not match the loaded round"),
                           ({"dist": [1.0, "x"]}, "dist[1]"),
                           ({"nonces": [1, -2], "dist": [1.0, 1.0]}, "nonces[1]")]:
        resp = node.api("POST", "/api/v1/pow/validate", {**batch, **change})
        assert resp.status == 400 and reason in resp.json()["detail"], resp.body
    resp = node.api("POST", "/api/v1/pow/validate", b'{"dist": [NaN]}')
    assert resp.status == 400
    node.api("POST", "/api/v1/stop")


def test_nothing_is_lost_across_an_outage_and_a_kill_9(node: Node) -> None:
    """Receiver down, pow killed mid-round: after recovery every valid nonce arrives, none skipped."""
    fresh = Receiver()
    try:
        fresh.down()
        body = init_body(fresh.url, node_id=0, node_count=3)
        assert node.api("POST", "/api/v1/pow/init/generate", body).status == 200
        wait_until(lambda: node.api("GET", "/api/v1/pow/status").json().get("valid_found", 0) >= 10, 60)
        wait_until(lambda: fresh.refused >= 1, 30, message="delivery never tried")
        before = node.api("GET", "/api/v1/pow/status").json()
        old = node.pid("pow")
        os.kill(old, signal.SIGKILL)
        # The receiver comes back only once the killed process is gone and supervisord has run a new one.
        wait_until(lambda: node.pid("pow") not in (0, old), 30, message="pow was not restarted")
        fresh.up()
        # The restarted process resumes the round (the node is still in POW mode) and delivers.
        wait_until(lambda: node.api("GET", "/api/v1/pow/status").json().get("status") == "GENERATING", 60)
        assert node.api("GET", "/api/v1/state").json()["state"] == "POW"
        wait_until(lambda: len(generated(fresh)[0]) >= before["valid_found"] + 5, 90,
                   message="results found before the crash did not all arrive")
    finally:
        node.api("POST", "/api/v1/stop")
        fresh.close()
    nonces, dists = generated(fresh)
    assert all(n % 3 == 0 for n in nonces)
    assert all(d < R_TARGET for d in dists)
    distinct = sorted(set(nonces))
    # Repeats (work redone after the crash) must carry the same distance.
    for n in distinct:
        seen = {round(d, 12) for m, d in zip(nonces, dists, strict=True) if m == n}
        assert len(seen) == 1, (n, seen)
    # No gap: every valid nonce up to the last delivered one is there (recomputed independently).
    from services.pow.compute import discover_groups
    from services.pow.params import PowParams

    group = discover_groups(CASE["block_hash"], PowParams.from_dict(CASE["params"]), "cpu")[0]
    everything = list(range(0, distinct[-1] + 1, 3))
    recomputed = group.distances(CASE["public_key"], everything)
    expected = [n for n, d in zip(everything, recomputed, strict=True) if d < R_TARGET]
    assert distinct == expected


def test_a_mainnet_model_on_a_cpu_host_is_refused_not_oom(node: Node, receiver: Receiver) -> None:
    """The production shape (17.8 B params) cannot be built in this host's memory: a clear 503."""
    body = init_dict(receiver.url)
    body["params"] = {"dim": 1792, "n_layers": 64, "n_heads": 64, "n_kv_heads": 64, "vocab_size": 8196,
                      "ffn_dim_multiplier": 10, "multiple_of": 8192, "norm_eps": 0.00001,
                      "rope_theta": 10000, "use_scaled_rope": False, "seq_len": 256}
    resp = node.api("POST", "/api/v1/pow/init/generate", body)
    assert resp.status == 503
    assert "GiB of memory" in resp.json()["detail"]
    assert node.api("GET", "/api/v1/state").json()["state"] == "STOPPED"
