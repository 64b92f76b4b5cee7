"""PoC callback URLs cannot point the node at itself, at loopback, or at link-local (cloud metadata)
addresses: the route answers 400 and nothing starts. The node runs with the settings it ships with.

That a name re-resolving to a refused address at send time reaches nothing (DNS rebinding) is shown in
``tests/unit/pow/test_pow_callback_policy.py`` with a stand-in resolver (this machine's DNS cannot be
made to lie); that allowed receivers get every batch is shown by the whole integration suite.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.node import Node
from tests.support.pow import init_dict
from tests.support.receiver import Receiver

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def urls(node: Node, receiver: Receiver) -> list[tuple[str, str]]:
    engine = node.inference_port + 1
    return [
        (f"http://127.0.0.1:{receiver.port}/v1/poc-batches", "loopback"),  # a receiver that exists
        (f"http://localhost:{receiver.port}/v1/poc-batches", "loopback"),
        (f"http://[::1]:{receiver.port}/v1/poc-batches", "loopback"),
        (f"http://2130706433:{receiver.port}/v1/poc-batches", "loopback"),  # 127.0.0.1 as one number
        (f"http://127.0.0.1:{engine}/sleep?level=1&x=", "own ports"),  # the engine's dev routes
        (f"http://localhost:{node.api_port}/api/v1", "own ports"),
        (f"http://127.0.0.1:{node.inference_port}/v1", "own ports"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[fe80::1]:9100/x", "link-local"),
        (f"http://0.0.0.0:{receiver.port}/x", "unspecified"),
        ("http://224.0.0.1:9100/x", "unicast"),
        ("gopher://10.0.0.5/x", "http(s) URL"),
    ]


def test_v1_rounds_refuse_callbacks_to_the_node_itself(stopped: Node, receiver: Receiver) -> None:
    for url, why in urls(stopped, receiver):
        for path in ("/api/v1/pow/init/generate", "/api/v1/pow/init"):
            resp = stopped.api("POST", path, init_dict(url))
            assert resp.status == 400, (url, resp.body)
            assert why in resp.json()["detail"], (url, resp.json())
    assert stopped.api("GET", "/api/v1/state").json()["state"] == "STOPPED"
    assert stopped.api("GET", "/api/v1/pow/status").json()["status"] == "NOT_LOADED"
    assert receiver.bodies == {}


def test_v2_rounds_refuse_them_too(stopped: Node, receiver: Receiver) -> None:
    params = {"model": "m", "seq_len": 16}
    base = {"block_hash": "9F3C", "block_height": 7, "public_key": "02ab", "node_id": 0, "node_count": 1,
            "params": params}
    for url, why in urls(stopped, receiver)[:-1]:
        resp = stopped.api("POST", "/api/v1/inference/pow/init/generate", {**base, "url": url})
        assert resp.status == 400 and why in resp.json()["detail"], (url, resp.body)
        resp = stopped.api("POST", "/api/v1/inference/pow/generate", {**base, "url": url, "nonces": [1]})
        assert resp.status == 400 and why in resp.json()["detail"], (url, resp.body)
    assert receiver.bodies == {}
