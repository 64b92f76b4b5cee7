"""A PoC round and its batches, as the pow service holds them once the contract accepted them.

The request bodies are declared (and checked) once, in :mod:`contracts.pow`; what is left here is what
only a loaded round can judge (a batch for another round) and the round's working form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from contracts.checked import convert
from contracts.pow import InitDto, ProofBatch
from node.errors import InvalidRequest
from services.pow.params import PowParams

__all__ = ["ProofBatch", "RoundSpec", "batch_for"]


@dataclass(frozen=True)
class RoundSpec:
    """A round the pow service runs; ``init`` is the InitDto it came from (identical ones reuse the model)."""

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
    init: InitDto

    @classmethod
    def of(cls, init: InitDto) -> RoundSpec:
        return cls(
            block_hash=init.block_hash,
            block_height=init.block_height,
            public_key=init.public_key,
            batch_size=init.batch_size,
            r_target=init.r_target,
            fraud_threshold=init.fraud_threshold,
            params=PowParams.of(init.params),
            node_id=init.node_id,
            node_count=init.node_count,
            url=init.url.rstrip("/"),
            init=init,
        )

    @classmethod
    def from_body(cls, body: Any) -> RoundSpec:
        """From an InitDto as JSON values (a journaled round)."""
        return cls.of(convert(body, InitDto))

    @property
    def raw(self) -> dict[str, Any]:
        """The InitDto as JSON values (what the journal keeps)."""
        doc: dict[str, Any] = msgspec.to_builtins(self.init)
        return doc


def batch_for(batch: ProofBatch | Any, spec: RoundSpec) -> ProofBatch:
    """``batch`` (typed, or JSON values from the journal) if it belongs to the loaded round."""
    if not isinstance(batch, ProofBatch):
        batch = convert(batch, ProofBatch)
    if batch.block_hash != spec.block_hash:
        raise InvalidRequest(
            f"batch block_hash {batch.block_hash[:16]!r} does not match the loaded round "
            f"{spec.block_hash[:16]!r}; init the round first"
        )
    return batch
