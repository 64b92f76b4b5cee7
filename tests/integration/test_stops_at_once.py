"""Every stop answers at once, whatever the service is doing (issue 12, case 3).

Each stop is replayed as the Network Node sends it (no body, no Content-Type) with an HTTP timeout of
ANSWER_WITHIN_S: a late answer fails the request itself, so the timing is asserted by the outcome. The
node must then read STOPPED, release the compute soon after, and start the next job cleanly.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.node import Node, Response
from tests.support.pow import init_dict
from tests.support.receiver import Receiver
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

ANSWER_WITHIN_S = 2.0
#: Builds in ~5 s on an idle core (much longer under load); one batch takes tens of seconds.
SLOW_PARAMS: dict[str, Any] = {
    "dim": 768, "n_layers": 24, "n_heads": 12, "n_kv_heads": 12, "vocab_size": 4096,
    "ffn_dim_multiplier": 1.3, "multiple_of": 256, "norm_eps": 0.00001,
    "rope_theta": 10000, "use_scaled_rope": False, "seq_len": 64,
}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("stops")).start()
    yield n
    n.stop()


def stop_now(node: Node, path: str) -> Response:
    """POST a stop exactly as the client does; raises (fails the test) if not answered in time."""
    resp = node.api("POST", path, timeout=ANSWER_WITHIN_S)
    assert resp.status < 500, resp.body
    return resp


def state(node: Node) -> str:
    return str(node.api("GET", "/api/v1/state").json()["state"])


def events(node: Node, program: str, name: str) -> list[dict[str, Any]]:
    return [e for e in node.log_lines(program) if e.get("event") == name]


def slow_round(receiver: Receiver, block_height: int) -> dict[str, Any]:
    body = init_dict(receiver.url, block_height=block_height)
    body["params"] = dict(SLOW_PARAMS)
    return body


def test_pow_stop_while_the_model_builds(node: Node, receiver: Receiver) -> None:
    before = len(events(node, "pow", "pow_model_build_cancelled"))
    resp = node.api("POST", "/api/v1/pow/init/generate", slow_round(receiver, 501))
    assert resp.status == 200, resp.body
    assert resp.json()["pow_status"]["status"] == "LOADING"
    assert stop_now(node, "/api/v1/pow/stop").json()["status"] == "OK"
    assert state(node) == "STOPPED"
    # The build is abandoned between layers: the CPU is free long before the build would have ended.
    wait_until(lambda: len(events(node, "pow", "pow_model_build_cancelled")) > before, 60,
               message="the model build was not cancelled")
    assert not events(node, "pow", "pow_model_built")


def test_stop_in_the_middle_of_a_cpu_batch(node: Node, receiver: Receiver) -> None:
    resp = node.api("POST", "/api/v1/pow/init/generate", slow_round(receiver, 502))
    assert resp.status == 200, resp.body
    wait_until(lambda: node.api("GET", "/api/v1/pow/status").json()["status"] == "GENERATING", 180)
    cancelled = len(events(node, "pow", "pow_group_cancelled"))
    assert stop_now(node, "/api/v1/stop").json() == {"status": "OK"}
    assert state(node) == "STOPPED"
    wait_until(lambda: len(events(node, "pow", "pow_group_cancelled")) > cancelled, 60,
               message="the batch in progress was not abandoned")
    # The next round starts clean: its own status, nothing of round 502 carried over.
    resp = node.api("POST", "/api/v1/pow/init/generate", init_dict(receiver.url, block_height=503))
    assert resp.status == 200, resp.body
    status = resp.json()["pow_status"]
    assert status["block_height"] == 503 and status["validation_queue"] == 0
    wait_until(lambda: any(b["block_height"] == 503 for b in receiver.received("generated")), 60)
    assert stop_now(node, "/api/v1/stop").json() == {"status": "OK"}
    assert state(node) == "STOPPED"


def test_inference_down_while_an_engine_starts(node: Node) -> None:
    resp = node.api("POST", "/api/v1/inference/up/async", {"model": "stop-test", "dtype": "auto",
                                                           "additional_args": []})
    assert resp.status == 200, resp.body
    assert stop_now(node, "/api/v1/inference/down").json()["status"] == "OK"
    assert state(node) == "STOPPED"
    wait_until(lambda: not node.engine_pids(), 30, message="an engine outlived the down")


def test_stop_while_an_engine_serves(node: Node) -> None:
    resp = node.api("POST", "/api/v1/inference/up", {"model": "stop-test", "dtype": "auto",
                                                     "additional_args": []}, timeout=180)
    assert resp.status == 200, resp.body
    assert stop_now(node, "/api/v1/stop").json() == {"status": "OK"}
    assert state(node) == "STOPPED"
    wait_until(lambda: not node.engine_pids(), 30, message="an engine outlived the stop")


def test_train_stop_while_a_run_checkpoints(node: Node) -> None:
    body = copy.deepcopy(TRAIN_BODY)
    resp = node.api("POST", "/api/v1/train/start", body)
    assert resp.status == 200, resp.body
    wait_until(lambda: node.api("GET", "/api/v1/train/status").json().get("inner_step", 0) >= 1, 120)
    assert stop_now(node, "/api/v1/train/stop").json()["status"] == "Training stopped"
    assert state(node) == "STOPPED"
    # A second stop of nothing is the contract's 400, still not a 5xx.
    assert stop_now(node, "/api/v1/train/stop").status == 400
    wait_until(lambda: events(node, "train", "train_run_wound_down"), 120,
               message="the stopped run did not wind down")
    # The next start finds nothing of the old run in its way.
    resp = node.api("POST", "/api/v1/train/start", copy.deepcopy(TRAIN_BODY))
    assert resp.status == 200, resp.body
    assert stop_now(node, "/api/v1/stop").json() == {"status": "OK"}
    assert state(node) == "STOPPED"


#: One node, a model big enough that each step and each checkpoint (every step) take a while.
TRAIN_BODY: dict[str, Any] = {
    "train_config": {
        "model": {"dim": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "seed": 3},
        "train": {"micro_bs": 2},
        "data": {"seq_length": 64},
        "optim": {"batch_size": 4, "total_steps": 100000, "lr": 3e-3, "warmup_steps": 5},
        "diloco": {"inner_steps": 5},
        "ckpt": {"interval": 1, "path": "ckpt/stops"},
    },
    "train_env": {"TASK_ID": "stops", "GLOBAL_RANK": "0", "GLOBAL_WORLD_SIZE": "1"},
}


def test_a_stop_answers_even_with_a_service_down(node: Node) -> None:
    node.ctl("stop", "pow")
    try:
        assert stop_now(node, "/api/v1/stop").json() == {"status": "OK"}
        assert stop_now(node, "/api/v1/pow/stop").status == 200  # unconfirmed, but not a failure
    finally:
        node.ctl("start", "pow")
    node.wait_services()
    assert state(node) == "STOPPED"
