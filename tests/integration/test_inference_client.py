"""The Network Node's inference calls, replayed against the real node with the real CPU engine."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.node import Node
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MODEL = "Qwen/Qwen2.5-7B-Instruct"
UP = {"model": MODEL, "dtype": "float16", "additional_args": []}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("inference")).start()
    yield n
    n.stop()


def sse_events(body: bytes) -> list[str]:
    return [line[len("data: "):] for line in body.decode().split("\n\n") if line.startswith("data: ")]


def chat(extra: dict[str, Any]) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Say something"}], "max_tokens": 6,
            **extra}


def test_the_clients_inference_round(node: Node) -> None:
    assert node.api("POST", "/api/v1/stop").json() == {"status": "OK"}
    began = time.monotonic()
    resp = node.api("POST", "/api/v1/inference/up", UP, timeout=180)  # JSON, no Content-Type header
    assert (resp.status, resp.json()) == (200, {"status": "OK"}), node.logs("inference")
    assert time.monotonic() - began < 60
    assert node.inference("GET", "/health").status == 200
    models = node.inference("GET", "/v1/models").json()
    assert models["data"][0]["id"] == MODEL  # what the client asked for, though it is a stand-in

    resp = node.inference("POST", "/v1/chat/completions", chat({"stream": True}))
    assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.body)
    assert events[-1] == "[DONE]" and len(events) >= 3
    assert all(json.loads(e)["model"] == MODEL for e in events[:-1])

    count = node.inference("POST", "/tokenize", {"model": MODEL, "prompt": "hello world"}).json()["count"]
    assert isinstance(count, int) and count > 0

    sampling = {"logprobs": True, "top_logprobs": 3, "seed": 11, "temperature": 0.9}
    original = node.inference("POST", "/v1/chat/completions", chat(sampling)).json()
    text = original["choices"][0]["message"]["content"]
    enforced = chat({**sampling, "enforced_str": text})
    validation = node.inference("POST", "/v1/chat/completions", enforced).json()
    mine = original["choices"][0]["logprobs"]["content"]
    theirs = validation["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in theirs] == [t["token"] for t in mine]
    assert [t["logprob"] for t in theirs] == pytest.approx([t["logprob"] for t in mine], abs=1e-5)

    # The management port proxies the OpenAI routes too.
    assert node.api("GET", "/v1/models").json()["data"][0]["id"] == MODEL

    state = node.api("GET", "/api/v1/state").json()
    assert state["state"] == "INFERENCE" and state["loaded_model"] == MODEL and state["inference_healthy"]
    assert node.api("GET", "/readyz").json() == {"ready": True, "service_state": "INFERENCE"}

    resp = node.api("GET", "/api/v1/pow/status")
    assert resp.status == 409
    assert resp.json() == {"detail": "Cannot run POW because MLNode is currently in INFERENCE mode. "
                                     "Please stop INFERENCE first."}
    # A second start while serving is refused.
    assert node.api("POST", "/api/v1/inference/up/async", UP).status == 409

    assert node.api("POST", "/api/v1/inference/down").json() == {"status": "OK"}
    assert node.api("POST", "/api/v1/inference/down").json() == {"status": "OK"}
    state = node.api("GET", "/api/v1/state").json()
    assert state["state"] == "STOPPED" and state["loaded_model"] is None and not state["inference_healthy"]
    wait_until(lambda: node.inference("GET", "/health").status == 503, 10)
    wait_until(lambda: not node.engine_pids(), 30, message="an engine outlived the down")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"", "model"),
        (b"[1]", "JSON object"),
        (b'{"model": ""}', "model"),
        (b'{"model": 3, "dtype": "auto"}', "model"),
        (b'{"model": "m", "dtype": 16}', "dtype"),
        (b'{"model": "m", "additional_args": "--x 1"}', "additional_args"),
        (b'{"model": "m", "additional_args": [1]}', "additional_args"),
        (b"{nope", "JSON"),
    ],
)
def test_bad_up_bodies_are_400_naming_the_field(node: Node, body: bytes, field: str) -> None:
    for path in ("/api/v1/inference/up", "/api/v1/inference/up/async"):
        resp = node.api("POST", path, body)
        assert resp.status == 400, (path, resp.body)
        assert field in resp.json()["detail"]
    assert node.api("GET", "/api/v1/state").json()["state"] == "STOPPED"


def test_async_start_and_status(node: Node) -> None:
    assert node.api("GET", "/api/v1/inference/up/status").json()["status"] in ("not_started", "cancelled")
    resp = node.api("POST", "/api/v1/inference/up/async", {**UP, "model": "org/other-model"})
    assert resp.status == 200 and resp.json()["status"] == "starting"
    status = node.api("GET", "/api/v1/inference/up/status").json()
    assert status["status"] == "in_progress" and status["is_starting"] and not status["is_running"]
    assert node.api("POST", "/api/v1/inference/up/async", UP).status == 409
    assert node.api("GET", "/api/v1/state").json()["state"] == "INFERENCE"
    assert node.api("GET", "/readyz").status == 503  # loading: not ready yet
    done = wait_until(lambda: (s := node.api("GET", "/api/v1/inference/up/status").json())["status"]
                      == "completed" and s, 60)
    assert done["is_running"] and not done["is_starting"] and done["error"] is None
    assert done["elapsed_seconds"] > 0
    assert node.inference("GET", "/v1/models").json()["data"][0]["id"] == "org/other-model"
    instances = node.api("GET", "/health").json()["managers"]["inference"]
    assert instances["healthy"] is True and instances["state"] == "RUNNING"
    assert node.api("POST", "/api/v1/stop").json() == {"status": "OK"}
    assert node.api("GET", "/api/v1/inference/up/status").json()["status"] == "not_started"
    wait_until(lambda: not node.engine_pids(), 30, message="an engine outlived the stop")


def test_a_failed_start_answers_with_the_engines_own_words(node: Node, tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    resp = node.api("POST", "/api/v1/inference/up", {"model": str(broken), "dtype": "auto",
                                                      "additional_args": []}, timeout=120)
    assert resp.status == 503
    detail = resp.json()["detail"]
    assert "before serving; last log lines:" in detail and "model_load_failed" in detail
    status = node.api("GET", "/api/v1/inference/up/status").json()
    assert status["status"] == "failed" and "model_load_failed" in status["error"]
    assert node.api("GET", "/api/v1/state").json()["state"] == "STOPPED"
    log = (node.state_dir / "inference" / "engine-0.log").read_text()
    assert "model_load_failed" in log
    assert node.engine_pids() == []
