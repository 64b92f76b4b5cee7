"""What the client sends for a PoC round, validated at the edge with reasons the operator can act on.

:class:`RoundSpec` is the InitDto of the contract; :class:`ProofBatch` is a batch to validate. Both
reject wrong types, missing fields and non-finite numbers with :class:`~node.errors.InvalidRequest`
(the gateway turns that into a 400 with the message as ``detail``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from node.errors import InvalidRequest
from services.pow.params import PowParams

NODE_ID_UNSET = "Node ID and node count must be set"
MAX_BATCH_NONCES = 100_000
INT64_MAX = 2**63 - 1


def _require(body: dict[str, Any], name: str) -> Any:
    if name not in body:
        raise InvalidRequest(f"missing field {name!r}")
    return body[name]


def _int(body: dict[str, Any], name: str, *, minimum: int | None = None) -> int:
    value = _require(body, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer, got {value!r}"[:200])
    if minimum is not None and value < minimum:
        raise InvalidRequest(f"{name} must be >= {minimum}, got {value}")
    return value


def _number(body: dict[str, Any], name: str) -> float:
    value = _require(body, name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{name} must be a number, got {value!r}"[:200])
    result = float(value)
    if not math.isfinite(result):
        raise InvalidRequest(f"{name} must be finite, got {value!r}")
    return result


def _text(body: dict[str, Any], name: str) -> str:
    value = _require(body, name)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{name} must be a non-empty string")
    return value


def _object(body: Any, what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    return body


@dataclass(frozen=True)
class RoundSpec:
    """A validated InitDto; ``raw`` keeps the body as sent (identical bodies reuse the model)."""

    block_hash: str
    block_height: int
    public_key: str
    batch_size: int
    r_target: float
    fraud_threshold: float
    params: PowParams
    node_id: int
    node_count: int
    url: str
    raw: dict[str, Any]

    @classmethod
    def from_body(cls, body: Any) -> RoundSpec:
        body = _object(body, "InitDto")
        for name in ("node_id", "node_count"):
            if body.get(name) == -1:
                raise InvalidRequest(NODE_ID_UNSET)
        url = _text(body, "url")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidRequest(f"url must be an http(s) URL, got {url!r}"[:200])
        r_target = _number(body, "r_target")
        if r_target <= 0:
            raise InvalidRequest(f"r_target must be > 0, got {r_target}")
        fraud_threshold = _number(body, "fraud_threshold")
        if not 0 <= fraud_threshold <= 1:
            raise InvalidRequest(f"fraud_threshold must be within [0, 1], got {fraud_threshold}")
        return cls(
            block_hash=_text(body, "block_hash"),
            block_height=_int(body, "block_height", minimum=0),
            public_key=_text(body, "public_key"),
            batch_size=_int(body, "batch_size", minimum=1),
            r_target=r_target,
            fraud_threshold=fraud_threshold,
            params=PowParams.from_dict(_require(body, "params")),
            node_id=_int(body, "node_id", minimum=0),
            node_count=_int(body, "node_count", minimum=1),
            url=url.rstrip("/"),
            raw=body,
        )

    def same_model(self, other: RoundSpec) -> bool:
        return self.block_hash == other.block_hash and self.params == other.params


@dataclass(frozen=True)
class ProofBatch:
    """A batch to validate: claimed nonces and distances from one participant."""

    public_key: str
    block_hash: str
    block_height: int
    nonces: list[int]
    dist: list[float]
    node_id: int

    @classmethod
    def from_body(cls, body: Any, spec: RoundSpec) -> ProofBatch:
        body = _object(body, "ProofBatch")
        block_hash = _text(body, "block_hash")
        if block_hash != spec.block_hash:
            raise InvalidRequest(
                f"batch block_hash {block_hash[:16]!r} does not match the loaded round "
                f"{spec.block_hash[:16]!r}; init the round first"
            )
        nonces, dist = _require(body, "nonces"), _require(body, "dist")
        if not isinstance(nonces, list) or not isinstance(dist, list):
            raise InvalidRequest("nonces and dist must be arrays")
        if len(nonces) != len(dist):
            raise InvalidRequest(f"nonces has {len(nonces)} entries but dist has {len(dist)}")
        if len(nonces) > MAX_BATCH_NONCES:
            raise InvalidRequest(f"a batch holds at most {MAX_BATCH_NONCES} nonces, got {len(nonces)}")
        for i, n in enumerate(nonces):
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= INT64_MAX:
                raise InvalidRequest(f"nonces[{i}] must be a non-negative int64, got {n!r}"[:200])
        claimed: list[float] = []
        for i, d in enumerate(dist):
            if isinstance(d, bool) or not isinstance(d, int | float) or not math.isfinite(float(d)):
                raise InvalidRequest(f"dist[{i}] must be a finite number, got {d!r}"[:200])
            claimed.append(float(d))
        node_id = body.get("node_id", 0)
        if isinstance(node_id, bool) or not isinstance(node_id, int):
            raise InvalidRequest(f"node_id must be an integer, got {node_id!r}"[:200])
        return cls(
            public_key=_text(body, "public_key"),
            block_hash=block_hash,
            block_height=_int(body, "block_height", minimum=0),
            nonces=list(nonces),
            dist=claimed,
            node_id=node_id,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"public_key": self.public_key, "block_hash": self.block_hash,
                "block_height": self.block_height, "nonces": self.nonces, "dist": self.dist,
                "node_id": self.node_id}
