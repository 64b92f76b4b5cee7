"""kill -9 of the gateway, inference and train processes while they work (pow: see test_faults_pow).

Each promise: supervisord restarts the process within seconds, the restart is counted in /metrics, and
/api/v1/state tells the truth — while the process is down (the mode claim) and after it is back (the
state equals the service that reports itself active).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.node import Node, request
from tests.support.pow import init_dict
from tests.support.receiver import Receiver
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MODE_OF = {"pow": "POW", "inference": "INFERENCE", "train": "TRAIN"}

UP = {"model": "tiny-kill", "dtype": "auto", "additional_args": []}


def init_body(url: str) -> dict[str, Any]:
    return init_dict(url, block_height=5)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("kill")).start()
    yield n
    n.stop()


def truthful_state(node: Node) -> str:
    """The state, once /state and the services' own reports agree (raises if they never do)."""
    def agree() -> str | None:
        health = node.api("GET", "/health", timeout=10)
        if health.status != 200:
            return None
        active = [MODE_OF[s] for s, m in health.json()["managers"].items() if m.get("active")]
        state = node.api("GET", "/api/v1/state", timeout=10).json()["state"]
        expected = active[0] if len(active) == 1 else "STOPPED" if not active else None
        return state if state == expected else None

    return str(wait_until(agree, 30, 0.3, message="state and services disagree"))


def restarts(node: Node, program: str) -> float:
    prefix = f'mlnode_process_restarts_total{{program="{program}"}} '
    text = node.api("GET", "/metrics", timeout=5).body.decode()
    return float(next(line for line in text.splitlines() if line.startswith(prefix)).split()[-1])


def kill_and_wait(node: Node, program: str) -> float:
    """SIGKILL the program; returns the seconds until supervisord runs a new one."""
    old = node.pid(program)
    assert old > 0
    os.kill(old, signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: node.pid(program) not in (0, old), 30, 0.1, message=f"{program} not restarted")
    return time.monotonic() - killed


def test_inference_killed_while_serving_comes_back_serving(node: Node) -> None:
    """Promise: the claim keeps the node in INFERENCE while the process is down, and the restarted
    process serves the same model again (the proxy answers) within seconds."""
    assert node.api("POST", "/api/v1/inference/up", UP, timeout=120).status == 200
    try:
        assert node.inference("GET", "/v1/models").status == 200
        baseline = restarts(node, "inference")
        kill_and_wait(node, "inference")
        assert node.api("GET", "/api/v1/state").json()["state"] == "INFERENCE"
        wait_until(lambda: node.api("GET", "/api/v1/state").json().get("inference_healthy") is True, 60,
                   message="inference did not serve again")
        models = node.inference("GET", "/v1/models", timeout=10).json()
        assert models["data"][0]["id"] == UP["model"]
        assert truthful_state(node) == "INFERENCE"
        assert restarts(node, "inference") == baseline + 1
    finally:
        node.api("POST", "/api/v1/stop", timeout=60)
    assert truthful_state(node) == "STOPPED"


def test_gateway_killed_under_load_and_mid_claim_stays_consistent(node: Node, receiver: Receiver) -> None:
    """Promise: clients see the gateway gone for a few seconds at most; the mode lock dies with it (the
    next start is not blocked), a claim cut off mid-way leaves the state and the services agreeing, and
    no second service starts."""
    baseline = restarts(node, "gateway")
    statuses: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                statuses.append(request(node.api_port, "GET", "/api/v1/state", timeout=10).status)
            except (OSError, http.client.HTTPException):
                time.sleep(0.05)  # the gateway is down: a client retries at its own pace

    pollers = [threading.Thread(target=poll, daemon=True) for _ in range(20)]
    for t in pollers:
        t.start()
    claim = threading.Thread(target=lambda: _quietly(node, "POST", "/api/v1/pow/init/generate",
                                                     init_body(receiver.url)), daemon=True)
    claim.start()
    time.sleep(0.05)  # the scenario: the kill lands while the claim is (most likely) under way
    master = node.pid("gateway")
    workers = children(master)
    assert len(workers) >= 1
    try:
        killed = time.monotonic()
        kill_and_wait(node, "gateway")
        # The killed master's workers must go too: they hold the ports the new master has to bind.
        wait_until(lambda: not any(alive(w) for w in workers), 20, 0.1, message=f"orphaned workers {workers}")
        # The outage's bar (15 s from the kill) is this wait's deadline.
        wait_until(lambda: node.api("GET", "/api/v1/state", timeout=5).status == 200,
                   max(0.1, killed + 15 - time.monotonic()), 0.2, message="the gateway came back too late")
        new_master = node.pid("gateway")
        assert children(new_master), "the new gateway master has no workers"
        answered = len(statuses)  # the pollers go on against the new gateway before they are stopped
        wait_until(lambda: len(statuses) >= answered + 20, 30, message="the pollers got no answers after")
    finally:
        stop.set()
        for t in pollers:
            t.join(15)
        claim.join(30)
    assert statuses and set(statuses) == {200}, set(statuses)
    assert truthful_state(node) in ("POW", "STOPPED")
    assert node.api("POST", "/api/v1/stop", timeout=60).status == 200
    assert node.api("POST", "/api/v1/inference/up/async", UP, timeout=30).status == 200  # lock is free
    assert truthful_state(node) == "INFERENCE"
    assert node.api("POST", "/api/v1/stop", timeout=60).status == 200
    assert truthful_state(node) == "STOPPED"
    assert node.pid("gateway") == new_master, "the new gateway master did not stay up"
    wait_until(lambda: restarts(node, "gateway") == baseline + 1, 10)


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _quietly(node: Node, method: str, path: str, body: Any) -> None:
    # The gateway may die under this request: that is the fault being injected.
    with contextlib.suppress(OSError, http.client.HTTPException):
        node.api(method, path, body, timeout=30)


def test_train_killed_while_running_is_restarted_and_state_stays_truthful(node: Node) -> None:
    """Promise: while train is down the claim keeps the node in TRAIN; after the restart /state agrees
    with what the train service reports (resumed: TRAIN; gone: STOPPED) — never a stale TRAIN."""
    body = {"train_config": {"model": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1},
                             "optim": {"total_steps": 100000, "batch_size": 2}, "train": {"micro_bs": 1},
                             "data": {"seq_length": 16}},
            "train_env": {"TASK_ID": "kill-test", "GLOBAL_WORLD_SIZE": "1", "GLOBAL_RANK": "0"}}
    resp = node.api("POST", "/api/v1/train/start", body, timeout=60)
    assert resp.status == 200, resp.body
    try:
        assert truthful_state(node) == "TRAIN"
        baseline = restarts(node, "train")
        kill_and_wait(node, "train")
        assert node.api("GET", "/api/v1/state").json()["state"] == "TRAIN"
        node.wait_services()
        assert truthful_state(node) in ("TRAIN", "STOPPED")
        assert restarts(node, "train") == baseline + 1
    finally:
        node.api("POST", "/api/v1/stop", timeout=60)
    assert truthful_state(node) == "STOPPED"
