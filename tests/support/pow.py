"""The PoC round the tests drive: the golden tiny case and InitDto bodies as the Go client sends them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.pow.validation import validated_batch

GOLDEN: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[1] / "data" / "pow_v1_golden.json").read_text()
)
CASE: dict[str, Any] = next(c for c in GOLDEN["cases"] if c["name"] == "tiny_unit")
R_TARGET = 1.4


def validate_batch(batch: dict[str, Any], recomputed_dist: Sequence[float], *, r_target: float,
                   fraud_threshold: float) -> dict[str, Any]:
    """Judge a ProofBatch dict against recomputed distances through the product's validated_batch."""
    return validated_batch(
        public_key=batch["public_key"], block_hash=batch["block_hash"], block_height=batch["block_height"],
        nonces=batch["nonces"], received_dist=batch["dist"], recomputed_dist=recomputed_dist,
        node_id=batch.get("node_id", 0), r_target=r_target, fraud_threshold=fraud_threshold,
    )


def init_body(url: str, *, node_id: int = 1, node_count: int = 2, block_height: int = 12345,
              r_target: float = R_TARGET) -> str:
    """The InitDto byte for byte as the Go client writes it: integers where floats are meant."""
    p = CASE["params"]
    return (
        f'{{"block_hash":"{CASE["block_hash"]}","block_height":{block_height},'
        f'"public_key":"{CASE["public_key"]}","batch_size":100,"r_target":{r_target!r},'
        f'"fraud_threshold":1e-7,'
        f'"params":{{"dim":{p["dim"]},"n_layers":{p["n_layers"]},"n_heads":{p["n_heads"]},'
        f'"n_kv_heads":{p["n_kv_heads"]},"vocab_size":{p["vocab_size"]},'
        f'"ffn_dim_multiplier":{p["ffn_dim_multiplier"]},"multiple_of":{p["multiple_of"]},'
        f'"norm_eps":0.00001,"rope_theta":500000,"use_scaled_rope":false,"seq_len":{p["seq_len"]}}},'
        f'"node_id":{node_id},"node_count":{node_count},"url":"{url}"}}'
    )


def init_dict(url: str, **kw: Any) -> dict[str, Any]:
    """The same InitDto as a dict, for tests that change a field."""
    return dict(json.loads(init_body(url, **kw)))
