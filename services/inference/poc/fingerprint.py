"""From final-norm hidden states to ``vector_b64`` (§5.5), dropping non-finite nonces (§5.6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .codec import encode_f16
from .pick import pick_indices, pick_scores
from .rng import haar_vectors


def rotate(xk: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The Householder chain ``y <- y - 2 (y.w_j) w_j`` for j = 0..k-2, row-wise (float32)."""
    y = xk
    for j in range(w.shape[1]):
        wj = w[:, j]
        y = y - 2.0 * (y * wj).sum(dim=1, keepdim=True) * wj
    return y


def fingerprints(
    hidden: torch.Tensor, block_hash: str, public_key: str, nonces: Sequence[int], k: int
) -> torch.Tensor:
    """``[B, k]`` float32 unit vectors before fp16 rounding, from ``[B, H]`` last-position states."""
    h = hidden.float()
    x = h / (torch.linalg.vector_norm(h, dim=1, keepdim=True) + 1e-8)
    idx = pick_indices(pick_scores(block_hash, public_key, nonces, h.shape[1], k, h.device), k)
    xk = torch.gather(x, 1, idx).cpu()
    y = rotate(xk, haar_vectors(block_hash, public_key, nonces, k))
    return y / (torch.linalg.vector_norm(y, dim=1, keepdim=True) + 1e-8)


def artifacts(
    hidden: torch.Tensor, block_hash: str, public_key: str, nonces: Sequence[int], k: int
) -> tuple[list[dict[str, int | str]], list[int]]:
    """The wire artifacts of the finite rows, and the nonces dropped for non-finite values."""
    finite = torch.isfinite(hidden).all(dim=1).cpu().tolist()
    keep = [i for i, ok in enumerate(finite) if ok]
    dropped = [nonces[i] for i, ok in enumerate(finite) if not ok]
    out: list[dict[str, int | str]] = []
    if keep:
        kept = [nonces[i] for i in keep]
        vectors = fingerprints(hidden[keep], block_hash, public_key, kept, k)
        finite_f16 = torch.isfinite(vectors.half()).all(dim=1).tolist()
        for nonce, vector, ok in zip(kept, vectors.numpy(), finite_f16, strict=True):
            if not ok:
                dropped.append(nonce)
                continue
            out.append({"nonce": nonce, "vector_b64": encode_f16(vector)})
    return out, dropped
