"""``POST /api/v1/inference/up`` while an engine serves replaces it, as the reference node does (issue 12,
case 2); concurrent ups still leave exactly one engine, and ``up/async`` keeps the contract's 409.

Bodies are replayed as the Network Node sends them: JSON without a Content-Type header.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.node import Node, Response
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

UP_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("up-replaces")).start()
    yield n
    n.stop()


def up(node: Node, model: str, path: str = "/api/v1/inference/up") -> Response:
    body = {"model": model, "dtype": "float16", "additional_args": []}
    return node.api("POST", path, body, timeout=UP_TIMEOUT_S)


def served_model(node: Node) -> str:
    return str(node.inference("GET", "/v1/models").json()["data"][0]["id"])


def one_engine_left(node: Node) -> bool:
    return len(node.service_status("inference")["instances"]) == 1 and len(node.engine_pids()) == 1


def test_up_while_serving_replaces_the_engine(node: Node) -> None:
    resp = up(node, "org/first-model")
    assert resp.status == 200 and resp.json() == {"status": "OK"}, resp.body
    assert served_model(node) == "org/first-model"
    first = node.engine_pids()

    resp = up(node, "org/second-model")  # the reference stops the running engine and starts this one
    assert resp.status == 200 and resp.json() == {"status": "OK"}, resp.body
    assert served_model(node) == "org/second-model"
    state = node.api("GET", "/api/v1/state").json()
    assert state["state"] == "INFERENCE" and state["loaded_model"] == "org/second-model"
    wait_until(lambda: one_engine_left(node) and not set(first) & set(node.engine_pids()), 30,
               message="the replaced engine is still alive")

    resp = up(node, "org/second-model")  # the same model again: restarted too, still one engine
    assert resp.status == 200 and resp.json() == {"status": "OK"}, resp.body
    wait_until(lambda: one_engine_left(node), 30)


def test_up_async_while_serving_is_still_409(node: Node) -> None:
    assert node.api("GET", "/api/v1/inference/up/status").json()["is_running"]
    resp = up(node, "org/third-model", "/api/v1/inference/up/async")
    assert resp.status == 409, resp.body
    assert served_model(node) == "org/second-model"


def test_concurrent_ups_leave_exactly_one_engine(node: Node) -> None:
    models = ["org/race-a", "org/race-b"]
    with ThreadPoolExecutor(2) as pool:
        answers = dict(zip(models, pool.map(lambda m: up(node, m), models), strict=True))
    statuses = sorted(r.status for r in answers.values())
    # Either both ran one after the other, or the later one replaced the earlier one while it started.
    assert statuses in ([200, 200], [200, 409]), {m: r.body for m, r in answers.items()}
    winners = [m for m, r in answers.items() if r.status == 200]
    assert served_model(node) in winners
    wait_until(lambda: one_engine_left(node), 30, message="more than one engine survived the race")
    status = node.api("GET", "/api/v1/inference/up/status").json()
    assert status["status"] == "completed" and status["model"] == served_model(node)

    assert node.api("POST", "/api/v1/inference/down").json() == {"status": "OK"}
    assert node.api("GET", "/api/v1/state").json()["state"] == "STOPPED"
    wait_until(lambda: not node.engine_pids(), 30, message="an engine outlived the down")
