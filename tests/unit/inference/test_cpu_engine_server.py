"""The CPU engine as a real subprocess on a free port, exercised over HTTP like the launcher and proxy do."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.inference.cpu_engine.checkpoint import create_tiny
from services.inference.validation.compare import compare
from services.inference.validation.network import enforced_tokens
from tests.support.cpu_engine import Engine
from tests.support.waiting import wait_until

MAX_LEN = 2048


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    create_tiny(path, seed=0)
    return path


@pytest.fixture(scope="module")
def engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    log = tmp_path_factory.mktemp("logs") / "engine.log"
    eng = Engine(
        model_dir, log, "--max-num-seqs", "16", "--quantization", "fp8", "-tp", "4", "--enforce-eager"
    )
    eng.wait_healthy()
    yield eng
    eng.stop()


@pytest.fixture
def client(engine: Engine) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=engine.url, timeout=30.0) as c:
        yield c


def _metrics(client: httpx.Client) -> dict[str, float]:
    """Metric name -> value, summed over label sets."""
    out: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        m = re.match(r"^([a-zA-Z_:]+)\{[^}]*\} (\S+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def _sse(lines: Iterator[str]) -> list[Any]:
    events: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi 👋"}]


@pytest.mark.timeout(60)
def test_health_models_and_ignored_flags(engine: Engine, client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "tiny"
    assert models["data"][0]["owned_by"] == "mlnode"
    assert models["data"][0]["max_model_len"] == MAX_LEN
    assert "ignored_engine_args" in engine.log.read_text()
    assert client.get("/nope").status_code == 404
    assert client.get("/v1/completions").status_code == 405


@pytest.mark.timeout(60)
def test_completion_greedy_is_repeatable(client: httpx.Client) -> None:
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "foo": [1],
            "return_token_ids": True}
    first = client.post("/v1/completions", json=body).json()
    second = client.post("/v1/completions", json=body).json()
    assert first["object"] == "text_completion" and first["id"].startswith("cmpl-")
    assert isinstance(first["created"], int) and first["model"] == "tiny"
    choice = first["choices"][0]
    assert choice["text"] == second["choices"][0]["text"]
    assert choice["finish_reason"] in {"stop", "length"}
    usage = first["usage"]
    assert usage["prompt_tokens"] == 1 + len(b"Once upon a time")
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] == len(choice["token_ids"])
    tokenized = client.post("/tokenize", json={"prompt": body["prompt"]}).json()
    assert choice["prompt_token_ids"] == tokenized["tokens"]


@pytest.mark.timeout(60)
def test_streaming_chat_matches_the_whole_response(client: httpx.Client) -> None:
    body = {"messages": CHAT, "max_tokens": 20, "seed": 42, "temperature": 0.8}
    whole = client.post("/v1/chat/completions", json=body).json()
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=stream_body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content) >= 3
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [f["choices"][0]["finish_reason"] for f in finals] == [whole["choices"][0]["finish_reason"]]
    assert chunks[-1]["usage"] == whole["usage"]


def _numeric(entry: dict[str, Any]) -> bool:
    return entry["token"].isdigit() and bytes(entry["bytes"]) == entry["token"].encode()


@pytest.mark.timeout(60)
def test_chat_logprobs_are_token_ids_and_a_validators_replay_reproduces_them(client: httpx.Client) -> None:
    body = {"messages": CHAT, "max_tokens": 32, "seed": 7, "temperature": 0.9, "top_p": 0.8, "top_k": 3,
            "logprobs": True, "top_logprobs": 5, "return_token_ids": True,
            "logprobs_mode": "processed_logprobs"}
    original = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    content = original["logprobs"]["content"]
    assert [int(e["token"]) for e in content] == original["token_ids"]
    assert all(_numeric(e) and all(_numeric(t) for t in e["top_logprobs"]) for e in content)
    assert all(len(e["top_logprobs"]) == 5 and e["top_logprobs"][0]["token"] == e["token"] for e in content)
    assert any(t["logprob"] == -9999.0 for e in content for t in e["top_logprobs"])  # top-k masked slots
    replay_body = {**body, "seed": 999, "enforced_tokens": enforced_tokens(content)}
    replay = client.post("/v1/chat/completions", json=replay_body).json()["choices"][0]
    assert replay["message"]["content"] == original["message"]["content"]
    assert replay["logprobs"]["content"][: len(content)] == content  # the same engine: bit for bit
    assert compare(content, replay["logprobs"]["content"]).similarity == 1.0


@pytest.mark.timeout(60)
def test_enforced_str_forces_the_texts_tokens(client: httpx.Client) -> None:
    body = {"messages": CHAT, "max_tokens": 32, "logprobs": True, "enforced_str": "Hi there!"}
    answer = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert answer["message"]["content"] == "Hi there!" and answer["finish_reason"] == "stop"
    ids = [int(e["token"]) for e in answer["logprobs"]["content"]]
    assert ids[:-1] == list(b"Hi there!") and ids[-1] == 258  # then the end-of-sequence token


@pytest.mark.timeout(60)
def test_completion_logprobs_and_enforced_tokens(client: httpx.Client) -> None:
    body = {"prompt": "abc", "max_tokens": 10, "seed": 3, "logprobs": 2, "return_token_ids": True}
    original = client.post("/v1/completions", json=body).json()["choices"][0]
    lp = original["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert [int(t) for t in lp["tokens"]] == original["token_ids"]
    assert all(x <= 0 for x in lp["token_logprobs"])
    assert all(t in top and len(top) <= 3 for t, top in zip(lp["tokens"], lp["top_logprobs"], strict=True))
    ids = client.post("/tokenize", json={"prompt": "abc"}).json()["tokens"]
    replay = client.post("/v1/completions", json={**body, "enforced_tokens": original["token_ids"]}).json()
    assert replay["choices"][0]["text"] == original["text"]
    assert replay["choices"][0]["logprobs"]["token_logprobs"][:10] == lp["token_logprobs"]
    by_ids = client.post("/v1/completions", json={**body, "prompt": ids}).json()
    assert by_ids["choices"][0]["text"] == original["text"]


@pytest.mark.timeout(60)
def test_tokenize_counts(client: httpx.Client) -> None:
    plain = client.post("/tokenize", json={"model": "tiny", "prompt": "héllo"}).json()
    assert plain["count"] == 1 + len("héllo".encode()) and plain["max_model_len"] == MAX_LEN
    chat = client.post("/tokenize", json={"model": "tiny", "messages": CHAT}).json()
    usage = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1}).json()["usage"]
    assert chat["count"] == usage["prompt_tokens"]


@pytest.mark.timeout(60)
def test_metrics_counters_move(client: httpx.Client) -> None:
    before = _metrics(client)
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:generation_tokens_total",
        "vllm:prompt_tokens_total",
        "vllm:request_success_total",
        "mlnode_engine_iterations_total",
    ):
        assert name in before
    client.post("/v1/completions", json={"prompt": "count me", "max_tokens": 5, "enforced_str": "12345"})
    after = _metrics(client)
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 5
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == 1 + len("count me")
    assert after["vllm:request_success_total"] - before["vllm:request_success_total"] == 1
    assert after["mlnode_engine_iterations_total"] - before["mlnode_engine_iterations_total"] >= 5


BAD_BODIES: list[tuple[str, Any]] = [
    ("/v1/completions", b"{not json"),
    ("/v1/completions", b"[1, 2]"),
    ("/v1/completions", {"prompt": 5}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}),
    ("/v1/completions", {"prompt": "x" * MAX_LEN}),
    ("/v1/completions", {"prompt": "x", "n": 2}),
    ("/v1/completions", {"prompt": "x", "temperature": -1}),
    ("/v1/completions", {"prompt": "x", "top_p": 0}),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}),
    ("/v1/completions", {"prompt": "x", "stop": [1]}),
    ("/v1/completions", {"prompt": "x", "seed": "x"}),
    ("/v1/completions", {"prompt": "x", "enforced_tokens": [100000]}),
    ("/v1/completions", {"prompt": "x", "enforced_tokens": [-1]}),
    ("/v1/completions", {"prompt": "x", "enforced_tokens": {"tokens": [{"token": "-3"}]}}),
    ("/v1/completions", {"prompt": "x", "enforced_tokens": {"tokens": [{"token": 1.5}]}}),
    ("/v1/completions", {"prompt": "x", "enforced_tokens": {"tokens": "1 2"}}),
    ("/v1/completions", {"prompt": "x", "enforced_tokens": {"tokens": [{"token": "1", "top_tokens": [{}]}]}}),
    ("/v1/completions", {"prompt": "x", "enforced_str": 5}),
    ("/v1/completions", {"prompt": "x", "logprobs_mode": "raw_logits"}),
    ("/v1/completions", {"prompt": "x", "min_tokens": 20, "max_tokens": 5}),
    ("/v1/completions", {"prompt": "x", "top_k": -2}),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [100000]}),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"x": 1}}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}),
    ("/v1/chat/completions", {"messages": CHAT, "stream": "maybe"}),
    ("/tokenize", {"prompt": []}),
    ("/tokenize", "just a string"),
]


@pytest.mark.timeout(60)
def test_bad_bodies_are_400_never_500(client: httpx.Client) -> None:
    for path, body in BAD_BODIES:
        if isinstance(body, bytes):
            r = client.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = client.post(path, json=body)
        assert r.status_code == 400, (path, body, r.text)
        error = r.json()["error"]
        assert error["type"] in ("BadRequestError", "Bad Request") and error["message"], (path, body)
        assert error["code"] == 400
    assert client.get("/health").status_code == 200


async def _raw_request(port: int, method: str, path: str, body: Any = None) -> bytes:
    """One HTTP/1.1 exchange on its own connection (a lean client, so 500 of them stay cheap)."""
    payload = json.dumps(body).encode() if body is not None else b""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(payload)}\r\n"
    writer.write(f"{head}Content-Type: application/json\r\n\r\n".encode() + payload)
    data = await reader.read()
    writer.close()
    return data


@pytest.mark.timeout(60)
def test_500_concurrent_streams(engine: Engine, client: httpx.Client) -> None:
    """More streams than batch slots (16): the rest queue, and every stream still completes."""
    n = 500
    waiting_seen: list[float] = []

    async def one(i: int) -> bytes:
        body = {"messages": [{"role": "user", "content": f"n{i}"}], "max_tokens": 8, "stream": True}
        return await _raw_request(engine.port, "POST", "/v1/chat/completions", body)

    async def watch(stop: asyncio.Event) -> None:
        while not stop.is_set():
            text = (await _raw_request(engine.port, "GET", "/metrics")).decode()
            found = re.findall(r"^vllm:num_requests_waiting\{.*\} (\S+)$", text, re.M)
            waiting_seen.extend(float(v) for v in found)
            await asyncio.sleep(0.01)  # the sampling cadence of the watcher, not a wait for an outcome

    async def main() -> list[bytes]:
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        results = await asyncio.gather(*(one(i) for i in range(n)))
        stop.set()
        await watcher
        return results

    before = _metrics(client)["vllm:request_success_total"]
    results = asyncio.run(main())
    assert len(results) == n
    for raw in results:
        assert raw.startswith(b"HTTP/1.1 200"), raw[:100]
        assert raw.count(b"data: ") >= 3 and b"data: [DONE]\n\n" in raw
    assert _metrics(client)["vllm:request_success_total"] - before == n
    assert max(waiting_seen) > 0


def _open_stream(port: int, body: dict[str, Any]) -> socket.socket:
    """A raw streaming request, read until its first SSE event arrives."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    seen = b""
    while b"data: " not in seen:
        chunk = sock.recv(4096)
        assert chunk, "connection closed before the first event"
        seen += chunk
    return sock


