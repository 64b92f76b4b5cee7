"""PoC v2 through a real CPU engine process serving the golden tiny Qwen3 (``POST /collective_rpc``)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.support.cpu_engine import Engine
from tests.support.pocv2 import SERVED_NAME, TINY_QWEN3, case, check_artifacts, golden, rpc_kwargs
from tests.support.waiting import wait_until

METHOD = "mlnode_poc_artifacts"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = Engine(TINY_QWEN3, tmp_path_factory.mktemp("logs") / "engine.log", served_name=SERVED_NAME)
    try:
        server.wait_healthy()
        yield server.url
    finally:
        server.stop()


def _rpc(url: str, kwargs: Any, method: str = METHOD) -> httpx.Response:
    return httpx.post(url + "/collective_rpc", json={"method": method, "kwargs": kwargs}, timeout=600.0)


def test_served_under_the_requested_name_and_chats(engine: str) -> None:
    models = httpx.get(engine + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [SERVED_NAME]
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "temperature": 0, "logprobs": True}
    answer = httpx.post(engine + "/v1/chat/completions", json=body, timeout=60.0)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["choices"][0]["logprobs"]["content"]) >= 1


@pytest.mark.parametrize("name", [c["name"] for c in golden()["cases"]])
def test_golden_case_through_the_engine(engine: str, name: str) -> None:
    c = case(name)
    answer = _rpc(engine, rpc_kwargs(c))
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert len(results) == 1 and results[0]["dropped"] == []
    worst = check_artifacts(c, results[0]["artifacts"])
    print(f"cpu engine {name}: worst L2 to vector_f16 {worst:.3g}")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seq_len": 0}, "seq_len"),
        ({"seq_len": 4096}, "seq_len"),
        ({"k_dim": 65}, "k_dim"),
        ({"nonces": [1, -2]}, "nonces"),
        ({"nonces": "1"}, "nonces"),
        ({"stronger_rng": "yes"}, "stronger_rng"),
        ({"block_hash": 7}, "block_hash"),
        ({"surprise": 1}, "unknown kwargs"),
    ],
)
def test_bad_kwargs_are_a_400(engine: str, change: dict[str, Any], message: str) -> None:
    kwargs = {**rpc_kwargs(case("legacy_rng_seq16")), **change}
    answer = _rpc(engine, kwargs)
    assert answer.status_code == 400 and message in answer.json()["error"]["message"]


def test_unknown_method_is_a_400(engine: str) -> None:
    answer = _rpc(engine, {}, method="sleep")
    assert answer.status_code == 400 and METHOD in answer.json()["error"]["message"]


def _poc_nonces(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("mlnode_engine_poc_nonces_total{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no mlnode_engine_poc_nonces_total in /metrics")


def test_chat_and_health_answer_while_a_poc_batch_runs(engine: str) -> None:
    """PoC is scheduled alongside chat: mid-PoC, chat and /health complete before the PoC call does."""
    kwargs = {**rpc_kwargs(case("legacy_rng_seq1024")), "nonces": list(range(100, 148))}
    before = _poc_nonces(engine)
    with ThreadPoolExecutor(1) as pool:
        poc = pool.submit(_rpc, engine, kwargs)

        def mid_run() -> bool:  # the first batch is done: PoC is mid-run
            assert not poc.done(), poc.result().text
            return _poc_nonces(engine) >= before + 8

        wait_until(mid_run, 300, message="the PoC call's first batch never finished")
        assert httpx.get(engine + "/health", timeout=60.0).status_code == 200
        body = {"model": SERVED_NAME, "prompt": "hello", "max_tokens": 3, "temperature": 0}
        chat = httpx.post(engine + "/v1/completions", json=body, timeout=120.0)
        assert chat.status_code == 200, chat.text
        assert not poc.done(), "the PoC call finished before chat was served"
        answer = poc.result()
    assert answer.status_code == 200
    assert len(answer.json()["results"][0]["artifacts"]) == 48
