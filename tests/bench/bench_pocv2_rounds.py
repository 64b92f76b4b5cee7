"""PoC v2 node overhead: nonces/s of one engine called directly vs driven by pow's generation loop.

One real CPU engine process serves the golden tiny Qwen3; the same batches (32 nonces) are computed
back to back, first by calling its ``/collective_rpc`` in a plain loop, then by pow's
:class:`~services.pow.v2.rounds.PocRounds` (engine call, durable outbox put, journal write per batch).
The ratio is what the node's bookkeeping costs (goal: close to 1). Also timed: a 200-nonce verdict
(§6) and the binomial tail for a large sample.

Run: ``python -m tests.bench.bench_pocv2_rounds`` (or ``make bench`` for every section).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from contracts.checked import convert
from contracts.pow_v2 import InitGenerate
from services.pow.outbox import Outbox
from services.pow.v2.engine import EngineClient, Seed
from services.pow.v2.rounds import PocRounds
from services.pow.v2.stats import binom_upper_tail
from services.pow.v2.verdict import StatParams, judge
from tests.bench.report import print_table
from tests.support.pocv2 import SERVED_NAME, TINY_QWEN3, golden
from tests.support.ports import free_port

BATCH = 32
BATCHES = 6
SEQ_LENS = (128, 512)


class _Inference:
    def __init__(self, port: int) -> None:
        self.port = port

    async def request(self, kind: str, payload: Any = None, *, timeout: float = 10.0) -> Any:
        return {"backends": [f"http://127.0.0.1:{self.port}"], "instances": [{"port": self.port}],
                "served_models": [SERVED_NAME]}


def _start_engine(port: int, log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "services.inference.cpu_engine", "--model", str(TINY_QWEN3), "--host",
            "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"CPU engine did not serve: {log.read_text()[-2000:]}")


async def _direct(port: int, seq_len: int) -> float:
    client = EngineClient(timeout_s=600)
    seed = Seed("AB" * 32, "02" + "cd" * 32, seq_len, 12, True)
    try:
        await client.artifacts(port, seed, list(range(BATCH)))  # warm-up
        began = time.perf_counter()
        for b in range(BATCHES):
            await client.artifacts(port, seed, list(range(b * BATCH, (b + 1) * BATCH)))
        return BATCHES * BATCH / (time.perf_counter() - began)
    finally:
        await client.close()


async def _through_pow(port: int, seq_len: int, workdir: Path) -> float:
    outbox = Outbox(workdir / f"outbox-{seq_len}.db")
    rounds = PocRounds(outbox, workdir / f"v2-{seq_len}", _Inference(port), EngineClient(timeout_s=600))
    init = convert({"block_hash": "AB" * 32, "block_height": 1, "public_key": "02" + "cd" * 32, "node_id": 0,
                    "node_count": 1, "params": {"model": SERVED_NAME, "seq_len": seq_len},
                    "url": "http://127.0.0.1:9/v2/poc-batches/x", "poc_stronger_rng": True}, InitGenerate)
    try:
        await rounds.init_generate(init)
        worker = rounds.workers[port]

        def done() -> int:
            return worker.loop.processed if worker.loop is not None else 0

        while done() < BATCH:  # warm-up batch
            await asyncio.sleep(0.005)
        start, began = done(), time.perf_counter()
        while done() < start + BATCHES * BATCH:
            await asyncio.sleep(0.005)
        return (done() - start) / (time.perf_counter() - began)
    finally:
        await rounds.stop_all()
        await rounds.close()
        outbox.close()


def _verdict_ms() -> tuple[float, float]:
    case = golden()["validation"][0]
    honest = {a["nonce"]: a["vector_b64"] for a in case["honest_artifacts"]}
    nonces = [n for _ in range(20) for n in case["nonces"]]  # 200 nonces, as the chain samples
    began = time.perf_counter()
    judge(nonces, honest, honest, 12, StatParams(0.4, 0.1, 0.01))
    verdict_ms = (time.perf_counter() - began) * 1000
    began = time.perf_counter()
    binom_upper_tail(1_200, 10_000, 0.1)
    return verdict_ms, (time.perf_counter() - began) * 1000


def run() -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        engine = _start_engine(port, workdir / "engine.log")
        rows = []
        try:
            for seq_len in SEQ_LENS:
                # Direct, through pow, direct again: the machine's load drifts; compare with the mean.
                first = asyncio.run(_direct(port, seq_len))
                node = asyncio.run(_through_pow(port, seq_len, workdir))
                direct = (first + asyncio.run(_direct(port, seq_len))) / 2
                rows.append([seq_len, f"{direct:.1f}", f"{node:.1f}", f"{node / direct:.2f}"])
        finally:
            engine.terminate()
            engine.wait(30)
    print_table(f"PoC v2 node overhead (CPU engine, golden tiny Qwen3, {BATCHES} batches of {BATCH})",
                ["seq_len", "direct nonces/s", "through pow nonces/s", "ratio"], rows)
    verdict_ms, tail_ms = _verdict_ms()
    print_table("PoC v2 validation cost", ["what", "ms"],
                [["verdict of 200 nonces (decode, L2, binomial test)", f"{verdict_ms:.2f}"],
                 ["binomial upper tail, n = 10000", f"{tail_ms:.2f}"]])


if __name__ == "__main__":
    run()
