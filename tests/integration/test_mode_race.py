"""The 409 rule under concurrency: racing starts of different services across gunicorn workers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.node import Node, Response
from tests.support.pow import init_body
from tests.support.receiver import Receiver
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CONFLICT = "Cannot run {want} because MLNode is currently in {have} mode. Please stop {have} first."


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("race"), MLNODE_GATEWAY_WORKERS="4").start()
    yield n
    n.stop()


def race(node: Node, calls: list[tuple[str, str, Any]]) -> list[tuple[str, Response]]:
    barrier = threading.Barrier(len(calls))
    results: list[tuple[str, Response]] = []
    lock = threading.Lock()

    def fire(path: str, body: Any) -> None:
        barrier.wait()
        resp = node.api("POST", path, body, timeout=120)
        with lock:
            results.append((path, resp))

    threads = [threading.Thread(target=fire, args=(path, body)) for _, path, body in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    return results


def test_racing_starts_never_leave_two_services_running(node: Node) -> None:
    receiver = Receiver()
    up = {"model": "race/tiny-model", "dtype": "float16", "additional_args": []}
    pow_path, inf_path = "/api/v1/pow/init/generate", "/api/v1/inference/up/async"
    try:
        winners = set()
        for _ in range(4):
            assert node.api("POST", "/api/v1/stop").status == 200
            calls = [("POW", pow_path, init_body(receiver.url)), ("INFERENCE", inf_path, up)] * 3
            results = race(node, calls)
            assert len(results) == 6
            ok = {path for path, r in results if r.status == 200}
            assert len(ok) == 1, [(p, r.status, r.body[:200]) for p, r in results]
            winner = "POW" if ok == {pow_path} else "INFERENCE"
            loser = "INFERENCE" if winner == "POW" else "POW"
            winners.add(winner)
            for path, r in results:
                if path not in ok:
                    assert r.status == 409, r.body
                    assert r.json() == {"detail": CONFLICT.format(want=loser, have=winner)}
            state = wait_until(lambda: node.api("GET", "/api/v1/state").json()["state"], 30)
            assert state == winner
            active = {s: node.service_status(s)["active"] for s in ("pow", "inference", "train")}
            assert active == {"pow": winner == "POW", "inference": winner == "INFERENCE", "train": False}
            # Status routes of the other service are 409 too.
            other = "/api/v1/inference/up/status" if winner == "POW" else "/api/v1/pow/status"
            resp = node.api("GET", other)
            assert resp.status == 409 and resp.json()["detail"] == CONFLICT.format(want=loser, have=winner)
        assert node.api("POST", "/api/v1/stop").json() == {"status": "OK"}
        assert node.api("GET", "/api/v1/state").json()["state"] == "STOPPED"
        assert all(not node.service_status(s)["active"] for s in ("pow", "inference", "train"))
    finally:
        node.api("POST", "/api/v1/stop")
        receiver.close()
