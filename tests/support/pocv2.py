"""The PoC v2 golden data (``shared/golden`` beside the repository, as in CI) and its pass criteria."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from services.inference.poc.codec import decode_f16, l2

GOLDEN_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "golden"
GOLDEN_JSON = GOLDEN_DIR / "pow_v2.json"
TINY_QWEN3 = GOLDEN_DIR / "pocv2-tiny-qwen3"
SERVED_NAME = "pocv2-tiny-qwen3"


@cache
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN_JSON.read_text(encoding="utf-8"))


def case(name: str) -> dict[str, Any]:
    return next(c for c in golden()["cases"] if c["name"] == name)


def rpc_kwargs(c: dict[str, Any]) -> dict[str, Any]:
    """The ``mlnode_poc_artifacts`` kwargs of a golden case."""
    return {
        "block_hash": c["block_hash"],
        "public_key": c["public_key"],
        "nonces": c["nonces"],
        "seq_len": c["seq_len"],
        "k_dim": c["k_dim"],
        "stronger_rng": c["poc_stronger_rng"],
    }


def check_artifacts(c: dict[str, Any], got: list[dict[str, Any]]) -> float:
    """Assert §9's criteria for every nonce of case ``c``; the worst L2 to ``vector_f16``."""
    tol = golden()["tolerances"]
    by_nonce = {a["nonce"]: a["vector_b64"] for a in got}
    assert sorted(by_nonce) == sorted(c["nonces"]), f"{c['name']}: nonces {sorted(by_nonce)}"
    worst = 0.0
    for want in c["artifacts"]:
        mine = decode_f16(by_nonce[want["nonce"]])
        dist = l2(mine, np.asarray(want["vector_f16"], dtype=np.float32))
        assert dist <= tol["l2_vs_vector_f16"], f"{c['name']} nonce {want['nonce']}: L2 {dist}"
        worst = max(worst, dist)
    return worst