@pytest.mark.timeout(60)
def test_disconnecting_client_frees_its_slot(engine: Engine, client: httpx.Client) -> None:
    forced = [ord("z")] * (MAX_LEN - 100)
    before = _metrics(client)["vllm:generation_tokens_total"]
    socks = [
        _open_stream(engine.port, {"prompt": "x", "stream": True, "enforced_tokens": forced}) for _ in "ab"
    ]
    for sock in socks:
        sock.close()
    wait_until(lambda: _metrics(client)["vllm:num_requests_running"] == 0, 20, 0.02,
               message="cancelled streams still running")
    generated = _metrics(client)["vllm:generation_tokens_total"] - before
    assert generated < len(forced)  # both would have produced 2 * len(forced) had they run to the end
    ok = client.post("/v1/completions", json={"prompt": "after", "max_tokens": 3})
    assert ok.status_code == 200


@pytest.mark.timeout(60)
def test_a_stopped_engine_is_a_hung_one(model_dir: Path, tmp_path: Path) -> None:
    """The seam the hang tests use: SIGSTOP leaves the process alive and answering nothing."""
    eng = Engine(model_dir, tmp_path / "hang.log")
    try:
        eng.wait_healthy()
        with httpx.Client(base_url=eng.url, timeout=2.0) as c:
            assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
            os.kill(eng.proc.pid, signal.SIGSTOP)
            for path in ("/health", "/metrics"):
                with pytest.raises(httpx.ReadTimeout):
                    c.get(path, timeout=1.0)
            assert eng.proc.poll() is None
            os.kill(eng.proc.pid, signal.SIGCONT)
            assert c.get("/health", timeout=10.0).status_code == 200
    finally:
        eng.stop(kill=True)


@pytest.mark.timeout(60)
def test_load_failure_exits_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    eng = Engine(tmp_path, tmp_path / "fail.log")
    try:
        assert eng.proc.wait(30) == 1
    finally:
        eng.stop(kill=True)
    log = eng.log.read_text()
    assert "model_load_failed" in log and "model_type must be one of llama, qwen3" in log
