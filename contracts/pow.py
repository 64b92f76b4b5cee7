"""PoC v1 request bodies (pow-v1.md): the round (InitDto), its model shape, a batch to validate.

Rules JSON Schema cannot state (divisibility, equal lengths) live in ``__post_init__`` and are spelled
out in the description, so the published document still tells the client every rule the node applies.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import msgspec

from contracts.fields import INT64_MAX, Count, Finite, HttpUrl, Positive, PositiveNumber, Text

NODE_ID_UNSET = "Node ID and node count must be set"
MAX_BATCH_NONCES = 100_000


class PowParams(msgspec.Struct, kw_only=True):
    """PoC v1 model shape. Also required, between fields: dim must be divisible by n_heads, n_heads
    must be divisible by n_kv_heads, dim / n_heads must be even for rotary. Unknown fields are ignored."""

    dim: Positive
    n_layers: Positive
    n_heads: Positive
    n_kv_heads: Positive
    vocab_size: Annotated[int, msgspec.Meta(ge=2, le=INT64_MAX)]
    ffn_dim_multiplier: PositiveNumber
    multiple_of: Positive
    norm_eps: PositiveNumber
    rope_theta: PositiveNumber
    use_scaled_rope: Annotated[bool, msgspec.Meta(
        description="Only false is supported by PoC v1.", extra_json_schema={"const": False})]
    seq_len: Positive

    def __post_init__(self) -> None:
        if self.use_scaled_rope:
            raise ValueError(
                "params.use_scaled_rope=true is not supported by PoC v1 (the reference cannot build it)")
        if self.dim % self.n_heads:
            raise ValueError(f"params.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"params.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if (self.dim // self.n_heads) % 2:
            head_dim = self.dim // self.n_heads
            raise ValueError(f"params.dim / params.n_heads must be even for rotary, got {head_dim}")


#: node_id/node_count: -1 means "unset" to the client and gets its own message, so the lower bound is
#: checked in ``__post_init__`` (the schema states it).
_Slot = Annotated[int, msgspec.Meta(le=INT64_MAX)]


class InitDto(msgspec.Struct, kw_only=True):
    """A PoC round as the Network Node sends it. Unknown fields are ignored."""

    block_hash: Text
    block_height: Count
    public_key: Text
    batch_size: Annotated[Positive, msgspec.Meta(description="A hint; the node picks its own batch size.")]
    r_target: Annotated[PositiveNumber, msgspec.Meta(description="Distances below this are valid.")]
    fraud_threshold: Annotated[float, msgspec.Meta(ge=0, le=1)]
    params: PowParams
    node_id: Annotated[_Slot, msgspec.Meta(
        description="Starts at 1, may be >= node_count; -1 (unset) is refused with "
                    f"'{NODE_ID_UNSET}'.", extra_json_schema={"minimum": 0})]
    node_count: Annotated[_Slot, msgspec.Meta(
        description="At least 1; -1 (unset) is refused like node_id.",
        extra_json_schema={"minimum": 1})]
    url: Annotated[HttpUrl, msgspec.Meta(
        description="Callback base: results go to {url}/generated and {url}/validated.")]

    def __post_init__(self) -> None:
        if self.node_id == -1 or self.node_count == -1:
            raise ValueError(NODE_ID_UNSET)
        if self.node_id < 0:
            raise ValueError(f"node_id must be >= 0, got {self.node_id}")
        if self.node_count < 1:
            raise ValueError(f"node_count must be >= 1, got {self.node_count}")


class ProofBatch(msgspec.Struct, kw_only=True):
    """One participant's claimed nonces and distances, checked against the loaded round. Between
    fields: nonces and dist have the same number of entries (refused as 'nonces has N
    entries but dist has M'). Unknown fields are ignored."""

    public_key: Text
    block_hash: Text
    block_height: Count
    nonces: Annotated[list[Count], msgspec.Meta(max_length=MAX_BATCH_NONCES)]
    dist: Annotated[list[Finite], msgspec.Meta(max_length=MAX_BATCH_NONCES)]
    node_id: Annotated[int, msgspec.Meta(ge=-INT64_MAX, le=INT64_MAX)] = 0

    def __post_init__(self) -> None:
        if len(self.nonces) != len(self.dist):
            raise ValueError(f"nonces has {len(self.nonces)} entries but dist has {len(self.dist)}")


# --- answers ----------------------------------------------------------------------------------------

class PowState(StrEnum):
    """The PoC v1 round's status (a str enum: it compares and encodes as its wire string)."""

    IDLE = "IDLE"
    NOT_LOADED = "NOT_LOADED"
    LOADING = "LOADING"
    GENERATING = "GENERATING"
    VALIDATING = "VALIDATING"
    STOPPED = "STOPPED"
    MIXED = "MIXED"


class PowStatus(msgspec.Struct, kw_only=True):
    """``GET /api/v1/pow/status``: the round's status and counters."""

    status: PowState
    is_model_initialized: bool | msgspec.UnsetType = msgspec.UNSET
    nonces_computed: int | msgspec.UnsetType = msgspec.UNSET
    valid_found: int | msgspec.UnsetType = msgspec.UNSET
    nonces_per_second: float | msgspec.UnsetType = msgspec.UNSET
    batches_validated: int | msgspec.UnsetType = msgspec.UNSET
    fraud_detected: int | msgspec.UnsetType = msgspec.UNSET
    outbox: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


class PowAnswer(msgspec.Struct, kw_only=True):
    """What the PoC v1 starts, phase flips and stop answer."""

    status: str
    pow_status: PowStatus | msgspec.UnsetType = msgspec.UNSET


#: ``GET /api/v1/pow/outbox/dead?limit=``: the most dead letters one answer lists.
MAX_DEAD_LETTERS = 1000


class DeadLetter(msgspec.Struct, kw_only=True):
    """A batch its receiver refused for good (4xx): kept in the outbox for an operator to inspect."""

    id: int
    kind: Annotated[str, msgspec.Meta(description="generated or validated: the callback path.")]
    url: Annotated[str, msgspec.Meta(description="The callback URL, without user:password.")]
    members: Annotated[int, msgspec.Meta(description="Batches merged into this delivery.")]
    attempts: int
    status: Annotated[int | None, msgspec.Meta(description="The receiver's final HTTP status.")]
    reason: str | None
    created: Annotated[float, msgspec.Meta(description="UNIX time it was queued.")]
    dead_at: Annotated[float, msgspec.Meta(description="UNIX time it was given up.")]
    body_bytes: Annotated[int, msgspec.Meta(description="Size of the stored request body.")]


class DeadLetters(msgspec.Struct, kw_only=True):
    """``GET /api/v1/pow/outbox/dead``: every dead letter counted, the newest ``limit`` listed."""

    total: int
    dead_letters: list[DeadLetter]


class PowQueued(msgspec.Struct, kw_only=True):
    """``POST /api/v1/pow/validate``: the batch is queued; the verdict goes to ``{url}/validated``."""

    status: str
    queued: int | msgspec.UnsetType = msgspec.UNSET
    nonces: int | msgspec.UnsetType = msgspec.UNSET
