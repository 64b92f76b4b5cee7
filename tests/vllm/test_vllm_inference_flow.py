"""The Network Node's inference sequence against stock vLLM with MLNode's plugin, through the proxy."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.inference.liveness import PROGRESS_COUNTERS, RUNNING_GAUGE, parse_metrics
from services.inference.validation.network import enforced_tokens
from tests.support.node import request
from tests.support.waiting import wait_until
from tests.vllm.conftest import SERVED_NAME, Served

PROMPT = [{"role": "user", "content": "Tell me about the sea."}]
#: What the Network Node asks for: greedy-ish sampling with the logprobs a validator compares.
ASK = {"max_tokens": 12, "temperature": 0.0, "logprobs": True, "top_logprobs": 3, "seed": 7}


def _tokens(resp_body: dict[str, Any]) -> list[dict[str, Any]]:
    return list(resp_body["choices"][0]["logprobs"]["content"])


def test_health_models_and_tokenize_through_both_ports(vllm_serving: Served) -> None:
    node = vllm_serving.node
    assert node.api("GET", "/health").status == 200
    assert node.inference("GET", "/health").status == 200
    for port in (node.inference_port, node.api_port):
        models = request(port, "GET", "/v1/models").json()
        assert [m["id"] for m in models["data"]] == [SERVED_NAME]
    tok = node.inference("POST", "/tokenize", {"model": SERVED_NAME, "prompt": "the sea"},
                         headers={"content-type": "application/json"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    text = node.inference("POST", "/detokenize", {"model": SERVED_NAME, "tokens": tok["tokens"]},
                          headers={"content-type": "application/json"}).json()
    assert text["prompt"] == "the sea"


def test_a_validators_replay_reproduces_tokens_and_logprobs(vllm_serving: Served) -> None:
    first = vllm_serving.chat(PROMPT, **ASK)
    assert first.status == 200, first.body
    original = _tokens(first.json())
    assert len(original) == ASK["max_tokens"] and all(t["token"].isdigit() for t in original)
    # The validator's replay: the same request with the answer in enforced_tokens' object form.
    for port in (vllm_serving.node.inference_port, vllm_serving.node.api_port):
        replay = vllm_serving.chat(PROMPT, port=port, **ASK, enforced_tokens=enforced_tokens(original))
        assert replay.status == 200, replay.body
        text = first.json()["choices"][0]["message"]["content"]
        assert replay.json()["choices"][0]["message"]["content"] == text
        replayed = _tokens(replay.json())[: len(original)]
        assert [t["token"] for t in replayed] == [t["token"] for t in original]
        for got, want in zip(replayed, original, strict=True):
            assert got["logprob"] == pytest.approx(want["logprob"], abs=1e-4)
            assert [t["token"] for t in got["top_logprobs"]] == [t["token"] for t in want["top_logprobs"]]
            for g, w in zip(got["top_logprobs"], want["top_logprobs"], strict=True):
                assert g["logprob"] == pytest.approx(w["logprob"], abs=1e-4)


def test_enforced_output_is_exactly_the_forced_tokens_with_the_models_own_logprobs(
        vllm_serving: Served) -> None:
    """Forcing tokens the model would not pick: the output follows them, the logprobs stay the model's."""
    ids = vllm_serving.engine("POST", "/tokenize", {"model": SERVED_NAME, "prompt": "zebra quartz"},
                              headers={"content-type": "application/json"}).json()["tokens"]
    body = {"model": SERVED_NAME, "prompt": "Once", "max_tokens": 32, "temperature": 1.0, "logprobs": 5,
            "enforced_tokens": ids}
    resp = vllm_serving.node.inference("POST", "/v1/completions", body,
                                       headers={"content-type": "application/json"}, timeout=300)
    assert resp.status == 200, resp.body
    choice = resp.json()["choices"][0]
    assert choice["text"] == "zebra quartz" and choice["finish_reason"] == "stop"
    logprobs = choice["logprobs"]
    assert len(logprobs["token_logprobs"]) >= len(ids)
    for lp, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"], strict=False):
        assert lp < 0.0  # the model's probability of the forced token, never the processor's 0
        assert max(top.values()) <= 0.0 and len(top) >= 2  # tokens with equal text share a key


