"""Triton element-wise kernels agree with the eager ops (runs where Triton can execute: CUDA, or the
Triton interpreter with TRITON_INTERPRET=1 on a CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from services.pow.compute import ComputeGroup  # noqa: E402
from services.pow.fused import TritonOps, self_check  # noqa: E402
from services.pow.model import build_model  # noqa: E402
from services.pow.params import PowParams  # noqa: E402
from services.pow.weights import generate_pool  # noqa: E402

GOLDEN = json.loads((Path(__file__).parents[2] / "data" / "pow_v1_golden.json").read_text())
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["name"] for c in GOLDEN["cases"]])
def test_kernels_pass_their_self_check(case: dict) -> None:
    params = PowParams.from_dict(case["params"])
    assert self_check(TritonOps(), params, DEVICE, torch.float16)


@pytest.mark.timeout(600)
def test_fp16_model_with_fused_ops_matches_the_reference() -> None:
    case = next(c for c in GOLDEN["cases"] if c["name"] == "tiny_unit")
    params = PowParams.from_dict(case["params"])
    pool = generate_pool(case["block_hash"], params.pool_size).to(DEVICE)
    model = build_model(pool, case["block_hash"], params, [DEVICE], torch.float16, ops=TritonOps(),
                        head_multiple=8)
    got = ComputeGroup(0, case["block_hash"], model, 8).distances(case["public_key"], case["nonces"])
    assert np.max(np.abs(got - case["dist_reference_fp16"])) < 2e-5
