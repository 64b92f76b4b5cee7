"""Training on one real node: the client's payload end to end, the 400s and the 409 rule, resume.

The node runs under its own supervisord; training runs in the real train process. Final weights are
compared through ``weights_digest`` (sha256 of the global weights), computed here from
:func:`services.train.simulate.simulate` of the same plan with the same thread count (1).
"""

from __future__ import annotations

import copy
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from node.identity import KeyPair
from services.train.config import TrainPlan
from services.train.runner import weights_digest
from services.train.simulate import simulate
from tests.support.node import Node
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CLIENT_PAYLOAD: dict[str, Any] = {
    "train_config": {
        "project": "1B-ft-xlam", "name": "refactor test 3090", "description": "3090 micro bs2",
        "group": "base",
        "tags": ["1x1", "no-diloco"], "train": {"micro_bs": 2, "eval_interval": 50},
        "data": {"seq_length": 1024},
        "optim": {"sched_type": "cosine", "batch_size": 32, "warmup_steps": 50, "total_steps": 6000,
                  "adam_betas1": 0.9, "adam_betas2": 0.95, "weight_decay": 0.1, "lr": 5e-6},
        "diloco": {"inner_steps": 50}, "ckpt": {"interval": 1000, "topk": 6, "path": "outputs/1B_4x1-lr"},
    },
    "train_env": {
        "TASK_ID": "7", "NODE_ID": "gonka1abc/node-1", "STORE_API_URL": "api-private:9300",
        "GLOBAL_ADDR": "10.0.0.5", "GLOBAL_PORT": "5565", "GLOBAL_RANK": "1", "GLOBAL_UNIQUE_ID": "1",
        "GLOBAL_WORLD_SIZE": "3", "BASE_PORT": "10001",
    },
}


def one_node_payload() -> dict[str, Any]:
    body = copy.deepcopy(CLIENT_PAYLOAD)
    body["train_env"].update(GLOBAL_RANK="0", GLOBAL_WORLD_SIZE="1")
    return body


def tiny_body(total_steps: int, *, resume: bool = False, task: str = "solo") -> dict[str, Any]:
    return {
        "train_config": {
            "model": {"dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "seed": 3},
            "train": {"micro_bs": 2},
            "data": {"seq_length": 32},
            "optim": {"batch_size": 4, "total_steps": total_steps, "lr": 3e-3, "warmup_steps": 5},
            "diloco": {"inner_steps": 5},
            "ckpt": {"interval": 5, "path": f"ckpt/{task}", "resume": resume},
        },
        "train_env": {"TASK_ID": task, "GLOBAL_RANK": "0", "GLOBAL_WORLD_SIZE": "1"},
    }


def expected_digest(body: dict[str, Any], world: int, tmp: Any) -> str:
    plan, _ = TrainPlan.from_request(body, state_dir=tmp)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return weights_digest(simulate(plan, world, plan.outer_rounds))
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("train")).start()
    yield n
    n.stop()


def status(node: Node) -> dict[str, Any]:
    resp = node.api("GET", "/api/v1/train/status")
    assert resp.status == 200, resp.body
    return dict(resp.json())


def wait_state(node: Node, state: str, timeout: float = 90) -> dict[str, Any]:
    return dict(wait_until(lambda: (s := status(node))["state"] == state and s, timeout,
                           message=f"train never reached {state}: {status(node)}\n{node.logs('train')}"))


