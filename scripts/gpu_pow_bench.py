"""PoC v1 on a GPU host: golden check, production-shape build time, nonces/s against the card's matmul rate.

Run on the device machine:   python scripts/gpu_pow_bench.py --out "$OUT"
Rehearse on a CPU:           python scripts/gpu_pow_bench.py --shape small --device cpu --seconds 5

Every stage prints as it finishes (and a JSON summary goes to ``--out``), so a run cut short by its
time limit still reports what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.pow.compute import ComputeGroup, discover_groups, shared_input_executor
from services.pow.inputs import InputMaker
from services.pow.nonces import nonce_sequence
from services.pow.ops import EagerOps
from services.pow.params import PowParams

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "data" / "pow_v1_golden.json"
NETWORK_R_TARGET = 1.4013564660458173
BLOCK_HASH = "9F3CA1A1B2B2C3C3D4D4E5E5F6F6A7A7B8B8C9C9D0D0E1E1F2F2A3A3B4B4C5C5"
PUBLIC_KEY = "02" + "5e" * 32
SHAPES: dict[str, dict[str, Any]] = {
    "production": dict(dim=1792, n_layers=64, n_heads=64, n_kv_heads=64, vocab_size=8196,
                       ffn_dim_multiplier=10, multiple_of=8192, seq_len=256),
    "testnet": dict(dim=1024, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=8196,
                    ffn_dim_multiplier=10, multiple_of=2048, seq_len=128),
    "small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=8196,
                  ffn_dim_multiplier=10, multiple_of=2048, seq_len=16),
}
COMMON = dict(norm_eps=1e-5, rope_theta=10000, use_scaled_rope=False)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def datasheet_tflops(name: str) -> float:
    """Dense fp16 tensor-core peak of the card (no sparsity)."""
    if "H100" in name and "PCIe" in name:
        return 756.0
    if "H100" in name or "H200" in name:
        return 989.0
    if "A100" in name:
        return 312.0
    return float("nan")


def golden_check(device: str, report: dict[str, Any]) -> None:
    golden = json.loads(GOLDEN.read_text())
    worst = 0.0
    for case in golden["cases"]:
        params = PowParams.from_dict(case["params"])
        groups = discover_groups(case["block_hash"], params, device)
        got = groups[0].distances(case["public_key"], case["nonces"])
        diff = float(np.max(np.abs(got - np.asarray(case["dist_reference_fp16"]))))
        worst = max(worst, diff)
        report.setdefault("golden", {})[case["name"]] = diff
        say(f"golden {case['name']}: max |dist - dist_reference_fp16| = {diff:.3e} "
            f"({len(case['nonces'])} nonces, fused={type(groups[0].model.ops).__name__})")
        del groups
    report["golden_worst"] = worst
    say(f"golden worst {worst:.3e} -> {'PASS' if worst < 2e-4 else 'FAIL'} (bar 2e-4)")


def matmul_rate(device: str, report: dict[str, Any]) -> float:
    """Best-of TFLOP/s of a big square matmul and of the FFN-shaped one (fp16 CUDA, fp32 CPU)."""
    if device == "cpu":
        shapes = [(1024, 1024, 1024)]
        dtype = torch.float32
    else:
        shapes = [(8192, 8192, 8192), (16384, 1792, 98304), (16384, 49152, 1792)]
        dtype = torch.float16
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        for _ in range(3):
            torch.matmul(a, b)
        reps = 20 if device != "cpu" else 5
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        rate = 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e12
        report.setdefault("matmul_tflops", {})[f"{m}x{k}x{n}"] = rate
        say(f"matmul {m}x{k} @ {k}x{n} {dtype}: {rate:.1f} TFLOP/s")
        best = max(best, rate)
        del a, b
    if device != "cpu":
        torch.cuda.empty_cache()
    report["matmul_best_tflops"] = best
    return best


def input_rate(group: ComputeGroup, seconds: float, report: dict[str, Any]) -> None:
    """Nonce inputs per second the host thread pool draws (the GPU needs ~100/s at production shape)."""
    executor = shared_input_executor() if group.model.input_device.type == "cuda" else None
    maker = InputMaker(group.block_hash, group.params, executor)
    batch = maker.new_batch(group.batch_size)
    t0 = time.perf_counter()
    done = 0
    while time.perf_counter() - t0 < seconds:
        maker.fill(batch, PUBLIC_KEY, list(range(10**9 + done, 10**9 + done + group.batch_size)))
        done += group.batch_size
    rate = done / (time.perf_counter() - t0)
    report["input_nonces_per_s"] = rate
    say(f"input generation: {rate:.1f} nonces/s ({executor._max_workers if executor else 1} threads)")


def throughput(group: ComputeGroup, seconds: float, label: str, report: dict[str, Any],
               batch_size: int | None = None) -> float:
    stop = threading.Event()
    nonces = nonce_sequence(node_id=0, node_count=1, group_id=0, n_groups=1,
                            start_k=report.get("next_k", 0))
    count = valid = 0
    first_at: float | None = None
    last_k = 0
    t_start = time.perf_counter()
    for batch_nonces, dists in group.generate(PUBLIC_KEY, nonces, stop, batch_size=batch_size):
        now = time.perf_counter()
        last_k = max(batch_nonces) + 1
        if first_at is None:  # the first batch pays for kernel compilation and warm-up
            first_at = now
            say(f"{label}: first batch of {len(batch_nonces)} after {now - t_start:.1f} s")
            continue
        count += len(batch_nonces)
        valid += int(np.sum(dists < NETWORK_R_TARGET))
        if now - first_at >= seconds:
            stop.set()
    elapsed = time.perf_counter() - (first_at or t_start)
    rate = count / elapsed if elapsed > 0 else 0.0
    report["next_k"] = last_k
    report.setdefault("runs", {})[label] = {"nonces": count, "seconds": elapsed, "nonces_per_s": rate,
                                            "valid": valid}
    say(f"{label}: {count} nonces in {elapsed:.1f} s = {rate:.2f} nonces/s; valid {valid} "
        f"({valid / max(count, 1):.3f}, expect ~0.05 at the network r_target)")
    return rate


def profile_batch(group: ComputeGroup, report: dict[str, Any]) -> None:
    """Kernel time breakdown of one full-batch forward pass (what is GEMM, what is element-wise)."""
    from torch.profiler import ProfilerActivity, profile

    maker = InputMaker(group.block_hash, group.params)
    batch = maker.fill(maker.new_batch(group.batch_size), PUBLIC_KEY, list(range(group.batch_size)))
    x = batch.x.to(group.model.input_device)
    group.model.forward(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        group.model.forward(x)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    table = ""
    for key in ("self_device_time_total", "self_cuda_time_total", "device_time_total", "cuda_time_total"):
        try:
            table = averages.table(sort_by=key, row_limit=14, max_name_column_width=60)
            break
        except Exception:
            continue
    report["profile"] = table
    print(table, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="production")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--ab-seconds", type=float, default=15.0, help="eager-ops comparison run (0: skip)")
    ap.add_argument("--big-batch", type=int, default=0, help="also run this batch size for --ab-seconds")
    ap.add_argument("--compare-unpadded", action="store_true", help="also run unpadded attention heads")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"shape": args.shape, "device": args.device, "torch": torch.__version__,
                              "numpy": np.__version__}

    def save() -> None:
        (out / "gpu_pow_bench.json").write_text(json.dumps(report, indent=2))

    if args.device == "cuda":
        name = torch.cuda.get_device_name(0)
        report.update(gpu=name, gpus=torch.cuda.device_count(), cpus=os.cpu_count())
        say(f"{name} x{torch.cuda.device_count()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    else:
        name = "cpu"
    try:
        golden_check(args.device, report)
        save()
        matmul = matmul_rate(args.device, report)
        save()
        params = PowParams.from_dict({**SHAPES[args.shape], **COMMON})
        say(f"shape {args.shape}: {params.n_params_total / 1e9:.2f} B params, "
            f"pool {params.pool_size / 1e6:.0f} M, {params.flops_per_nonce / 1e12:.3f} TFLOP/nonce")
        t0 = time.perf_counter()
        groups = discover_groups(BLOCK_HASH, params, args.device)
        build_s = time.perf_counter() - t0
        group = groups[0]
        report.update(build_seconds=build_s, batch_size=group.batch_size, groups=len(groups),
                      ops=type(group.model.ops).__name__, head_stride=group.model.head_stride,
                      host_peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        if args.device == "cuda":
            report["gpu_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
        say(f"built in {build_s:.1f} s: {len(groups)} group(s), batch {group.batch_size}, "
            f"ops {report['ops']}, host peak RSS {report['host_peak_rss_gib']:.1f} GiB")
        save()
        input_rate(group, 5.0, report)
        rate = throughput(group, args.seconds, "main", report)
        achieved = rate * params.flops_per_nonce / 1e12
        report.update(nonces_per_s=rate, achieved_tflops=achieved, fraction_of_matmul=achieved / matmul,
                      fraction_of_datasheet=achieved / datasheet_tflops(name))
        say(f"RESULT nonces/s {rate:.2f} | achieved {achieved:.1f} TFLOP/s | {achieved / matmul:.3f} of "
            f"measured matmul {matmul:.1f} | {achieved / datasheet_tflops(name):.3f} of datasheet "
            f"{datasheet_tflops(name):.0f}")
        if args.ab_seconds > 0 and not isinstance(group.model.ops, EagerOps):
            fused = group.model.ops
            group.model.ops = EagerOps()
            eager = throughput(group, args.ab_seconds, "eager_ops", report)
            group.model.ops = fused
            say(f"fused/eager element-wise ops: {rate / max(eager, 1e-9):.3f}x")
        if args.big_batch:
            throughput(group, args.ab_seconds, f"batch_{args.big_batch}", report, batch_size=args.big_batch)
        save()
        if args.device == "cuda":
            profile_batch(group, report)
            save()
        if args.compare_unpadded and args.device == "cuda":
            del group, groups
            torch.cuda.empty_cache()
            plain = discover_groups(BLOCK_HASH, params, args.device, head_multiple=1)[0]
            unpadded = throughput(plain, args.ab_seconds, "unpadded_heads", report)
            say(f"padded/unpadded heads: {rate / max(unpadded, 1e-9):.3f}x")
    except Exception:
        report["error"] = traceback.format_exc()
        say("FAILED:\n" + report["error"])
    save()
    return 1 if "error" in report else 0


if __name__ == "__main__":
    raise SystemExit(main())
