"""The engine PoC RPC ``mlnode_poc_artifacts``: checked kwargs in, ``{"artifacts", "dropped"}`` out.

An engine supplies a :data:`BodyRunner` -- its model body on ``inputs_embeds`` with the reflection hook
-- and this module does the rest, ``batch_size`` nonces per model call. Inputs are made on the runner's
device in the model dtype (§5.2); reflections use the model-dtype ``v_l`` (§5.3).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .fingerprint import artifacts
from .rng import householder_vectors, nonce_inputs

METHOD = "mlnode_poc_artifacts"
MAX_NONCES = 100_000
MAX_NONCE = 2**63 - 1

# (layer index, residual stream [..., H]) -> the reflected stream.
LayerHook = Callable[[int, torch.Tensor], torch.Tensor]
# (inputs_embeds [B, T, H] in the model dtype, hook) -> final-norm hidden state at the last position [B, H].
BodyRunner = Callable[[torch.Tensor, LayerHook], torch.Tensor]


@dataclass(frozen=True)
class PocRequest:
    """The kwargs of one RPC call, checked (a ValueError's text is the 4xx message)."""

    block_hash: str
    public_key: str
    nonces: tuple[int, ...]
    seq_len: int
    k_dim: int = 12
    stronger_rng: bool = False

    @classmethod
    def from_kwargs(cls, kwargs: Any, *, hidden: int, max_len: int) -> PocRequest:
        if not isinstance(kwargs, Mapping):
            raise ValueError("kwargs must be an object")
        known = {"block_hash", "public_key", "nonces", "seq_len", "k_dim", "stronger_rng"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown kwargs: {', '.join(map(str, unknown))}")
        for key in ("block_hash", "public_key"):
            if not isinstance(kwargs.get(key), str) or not kwargs[key]:
                raise ValueError(f"{key} must be a non-empty string")
        nonces = kwargs.get("nonces")
        if not isinstance(nonces, list) or not all(_is_int(n) and 0 <= n <= MAX_NONCE for n in nonces):
            raise ValueError("nonces must be a list of non-negative integers")
        if len(nonces) > MAX_NONCES:
            raise ValueError(f"at most {MAX_NONCES} nonces per call")
        seq_len = _int_in(kwargs.get("seq_len"), "seq_len", 1, max_len)
        k_dim = _int_in(kwargs.get("k_dim", 12), "k_dim", 2, hidden)
        stronger = kwargs.get("stronger_rng", False)
        if not isinstance(stronger, bool):
            raise ValueError("stronger_rng must be a boolean")
        return cls(kwargs["block_hash"], kwargs["public_key"], tuple(nonces), seq_len, k_dim, stronger)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(value: Any, name: str, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}]")
    return int(value)


class Reflections:
    """The per-layer hook ``x <- x - 2 (x.v_l) v_l`` for one block hash, in the model dtype."""

    def __init__(self, block_hash: str, layers: int, hidden: int, dtype: torch.dtype, device: torch.device):
        self.vectors = householder_vectors(block_hash, layers, hidden, device).to(dtype)

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        v = self.vectors[layer]
        return x - 2 * (x @ v).unsqueeze(-1) * v


def make_inputs(req: PocRequest, nonces: Sequence[int], hidden: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """``[len(nonces), seq_len, hidden]`` input embeddings, generated on ``device``, cast to ``dtype``."""
    out = torch.empty((len(nonces), req.seq_len, hidden), dtype=dtype, device=device)
    for row, nonce in enumerate(nonces):
        out[row] = nonce_inputs(
            req.block_hash, req.public_key, nonce, req.seq_len, hidden,
            stronger=req.stronger_rng, device=device,
        )
    return out


def run(
    req: PocRequest,
    body: BodyRunner,
    *,
    layers: int,
    hidden: int,
    dtype: torch.dtype,
    device: torch.device,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> dict[str, list[Any]]:
    """Compute every nonce of ``req`` through ``body``, ``batch_size`` sequences per call;
    ``progress(n)`` is told after each batch of ``n`` nonces."""
    hook = Reflections(req.block_hash, layers, hidden, dtype, device)
    found: list[dict[str, int | str]] = []
    dropped: list[int] = []
    for start in range(0, len(req.nonces), batch_size):
        chunk = list(req.nonces[start : start + batch_size])
        last = body(make_inputs(req, chunk, hidden, dtype, device), hook)
        got, bad = artifacts(last, req.block_hash, req.public_key, chunk, req.k_dim)
        found.extend(got)
        dropped.extend(bad)
        if progress is not None:
            progress(len(chunk))
    return {"artifacts": found, "dropped": dropped}
