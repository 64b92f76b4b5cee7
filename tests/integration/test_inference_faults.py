"""Engines that crash or hang are replaced; no engine survives its `inference` process, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from tests.support.node import MLNODE, REPO, Node
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MODEL = "tiny-model"
HANG_AFTER = 3
HANG_S = 4.0


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("faults")
    subprocess.run([*MLNODE, "model", "create-tiny", str(root / MODEL)], check=True, cwd=REPO,
                   capture_output=True, timeout=120)
    # MLNODE_INFERENCE_AUTOSTART (what `make run` uses): the node comes up serving this directory.
    n = Node(root, MLNODE_ENGINE_HANG_SECONDS=str(HANG_S),
             MLNODE_INFERENCE_AUTOSTART=str(root / MODEL)).start()
    wait_until(lambda: serving_through_proxy(n), 60, 0.3, message=n.logs("inference"))
    state = n.api("GET", "/api/v1/state").json()
    assert state["state"] == "INFERENCE" and state["loaded_model"] == str(root / MODEL)
    yield n
    n.api("POST", "/api/v1/inference/down")
    n.stop()


def instance(node: Node) -> dict[str, Any]:
    return dict(node.service_status("inference")["instances"][0])


def serving_through_proxy(node: Node) -> bool:
    return node.inference("GET", "/health", timeout=5).status == 200


def events(node: Node, name: str) -> list[dict[str, Any]]:
    return [e for e in node.log_lines("inference") if e.get("event") == name]


def test_a_killed_engine_is_detected_reported_and_restarted(node: Node) -> None:
    [engine] = node.engine_pids()
    before = instance(node)
    assert before["pid"] == engine and before["healthy"] and before["state"] == "serving"
    os.kill(engine, signal.SIGKILL)
    after = wait_until(lambda: (i := instance(node))["restarts"] == before["restarts"] + 1
                       and i["healthy"] and i, 30, 0.5)
    assert after["pid"] != engine and after["last_exit"]["code"] == -signal.SIGKILL
    assert after["last_exit"]["reason"] == "crashed"
    assert any(e["pid"] == engine for e in events(node, "engine_crashed"))
    wait_until(lambda: serving_through_proxy(node), 15)
    assert node.api("GET", "/api/v1/state").json()["inference_healthy"] is True


def test_a_hung_engine_is_detected_within_the_window_and_replaced(node: Node) -> None:
    wait_until(lambda: serving_through_proxy(node), 15)
    [engine] = node.engine_pids()
    restarts = instance(node)["restarts"]
    body = {"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for _ in range(HANG_AFTER):
        assert node.inference("POST", "/v1/chat/completions", body).status == 200
    os.kill(engine, signal.SIGSTOP)  # a stopped process neither answers nor dies: a hang
    hung_since = time.time()  # the engine stops answering anything from here on
    wait_until(lambda: events(node, "engine_hung"), 3 * HANG_S, 0.2, message="hang not detected")
    detected = datetime.fromisoformat(events(node, "engine_hung")[-1]["timestamp"]).timestamp()
    # window + one poll + one probe timeout (HANG_S/10 and HANG_S/4) + scheduling slack
    assert detected - hung_since < HANG_S + HANG_S / 10 + HANG_S / 4 + 1.5, detected - hung_since
    after = wait_until(lambda: (i := instance(node))["healthy"] and i["pid"] != engine and i, 30, 0.5)
    assert after["restarts"] == restarts + 1 and after["last_exit"]["reason"].startswith("hung:")
    assert engine not in node.engine_pids()
    wait_until(lambda: serving_through_proxy(node), 15)


def test_supervisorctl_stop_inference_leaves_no_engine_behind(node: Node) -> None:
    assert node.engine_pids()
    node.ctl("stop", "inference")
    assert node.engine_pids() == []
    assert node.api("GET", "/api/v1/state").json()["state"] == "INFERENCE"  # claimed, restarting
    node.ctl("start", "inference")
    # The claim still names INFERENCE: the restarted service serves the same model again.
    wait_until(lambda: serving_through_proxy(node), 60, 0.3, message=node.logs("inference"))
    assert node.inference("GET", "/v1/models").json()["data"][0]["id"] == str(node.root / MODEL)


def test_kill_9_of_inference_leaves_no_engine_behind(node: Node) -> None:
    wait_until(lambda: serving_through_proxy(node), 30)
    engines = node.engine_pids()
    assert engines
    service = node.pid("inference")
    os.kill(service, signal.SIGKILL)
    wait_until(lambda: not set(engines) & set(node.engine_pids()), 5, 0.05,
               message="engine outlived inference")
    wait_until(lambda: node.pid("inference") not in (0, service), 20)
    wait_until(lambda: serving_through_proxy(node), 60, 0.3, message=node.logs("inference"))
    assert node.api("POST", "/api/v1/inference/down").json() == {"status": "OK"}
    wait_until(lambda: not node.engine_pids(), 30, message="an engine outlived the down")
