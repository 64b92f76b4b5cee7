"""What only a GPU shows: PoC fp16 on CUDA against the golden file, batch size from free memory, and
more than one compute group. Skipped, with the reason, where CUDA is not available."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from services.pow.compute import cuda_batch_size, discover_groups, nonce_sequence
from services.pow.params import PowParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs CUDA: torch.cuda.is_available() is False"),
]

GOLDEN = json.loads((Path(__file__).resolve().parents[1] / "data" / "pow_v1_golden.json").read_text())


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: c["name"])
def test_fp16_on_cuda_matches_the_reference(case: dict) -> None:
    groups = discover_groups(case["block_hash"], PowParams.from_dict(case["params"]), "cuda")
    assert groups and all(str(d).startswith("cuda") for d in groups[0].devices)
    got = groups[0].distances(case["public_key"], case["nonces"])
    for nonce, mine, ref in zip(case["nonces"], got, case["dist_reference_fp16"], strict=True):
        assert abs(mine - ref) < 2e-4, (nonce, mine, ref)


def test_batch_size_follows_free_memory() -> None:
    params = PowParams.from_dict({**GOLDEN["cases"][2]["params"], "seq_len": 2048, "dim": 1024,
                                  "n_heads": 8, "n_kv_heads": 8})
    device = torch.device("cuda", 0)
    before = cuda_batch_size(params, [device])
    free = torch.cuda.mem_get_info(device)[0]
    hog = torch.empty(int(free * 0.7), dtype=torch.uint8, device=device)
    try:
        after = cuda_batch_size(params, [device])
    finally:
        del hog
        torch.cuda.empty_cache()
    assert 1 <= after < before


def test_two_compute_groups_cover_disjoint_nonces_and_agree() -> None:
    case = GOLDEN["cases"][1]
    params = PowParams.from_dict(case["params"])
    spec = "cuda" if torch.cuda.device_count() >= 2 else "cuda:0,cuda:0"  # two groups on one GPU
    groups = discover_groups(case["block_hash"], params, spec)
    assert len(groups) >= 2
    seen: list[int] = []
    for gid, group in enumerate(groups[:2]):
        nonces = nonce_sequence(1, 2, gid, len(groups), 0)
        for batch, dists in group.generate(case["public_key"], iter([next(nonces) for _ in range(64)]),
                                           threading.Event()):
            seen += batch
            assert len(dists) == len(batch)
    assert len(seen) == len(set(seen)) == 128
    reference = groups[0].distances(case["public_key"], case["nonces"])
    other = groups[1].distances(case["public_key"], case["nonces"])
    assert (abs(reference - other) < 1e-9).all()
