"""Which k hidden dimensions a nonce fingerprints, in the order CUDA's ``topk`` yields them (§5.5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .rng import mm3
from .seeds import pick_seed


def pick_scores(
    block_hash: str, public_key: str, nonces: Sequence[int], hidden: int, k: int, device: torch.device
) -> torch.Tensor:
    """``[len(nonces), hidden]`` int64 scores ``mm3(j, seed32(.._pick_k))``."""
    seeds = torch.tensor(
        [pick_seed(block_hash, public_key, n, k) for n in nonces], dtype=torch.int64, device=device
    ).unsqueeze(1)
    return mm3(torch.arange(hidden, dtype=torch.int64, device=device).unsqueeze(0), seeds)


def spec_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The spec's rule, row-wise: indices scoring below the k-th smallest score in ascending index
    order, then the indices tied with it in ascending order until k are taken."""
    hidden = scores.shape[-1]
    theta = torch.kthvalue(scores, k, dim=-1, keepdim=True).values
    index = torch.arange(hidden, dtype=torch.int64, device=scores.device).expand_as(scores)
    tied_or_above = torch.where(scores == theta, index + hidden, index + 2 * hidden)
    rank = torch.where(scores < theta, index, tied_or_above)
    return torch.sort(rank, dim=-1).values[..., :k] % hidden


def cuda_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """What the network runs: ``torch.topk(-scores, k, sorted=False)`` on each nonce's 1-D scores."""
    return torch.stack([torch.topk(-row, k, sorted=False).indices for row in scores])


def pick_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """CUDA's own ``topk`` on CUDA (bit-for-bit the network's call), the spec's rule elsewhere."""
    if k > scores.shape[-1]:
        raise ValueError(f"k_dim {k} exceeds the hidden size {scores.shape[-1]}")
    return cuda_order(scores, k) if scores.is_cuda else spec_order(scores, k)
