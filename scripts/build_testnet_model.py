"""Build the 3 B test-net PoC model on the CPU and evaluate a couple of nonces.

Shows what a CPU-only node pays to join a test-net round: build time, peak memory (fp32 weights, so
about 4 bytes per parameter) and seconds per nonce.

    python scripts/build_testnet_model.py [--nonces 2]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.pow.compute import discover_groups
from services.pow.params import PowParams

TESTNET = dict(dim=1024, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=8196, ffn_dim_multiplier=10,
               multiple_of=2048, seq_len=128, norm_eps=1e-5, rope_theta=10000, use_scaled_rope=False)
BLOCK_HASH = "0xtestnet"
PUBLIC_KEY = "02" + "ab" * 32
R_TARGET = 1.4013564660458173


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nonces", type=int, default=2)
    args = ap.parse_args()
    params = PowParams.from_dict(TESTNET)
    print(f"test-net shape: {params.n_params_total / 1e9:.3f} B params, pool {params.pool_size / 1e6:.1f} M, "
          f"ffn {params.ffn_hidden}, {params.flops_per_nonce / 1e9:.0f} GFLOP per nonce", flush=True)
    t0 = time.perf_counter()
    group = discover_groups(BLOCK_HASH, params, "cpu")[0]
    build_s = time.perf_counter() - t0
    print(f"build: {build_s:.1f} s, peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    nonces = list(range(args.nonces))
    t0 = time.perf_counter()
    dists = group.distances(PUBLIC_KEY, nonces)
    compute_s = time.perf_counter() - t0
    for nonce, dist in zip(nonces, dists, strict=True):
        print(f"nonce {nonce}: dist {dist:.6f} ({'valid' if dist < R_TARGET else 'invalid'})")
    rate = params.flops_per_nonce * len(nonces) / compute_s / 1e9
    print(f"compute: {compute_s:.1f} s for {len(nonces)} nonces ({compute_s / len(nonces):.1f} s/nonce, "
          f"{rate:.0f} GFLOP/s); peak RSS {peak_rss_gib():.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
