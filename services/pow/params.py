"""The PoC v1 model shape, validated once at the edge so the numeric code can trust it.

The network sends ``params`` as loose JSON (integers where floats are meant); every node must derive
the same sizes from it, so the derived quantities (FFN width, parameter count, pool size) live here,
next to the validation, as the single source of truth.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import msgspec

from contracts import pow as contract
from contracts.checked import convert

# Spec section 4: the pool is 5 % of all parameters, never fewer than this many values.
POOL_FRACTION = 0.05
MIN_POOL_SIZE = 50_000


@dataclass(frozen=True)
class PowParams:
    """A validated model shape; build it with :meth:`from_dict` from what the client sent."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim_multiplier: float
    multiple_of: int
    norm_eps: float
    rope_theta: float
    use_scaled_rope: bool
    seq_len: int

    @classmethod
    def of(cls, shape: contract.PowParams) -> PowParams:
        return cls(**msgspec.structs.asdict(shape))

    @classmethod
    def from_dict(cls, d: Any) -> PowParams:
        """The client's ``params`` object checked by the contract; InvalidRequest names the bad field."""
        return cls.of(convert(d, contract.PowParams, where="params"))

    def to_dict(self) -> dict[str, Any]:
        """The wire form (floats as floats), accepted back by :meth:`from_dict`."""
        return asdict(self)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def ffn_hidden(self) -> int:
        """Llama FFN width: 2/3 of 4*dim, scaled, rounded up to ``multiple_of`` (float steps as specified)."""
        hidden = int(2 * 4 * self.dim / 3)
        hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def parameter_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Every parameter of the reference model with its (out, in) shape; names seed the weights."""
        dim, hidden = self.dim, self.ffn_hidden
        yield "tok_embeddings.weight", (self.vocab_size, dim)
        for i in range(self.n_layers):
            p = f"layers.{i}."
            yield p + "attention.wq.weight", (dim, dim)
            yield p + "attention.wk.weight", (self.kv_dim, dim)
            yield p + "attention.wv.weight", (self.kv_dim, dim)
            yield p + "attention.wo.weight", (dim, dim)
            yield p + "feed_forward.w1.weight", (hidden, dim)
            yield p + "feed_forward.w2.weight", (dim, hidden)
            yield p + "feed_forward.w3.weight", (hidden, dim)
            yield p + "attention_norm.weight", (dim,)
            yield p + "ffn_norm.weight", (dim,)
        yield "norm.weight", (dim,)
        yield "output.weight", (self.vocab_size, dim)

    @property
    def layer_params(self) -> int:
        dim = self.dim
        return 2 * dim * dim + 2 * self.kv_dim * dim + 3 * self.ffn_hidden * dim + 2 * dim

    @property
    def n_params_total(self) -> int:
        """All parameter elements, ``tok_embeddings`` included (it sizes the pool)."""
        return self.n_layers * self.layer_params + 2 * self.vocab_size * self.dim + self.dim

    @property
    def non_embedding_params(self) -> int:
        """Parameters the forward pass touches: everything but ``tok_embeddings``."""
        return self.n_params_total - self.vocab_size * self.dim

    @property
    def pool_size(self) -> int:
        return max(MIN_POOL_SIZE, int(self.n_params_total * POOL_FRACTION))

    @property
    def flops_per_nonce(self) -> int:
        """The network's cost model (spec section 9): 2 FLOPs per non-embedding weight per position."""
        return 2 * self.non_embedding_params * self.seq_len