def test_the_clients_payload_starts_reports_and_stops(node: Node) -> None:
    assert node.api("POST", "/api/v1/stop").json() == {"status": "OK"}
    assert status(node)["status"] is False
    resp = node.api("POST", "/api/v1/train/start", one_node_payload())
    assert resp.status == 200, resp.body
    started = resp.json()
    assert started["status"] == "Training started"
    assert any("train_config.project" in n for n in started["notes"])
    assert any("STORE_API_URL" in n for n in started["notes"])
    assert node.api("GET", "/api/v1/state").json()["state"] == "TRAIN"
    assert node.service_status("train")["active"] is True

    # Another start is the contract's 400; other services get the 409 rule.
    again = node.api("POST", "/api/v1/train/start", one_node_payload())
    assert again.status == 400 and again.json()["detail"] == "Training is already running"
    pow_status = node.api("GET", "/api/v1/pow/status")
    assert pow_status.status == 409, pow_status.body
    assert "currently in TRAIN mode" in pow_status.json()["detail"]

    # The peer registry answers in any mode (no 409) and lists per task through the query string.
    key = node.api("GET", "/api/v1/identity").json()["public_key"]
    peer = {"node_id": "me", "public_key": key, "address": "127.0.0.1:7001", "rank": 0}
    registered = node.api("POST", "/api/v1/train/peers", {"task_id": "x", "peers": [peer]})
    assert registered.status == 200, registered.body
    listed = node.api("GET", "/api/v1/train/peers?task_id=x").json()
    assert listed == {"task_id": "x", "peers": [peer]}
    bad = node.api("POST", "/api/v1/train/peers", {"task_id": "x", "peers": [{**peer, "address": "nope"}]})
    assert bad.status == 400 and "peers[0].address" in bad.json()["detail"]
    assert node.api("POST", "/api/v1/train/peers/remove", {"task_id": "x", "node_id": "me"}).status == 200
    assert node.api("POST", "/api/v1/train/peers/remove", {"task_id": "x", "node_id": "me"}).status == 404

    running = wait_until(lambda: (s := status(node))["inner_step"] >= 1 and s, 60,
                         message=f"no inner step: {node.logs('train')}")
    assert running["status"] is True and running["loss"] > 0
    assert running["total_steps"] == 6000 and running["world_size"] == 1
    stopped = node.api("POST", "/api/v1/train/stop")
    assert stopped.status == 200 and stopped.json()["status"] == "Training stopped"
    assert status(node)["status"] is False
    assert node.api("GET", "/api/v1/state").json()["state"] == "STOPPED"
    second = node.api("POST", "/api/v1/train/stop")
    assert second.status == 400 and second.json()["detail"] == "Training is not running"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"train_config": {"optim": {"lr": "fast"}}}, "train_config.optim.lr"),
        ({"train_env": {"GLOBAL_RANK": "x"}}, "GLOBAL_RANK"),
        ({"train_config": {"diloco": {"peer_timeout_s": -1}}}, "peer_timeout_s"),
        ({"train_config": {"diloco": {"compression": "zstd"}}}, "train_config.diloco.compression"),
        ({"train_config": "nope"}, "train_config"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(node: Node, patch: dict[str, Any], field: str) -> None:
    body = one_node_payload()
    for section, value in patch.items():
        if isinstance(value, dict):
            for key, inner in value.items():
                if isinstance(inner, dict):
                    body[section].setdefault(key, {}).update(inner)
                else:
                    body[section][key] = inner
        else:
            body[section] = value
    resp = node.api("POST", "/api/v1/train/start", body)
    assert resp.status == 400, resp.body
    assert field in resp.json()["detail"]
    assert node.api("GET", "/api/v1/state").json()["state"] == "STOPPED"


def test_a_multi_node_start_without_registered_peers_is_refused(node: Node) -> None:
    resp = node.api("POST", "/api/v1/train/start", CLIENT_PAYLOAD)
    assert resp.status == 400
    assert "no peers are registered for task '7'" in resp.json()["detail"]
    assert node.api("GET", "/api/v1/state").json()["state"] == "STOPPED"


def test_a_multi_node_start_without_rank_0_registered_with_its_rank_is_refused(node: Node) -> None:
    """A peer registered without a rank may not speak as rank 0 (the preferred coordinator), so a run
    whose rank 0 has no registered rank could never hear it: refused at the start, not dropped later."""
    key = KeyPair.generate().public
    rankless = {"node_id": "n0", "public_key": key, "address": "127.0.0.1:7002"}
    assert node.api("POST", "/api/v1/train/peers", {"task_id": "r0", "peers": [rankless]}).status == 200
    body = copy.deepcopy(CLIENT_PAYLOAD)
    body["train_env"]["TASK_ID"] = "r0"
    resp = node.api("POST", "/api/v1/train/start", body)
    assert resp.status == 400
    assert "no peer of task 'r0' is registered as rank 0" in resp.json()["detail"]
    assert node.api("GET", "/api/v1/state").json()["state"] == "STOPPED"


def test_checkpoint_stop_resume_continues_the_curve_bit_exactly(node: Node, tmp_path: Any) -> None:
    body = tiny_body(1500)
    assert node.api("POST", "/api/v1/train/start", body).status == 200
    first = wait_until(lambda: (s := status(node))["inner_step"] >= 12 and s, 60,
                       message=f"no progress: {node.logs('train')}")
    assert node.api("POST", "/api/v1/train/stop").status == 200
    assert status(node)["status"] is False  # at once; the run then finishes its step and checkpoint
    stopped = wait_until(lambda: (s := status(node))["state"] == "STOPPED" and s, 60)
    assert stopped["last_checkpoint"], stopped
    at = stopped["inner_step"]
    assert at < 1500, "the run ended before the stop: make it longer"

    resumed = node.api("POST", "/api/v1/train/start", tiny_body(1500, resume=True))
    assert resumed.status == 200, resumed.body
    done = wait_state(node, "FINISHED")
    assert done["resumed_from"] == stopped["last_checkpoint"]
    # The curve continues: the resumed run's first loss is that of a trained model, not a fresh one.
    assert done["loss_first"] < first["loss_first"] - 0.5
    assert done["loss"] < first["loss_first"]
    assert done["weights_digest"] == expected_digest(body, 1, tmp_path)


def test_a_killed_train_process_resumes_its_run_from_the_checkpoint(node: Node, tmp_path: Any) -> None:
    body = tiny_body(1500, task="killed")
    assert node.api("POST", "/api/v1/train/start", body).status == 200
    wait_until(lambda: status(node)["inner_step"] >= 12, 60, message=f"no progress: {node.logs('train')}")
    pid = node.pid("train")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: node.pid("train") not in (0, pid), 30, message="supervisord did not restart train")
    done = wait_state(node, "FINISHED")
    assert done["resumed_from"] is not None and "ckpt/killed" in done["resumed_from"]
    assert done["weights_digest"] == expected_digest(body, 1, tmp_path)
