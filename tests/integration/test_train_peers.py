"""DiLoCo across three real nodes on loopback (each its own supervisord), over CURVE peer links.

The weights every node ends with are compared through ``weights_digest`` with the one-process
simulation of the same run; faults are real: a train process killed -9 (supervisord restarts it and
it rejoins), a process frozen with SIGSTOP (a peer that stalls), a fourth node with a valid key that
nobody registered.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from services.train.config import TrainPlan
from services.train.runner import weights_digest
from services.train.simulate import simulate
from tests.support.node import Node, request
from tests.support.ports import free_ports
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def start_nodes(root: Path, n: int) -> list[Node]:
    nodes = [Node(root / f"node{i}") for i in range(n)]
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda node: node.start(), nodes))
    return nodes


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Node]]:
    started = start_nodes(tmp_path_factory.mktemp("peers"), 3)
    yield started
    for node in started:
        node.stop()


def key_of(node: Node) -> str:
    return str(node.api("GET", "/api/v1/identity").json()["public_key"])


def entry(node: Node, rank: int, port: int) -> dict[str, Any]:
    return {"node_id": f"node-{rank}", "public_key": key_of(node), "address": f"127.0.0.1:{port}",
            "rank": rank}


def register(node: Node, task: str, peers: list[dict[str, Any]]) -> None:
    resp = node.api("POST", "/api/v1/train/peers", {"task_id": task, "peers": peers, "replace": True})
    assert resp.status == 200, resp.body
    assert [p["node_id"] for p in resp.json()["peers"]] == [p["node_id"] for p in peers]


def body(
    task: str, rank: int, ports: list[int], *, total: int, inner: int, timeout: float,
    compression: str = "none",
) -> dict[str, Any]:
    return {
        "train_config": {
            "model": {"dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "seed": 5},
            "train": {"micro_bs": 2},
            "data": {"seq_length": 32},
            "optim": {"batch_size": 4, "total_steps": total, "lr": 3e-3, "warmup_steps": 2},
            "diloco": {"inner_steps": inner, "peer_timeout_s": timeout, "compression": compression},
            "ckpt": {"interval": inner, "path": f"ckpt/{task}"},
        },
        "train_env": {
            "TASK_ID": task, "GLOBAL_ADDR": "127.0.0.1", "GLOBAL_PORT": str(ports[0]),
            "GLOBAL_RANK": str(rank), "GLOBAL_WORLD_SIZE": "3", "BASE_PORT": str(ports[rank]),
        },
    }


def status(node: Node) -> dict[str, Any]:
    resp = node.api("GET", "/api/v1/train/status")
    assert resp.status == 200, resp.body
    return dict(resp.json())


def polled(node: Node) -> dict[str, Any]:
    """The status, or {} while the train process is (re)starting and not answering the bus yet."""
    resp = node.api("GET", "/api/v1/train/status")
    if resp.status == 503:
        return {}
    assert resp.status == 200, resp.body
    return dict(resp.json())


def wait_finished(node: Node, timeout: float = 120) -> dict[str, Any]:
    return dict(wait_until(lambda: (s := status(node))["state"] == "FINISHED" and s, timeout,
                           message=f"not finished: {status(node)}\n{node.logs('train', 60)}"))


def expected_digest(train_body: dict[str, Any], world: int, tmp: Path) -> str:
    plan, _ = TrainPlan.from_request(train_body, state_dir=tmp)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return weights_digest(simulate(plan, world, plan.outer_rounds))
    finally:
        torch.set_num_threads(before)


def peer_auth_failures(node: Node) -> float:
    text = request(node.api_port, "GET", "/metrics").body.decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("mlnode_bus_auth_failures_total{") and 'domain="peers"' in line \
                and 'service="train"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_three_nodes_match_the_simulation_and_refuse_a_stranger(
    nodes: list[Node], tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    task = "t3"
    ports = free_ports(4)
    honest = [entry(node, rank, ports[rank]) for rank, node in enumerate(nodes)]
    for node in nodes:
        register(node, task, honest)
    # The stranger has a valid CURVE key and knows everyone, claims rank 2, but nobody registered it.
    (stranger,) = start_nodes(tmp_path_factory.mktemp("stranger"), 1)
    try:
        register(stranger, task, [*honest[:2], entry(stranger, 2, ports[3])])
        plan_body = body(task, 0, ports, total=30, inner=5, timeout=10)
        strange = body(task, 2, ports, total=30, inner=5, timeout=2)
        strange["train_env"]["BASE_PORT"] = str(ports[3])
        assert stranger.api("POST", "/api/v1/train/start", strange).status == 200
        start_all(nodes, task, ports, total=30, inner=5, timeout=10)
        done = [wait_finished(node) for node in nodes]
        expected = expected_digest(plan_body, 3, tmp_path)
        for st in done:
            assert st["outer_step"] == 6 and st["contributors"] == [0, 1, 2], st
            assert st["weights_digest"] == expected
            assert st["loss"] < st["loss_first"], "the loss went down"
            assert st["bytes_exchanged"] > 0 and len(st["peers"]) == 3
        assert sum(peer_auth_failures(node) for node in nodes) > 0, "the stranger was never refused"
        assert node_state(nodes[0]) == "STOPPED"  # a finished run holds the node no longer
    finally:
        stranger.stop()


def test_three_nodes_exchanging_int8_end_identical_to_the_int8_simulation(
    nodes: list[Node], tmp_path: Path
) -> None:
    task = "q3"
    ports = free_ports(3)
    for node in nodes:
        register(node, task, [entry(n, rank, ports[rank]) for rank, n in enumerate(nodes)])
    start_all(nodes, task, ports, total=20, inner=5, timeout=10, compression="int8")
    done = [wait_finished(node) for node in nodes]
    plan: dict[str, Any] = {"total": 20, "inner": 5, "timeout": 10}
    int8 = expected_digest(body(task, 0, ports, **plan, compression="int8"), 3, tmp_path)
    fp32 = expected_digest(body(task, 0, ports, **plan), 3, tmp_path)
    assert int8 != fp32
    for st in done:
        assert st["outer_step"] == 4 and st["contributors"] == [0, 1, 2], st
        assert st["weights_digest"] == int8
        assert st["loss"] < st["loss_first"], "the loss went down"


def node_state(node: Node) -> str:
    return str(node.api("GET", "/api/v1/state").json()["state"])


def start_all(nodes: list[Node], task: str, ports: list[int], **plan: Any) -> None:
    for rank, node in enumerate(nodes):
        resp = node.api("POST", "/api/v1/train/start", body(task, rank, ports, **plan))
        assert resp.status == 200, resp.body
        assert resp.json()["status"] == "Training started"


def test_a_stalled_peer_is_dropped_a_killed_one_rejoins_and_all_end_identical(nodes: list[Node]) -> None:
    task = "f3"
    ports = free_ports(3)
    for node in nodes:
        register(node, task, [entry(n, rank, ports[rank]) for rank, n in enumerate(nodes)])
    total, inner = 5000, 50
    start_all(nodes, task, ports, total=total, inner=inner, timeout=2)
    a, b, c = nodes
    wait_until(lambda: all(status(n)["outer_step"] >= 2 for n in nodes), 90,
               message="no outer steps")

    # Frozen (sockets open, nothing sent): the others drop it after the peer timeout and carry on.
    pid = c.pid("train")
    os.kill(pid, signal.SIGSTOP)
    dropped = wait_until(lambda: (s := status(a))["contributors"] == [0, 1] and s, 60,
                         message="the stalled peer was never dropped")
    wait_until(lambda: status(a)["outer_step"] >= dropped["outer_step"] + 2, 60, message="a stopped training")
    # Killed -9 while frozen: supervisord restarts it; it resumes its checkpoint, finds the peers ahead,
    # loads their weights and momentum, and takes part again.
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: c.pid("train") not in (0, pid), 30, message="supervisord did not restart train")
    rejoined = wait_until(lambda: (s := polled(c)).get("rejoins", 0) >= 1 and s, 60,
                          message="the restarted peer never rejoined")
    assert rejoined["resumed_from"] is not None
    back = wait_until(lambda: (s := status(a))["contributors"] == [0, 1, 2] and s, 60,
                      message="the restarted peer never contributed again")
    assert back["state"] == "RUNNING", "the run ended before the restarted peer was back: make it longer"

    # Frozen again until the others finish without it; thawed, it catches up and ends identical.
    pid = c.pid("train")
    os.kill(pid, signal.SIGSTOP)
    try:
        done = [wait_finished(n) for n in (a, b)]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert done[0]["weights_digest"] == done[1]["weights_digest"]
    assert done[0]["contributors"] == [0, 1]
    assert done[0]["outer_step"] == -(-total // inner)
    late = wait_finished(c)  # thawed, not restarted: it answers
    assert late["weights_digest"] == done[0]["weights_digest"]
    assert late["outer_step"] == done[0]["outer_step"]
