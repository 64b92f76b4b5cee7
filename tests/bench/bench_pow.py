"""PoC v1 on the CPU: end-to-end nonces/s against a plain fp32 GEMM measured in the same run.

The cores are shared with whatever else runs, so GEMM and end-to-end windows alternate over several
rounds and the table reports per-round ratios (median and best) rather than one noisy pair.
"""

from __future__ import annotations

import statistics
import threading
import time

import torch
import torch.nn.functional as F

from services.pow.compute import CPU_FFN_CHUNK, ComputeGroup, discover_groups
from services.pow.inputs import InputMaker
from services.pow.nonces import nonce_sequence
from services.pow.params import PowParams
from tests.bench.report import print_table

BENCH_SHAPE = dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=8196, ffn_dim_multiplier=10,
                   multiple_of=2048, seq_len=16, norm_eps=1e-5, rope_theta=10000, use_scaled_rope=False)
ROUNDS = 5
GEMM_WINDOW_S = 1.5
BATCHES_PER_ROUND = 4


def executed_flops_per_nonce(p: PowParams) -> int:
    """Matrix-product FLOPs the model really runs: the last layer's query, FFN and head see one position."""
    s, d, kv, h = p.seq_len, p.dim, p.kv_dim, p.ffn_hidden
    full_layer = 2 * s * (2 * d * d + 2 * kv * d + 3 * h * d)
    last_layer = 2 * s * (d + 2 * kv) * d + 2 * (d * d + 3 * h * d)
    return (p.n_layers - 1) * full_layer + last_layer + 2 * p.vocab_size * d


def gemm_shapes(rows: int, p: PowParams) -> list[tuple[int, int, int]]:
    """The model's own products (FFN chunk in/out, whole FFN in) and a square 2048; ceiling = the best."""
    return [(rows, p.dim, 2 * CPU_FFN_CHUNK), (rows, CPU_FFN_CHUNK, p.dim), (rows, p.dim, 2 * p.ffn_hidden),
            (2048, 2048, 2048)]


def gemm_gflops(shape: tuple[int, int, int], window_s: float) -> float:
    """fp32 GFLOP/s of (m x k) @ (k x n), the way the model calls it (F.linear)."""
    m, k, n = shape
    a = torch.randn(m, k)
    b = torch.randn(n, k)
    F.linear(a, b)
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < window_s:
        F.linear(a, b)
        done += 1
    return 2 * m * k * n * done / (time.perf_counter() - t0) / 1e9


def input_nonces_per_s(group: ComputeGroup, seconds: float = 1.0) -> float:
    maker = InputMaker(group.block_hash, group.params)
    batch = maker.new_batch(group.batch_size)
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        maker.fill(batch, "bench", list(range(done, done + group.batch_size)))
        done += group.batch_size
    return done / (time.perf_counter() - t0)


def run() -> None:
    params = PowParams.from_dict(BENCH_SHAPE)
    t0 = time.perf_counter()
    group = discover_groups("0xbench", params, "cpu")[0]
    build_s = time.perf_counter() - t0
    rows = group.batch_size * params.seq_len
    stop = threading.Event()
    stream = group.generate("bench", nonce_sequence(0, 1, 0, 1), stop)
    next(stream)  # warm-up batch
    shapes = gemm_shapes(rows, params)
    rates, gemms, ratios = [], [], []
    per_shape: dict[tuple[int, int, int], list[float]] = {s: [] for s in shapes}
    for _ in range(ROUNDS):
        for shape in shapes:
            per_shape[shape].append(gemm_gflops(shape, GEMM_WINDOW_S / len(shapes)))
        gemm = max(values[-1] for values in per_shape.values())
        t = time.perf_counter()
        count = sum(len(next(stream)[0]) for _ in range(BATCHES_PER_ROUND))
        rate = count / (time.perf_counter() - t)
        rates.append(rate)
        gemms.append(gemm)
        ratios.append(rate * params.flops_per_nonce / 1e9 / gemm)
    stop.set()
    stream.close()
    inputs = input_nonces_per_s(group)
    rate, gemm = statistics.median(rates), statistics.median(gemms)
    achieved = rate * params.flops_per_nonce / 1e9
    executed = rate * executed_flops_per_nonce(params) / 1e9
    print_table(
        f"PoC v1 CPU end to end (dim 512, 8 layers, seq 16, vocab 8196; batch {group.batch_size}, "
        f"{torch.get_num_threads()} torch threads; median of {ROUNDS} alternating rounds)",
        ["metric", "value"],
        [
            ["model build (s)", f"{build_s:.2f}"],
            ["nonces/s end to end", f"{rate:.2f}"],
            ["achieved GFLOP/s (2*non-emb params*seq_len per nonce)", f"{achieved:.1f}"],
            ["executed GFLOP/s (matmul FLOPs really run)", f"{executed:.1f}"],
            *[[f"fp32 GEMM GFLOP/s {m}x{k} @ {k}x{n}", f"{statistics.median(per_shape[(m, k, n)]):.1f}"]
              for m, k, n in shapes],
            ["fp32 GEMM GFLOP/s ceiling (best shape per round, median)", f"{gemm:.1f}"],
            ["ratio achieved / GEMM (median, best)", f"{statistics.median(ratios):.3f}, {max(ratios):.3f}"],
            ["ratio executed / GEMM (median)", f"{executed / gemm:.3f}"],
            ["input generation alone, 1 thread (nonces/s)", f"{inputs:.0f}"],
        ],
    )


if __name__ == "__main__":
    run()
