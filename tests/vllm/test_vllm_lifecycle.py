"""The engine's life under the node: down and a failed start leave nothing behind (by pid), a failed
start answers 503 with the engine's own words, a crash is answered by a restart, an up while serving
replaces the engine (with a tiny Llama). Runs last in the tier
(it stops the engine); the session fixture's teardown then checks that stopping the node (``make stop``)
with a serving engine leaves no engine process."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from services.inference.cpu_engine.checkpoint import create_tiny
from tests.support.node import request
from tests.support.waiting import wait_until
from tests.vllm.conftest import ENGINE_ARGS, PROMPT_FOR_PROBE, START_TIMEOUT_S, UP_BODY, Served


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2 :].split()[0] == b"Z"


def test_down_leaves_no_engine_process_and_a_failed_start_answers_503_with_the_engines_words(
        vllm_serving: Served) -> None:
    node = vllm_serving.node
    pids = node.engine_pids()
    assert len(pids) >= 2  # vLLM's API server and its engine core at least
    assert node.api("POST", "/api/v1/inference/down", timeout=120).status == 200
    # A stop answers at once and tears the engine down behind it: wait for the outcome.
    wait_until(lambda: node.engine_pids() == [] and all(_gone(pid) for pid in pids), 60, 0.5,
               f"engine processes outlived the down: {node.engine_pids()}")
    assert node.inference("GET", "/v1/models").status == 503

    # A flag vLLM does not have never reaches it: the engine-argument policy answers 400 at once.
    unknown = {**UP_BODY, "additional_args": [*UP_BODY["additional_args"], "--no-such-vllm-flag"]}
    resp = node.api("POST", "/api/v1/inference/up", unknown, timeout=600)
    assert resp.status == 400 and "--no-such-vllm-flag" in resp.json()["detail"]
    # A value the policy takes (a quantization method by name) that vLLM refuses: the engine's words.
    bad = {**UP_BODY,
           "additional_args": [*UP_BODY["additional_args"], "--quantization", "mlnode_no_such_quant"]}
    resp = node.api("POST", "/api/v1/inference/up", bad, timeout=600)
    assert resp.status == 503
    detail = resp.json()["detail"]
    assert "before serving; last log lines:" in detail and "mlnode_no_such_quant" in detail
    wait_until(lambda: node.engine_pids() == [], 60, 0.5, "a failed start left engine processes")


def test_a_crashed_engine_is_restarted_and_serves_again(vllm_serving: Served) -> None:
    node = vllm_serving.node
    before = vllm_serving.instance()
    os.killpg(before["pid"], signal.SIGKILL)  # the whole engine: API server and its workers
    wait_until(lambda: vllm_serving.instance()["restarts"] >= 1, 120, 0.5, "no restart was recorded")
    wait_until(lambda: vllm_serving.instance()["healthy"], 900, 1.0, "the restarted engine never served")
    after = vllm_serving.instance()
    assert after["pid"] != before["pid"] and after["last_exit"]["reason"] == "crashed"
    assert vllm_serving.chat(PROMPT_FOR_PROBE, max_tokens=2).status == 200
    assert node.api("GET", "/api/v1/inference/up/status").json()["status"] == "completed"


def test_up_while_serving_replaces_the_engine_with_a_tiny_llama(vllm_serving: Served, tmp_path: Path) -> None:
    """``inference/up`` while vLLM serves the golden Qwen3 stops it and serves the requested model, here a
    ``mlnode model create-tiny --arch llama`` directory (head_dim 32, which vLLM's CPU attention takes):
    OK only once the new engine answers, the old engine's processes gone, a real generation from the new
    one. Last in the tier: the session teardown then stops the node with this engine serving."""
    node = vllm_serving.node
    old = node.engine_pids()
    llama = tmp_path / "tiny-llama"
    create_tiny(llama, seed=3, arch="llama")
    body = {"model": str(llama), "dtype": "float32",
            "additional_args": ["--served-model-name", "tiny-llama", *ENGINE_ARGS[2:]]}
    resp = node.api("POST", "/api/v1/inference/up", body, timeout=START_TIMEOUT_S)
    assert resp.status == 200 and resp.json() == {"status": "OK"}, resp.body[-2000:]
    assert all(_gone(pid) for pid in old), f"the replaced engine outlived the up: {old}"
    models = node.inference("GET", "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-llama"]
    chat = request(node.inference_port, "POST", "/v1/chat/completions",
                   {"model": "tiny-llama", "messages": PROMPT_FOR_PROBE, "max_tokens": 4, "logprobs": True},
                   timeout=300)
    assert chat.status == 200, chat.body[:500]
    choice = chat.json()["choices"][0]
    assert choice["logprobs"]["content"], choice
    assert node.api("GET", "/api/v1/inference/up/status").json()["model"] == str(llama)