@pytest.mark.parametrize("bad", [{"enforced_tokens": [1, 2.5]}, {"enforced_tokens": "12"},
                                 {"enforced_str": 5}, {"enforced_tokens": [-1]}])
def test_bad_enforced_values_are_400_and_the_engine_lives_on(vllm_serving: Served,
                                                            bad: dict[str, Any]) -> None:
    resp = vllm_serving.chat(PROMPT, max_tokens=2, **bad)
    assert resp.status == 400, resp.body
    assert vllm_serving.chat(PROMPT, max_tokens=2).status == 200


def test_stream_relays_sse_chunks_that_add_up_to_the_answer(vllm_serving: Served) -> None:
    whole = vllm_serving.chat(PROMPT, **ASK).json()["choices"][0]["message"]["content"]
    resp = vllm_serving.chat(PROMPT, **ASK, stream=True)
    assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = [ln[len("data: "):] for ln in resp.body.decode().splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole and len(chunks) > 3


def test_engine_internals_answer_404_through_both_ports(vllm_serving: Served) -> None:
    rpc = {"method": "mlnode_body_info"}
    direct = vllm_serving.engine("POST", "/collective_rpc", rpc, headers={"content-type": "application/json"})
    assert direct.status == 200 and direct.json()["results"][0]["layers"] == 4  # the engine has it ...
    assert vllm_serving.engine("GET", "/server_info").status == 200
    node = vllm_serving.node
    for port in (node.inference_port, node.api_port):
        for method, path in [("POST", "/collective_rpc"), ("POST", "/sleep"), ("POST", "/wake_up"),
                             ("GET", "/is_sleeping"), ("POST", "/reset_prefix_cache"),
                             ("GET", "/server_info"),
                             ("POST", "/start_profile"), ("POST", "/v1/../collective_rpc"),
                             ("POST", "/%63ollective_rpc")]:
            resp = request(port, method, path, rpc, headers={"content-type": "application/json"})
            assert resp.status == 404, (port, path, resp.status, resp.body)  # ... the proxy never shows it


def test_engine_counters_reach_the_node_metrics(vllm_serving: Served) -> None:
    assert vllm_serving.chat(PROMPT, max_tokens=3).status == 200
    engine = parse_metrics(vllm_serving.engine("GET", "/metrics").body.decode())
    # Liveness judges progress by these; each must be a real counter of this vLLM, and moving.
    for name in (*[c for c in PROGRESS_COUNTERS if c.startswith("vllm:")], RUNNING_GAUGE):
        assert name in engine, name
    assert engine["vllm:generation_tokens_total"] > 0 and engine["vllm:request_success_total"] > 0

    def node_metrics() -> str:
        text = vllm_serving.node.api("GET", "/metrics").body.decode()
        return text if "vllm:generation_tokens_total" in text else ""

    assert "vllm:prompt_tokens_total" in wait_until(node_metrics, 60, 1.0)


def test_body_hook_computes_what_the_engine_serves(vllm_serving: Served) -> None:
    """run_body (the PoC base) on the served weights gives the engine's own next-token logprobs."""
    prompt = [10, 20, 30, 40, 50]
    served = vllm_serving.engine("POST", "/v1/completions", {
        "model": SERVED_NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "logprobs": 3,
    }, headers={"content-type": "application/json"}).json()["choices"][0]["logprobs"]["top_logprobs"][0]
    want = sorted(served.values(), reverse=True)
    for hooked in (False, True):  # fused residual path, and the unfused one a layer hook takes
        rpc = {"method": "mlnode_body_logprobs", "kwargs": {"token_ids": prompt, "top": 3, "hooked": hooked}}
        resp = vllm_serving.engine("POST", "/collective_rpc", rpc,
                                   headers={"content-type": "application/json"})
        assert resp.status == 200, resp.body
        [result] = resp.json()["results"]
        got = [lp for _tok, lp in result["top"]]
        assert got == pytest.approx(want, abs=1e-4)
