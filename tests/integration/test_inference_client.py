"""The Network Node's inference calls, replayed against the real node with the real CPU engine."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.inference.validation.compare import answer_content, compare, numeric_tokens
from services.inference.validation.network import executor_request, validator_request
from tests.support import infval
from tests.support.node import MLNODE, REPO, Node
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MODEL = "Qwen/Qwen2.5-7B-Instruct"
UP = {"model": MODEL, "dtype": "float16", "additional_args": []}
JSON = {"content-type": "application/json"}


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
    # JSON, no Content-Type header; answered within the request's 60 s deadline.
    resp = node.api("POST", "/api/v1/inference/up", UP, timeout=60)
    assert (resp.status, resp.json()) == (200, {"status": "OK"}), node.logs("inference")
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

    # An inference as the network runs it: the executor's rewritten request, then a validator's replay.
    executed = executor_request(chat({"temperature": 0.9, "top_p": 0.9, "max_tokens": 12}))
    mine = answer_content(node.inference("POST", "/v1/chat/completions", executed).json())
    assert len(mine) == 12 and numeric_tokens(mine)
    replay = validator_request(executed, mine)
    theirs = node.inference("POST", "/v1/chat/completions", replay, headers=JSON).json()
    assert compare(mine, theirs["choices"][0]["logprobs"]["content"]).similarity == 1.0

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


def _serve_golden(node: Node, *args: str) -> None:
    body = {"model": str(infval.MODEL_DIR), "dtype": "float32",
            "additional_args": ["--served-model-name", infval.SERVED_NAME, *args]}
    resp = node.api("POST", "/api/v1/inference/up", body, timeout=180)
    assert resp.status == 200, resp.body


def test_golden_validation_through_the_node(node: Node) -> None:
    """The validator's requests of the golden cases, through the proxy to the CPU engine (spec §5)."""
    _serve_golden(node)
    for c in infval.cases():
        resp = node.inference("POST", "/v1/chat/completions", infval.validation_body(c), headers=JSON)
        assert resp.status == 200, resp.body
        infval.check_against_reference(c, resp.json()["choices"][0]["logprobs"]["content"])
        stream = node.inference("POST", "/v1/chat/completions", infval.validation_body(c, stream=True),
                                headers=JSON)
        chunks = [json.loads(e) for e in sse_events(stream.body)[:-1]]
        infval.check_against_reference(c, answer_content(chunks))
    bad = node.inference("POST", "/v1/chat/completions", {**infval.validation_body(infval.cases()[0]),
                                                          "enforced_tokens": [7, 99999]})
    assert bad.status == 400 and bad.json()["error"]["param"] == "enforced_tokens[1]"


def test_the_operator_tool_checks_a_node(node: Node) -> None:
    _serve_golden(node)
    base = f"http://127.0.0.1:{node.inference_port}"
    args = ["validate", "--executor", base, "--model", infval.SERVED_NAME, "--max-tokens", "24"]
    proc = subprocess.run([*MLNODE, *args, "--temperature", "0.8", "--top-k", "7", "--seed", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "similarity 1.000000  PASS" in proc.stdout and "executor answered 24 tokens" in proc.stdout
    gone = subprocess.run([*MLNODE, "validate", "--executor", "http://127.0.0.1:1", "--model", "m"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert gone.returncode == 2 and "127.0.0.1:1" in gone.stderr


def test_the_default_logprobs_mode_follows_the_engines_flag(node: Node) -> None:
    """``--logprobs-mode`` in ``additional_args`` sets what a request naming no mode gets (vLLM's meaning)."""
    masked = {"model": infval.SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
              "temperature": 1.0, "top_k": 2, "logprobs": True, "top_logprobs": 5}

    def floors() -> int:
        content = answer_content(node.inference("POST", "/v1/chat/completions", masked).json())
        return sum(t["logprob"] == -9999.0 for e in content for t in e["top_logprobs"])

    _serve_golden(node, "--logprobs-mode", "raw_logprobs")
    assert floors() == 0
    _serve_golden(node)
    assert floors() > 0
