"""The seeded random streams of PoC v1 (spec section 2); every value here is part of the wire contract.

numpy's PCG64 ``Generator`` seeded from SHA-256 words is what the network agreed on, so nothing in this
module may switch generator, dtype of a draw, or draw order. Bulk draws release the GIL, which is why
callers can fan nonce inputs out over threads.
"""

from __future__ import annotations

import hashlib

import numpy as np
import numpy.typing as npt

WEIGHT_POOL_STD = 0.02


def entropy(seed: str, n: int) -> npt.NDArray[np.uint32]:
    """``sha256(f"{seed}_{i}")`` for i < n, each digest read as 8 little-endian uint32 words."""
    digests = b"".join(hashlib.sha256(f"{seed}_{i}".encode()).digest() for i in range(n))
    return np.frombuffer(digests, dtype="<u4").astype(np.uint32)


def seeded_rng(seed: str, n: int) -> np.random.Generator:
    """``default_rng(SeedSequence(entropy(seed, n)))``: the network's generator for one seed string."""
    return np.random.default_rng(np.random.SeedSequence(entropy(seed, n)))


def param_offset(block_hash: str, name: str) -> int:
    """Where a parameter starts in the weight pool: first 8 hex chars of ``sha256(f"{bh}_{name}")``."""
    return int(hashlib.sha256(f"{block_hash}_{name}".encode()).hexdigest()[:8], 16)


def pool_rng(block_hash: str) -> np.random.Generator:
    return seeded_rng(block_hash, 4)


def input_seed(block_hash: str, public_key: str, nonce: int) -> str:
    return f"{block_hash}_{public_key}_nonce{nonce}"


def permutation_seed(block_hash: str, public_key: str, nonce: int) -> str:
    return f"{block_hash}_{public_key}_nonce_{nonce}_permutations"


def fp16_like_torch(values: npt.NDArray[np.float64], out: npt.NDArray[np.float16] | None = None
                    ) -> npt.NDArray[np.float16]:
    """float64 -> float32 -> float16, the two roundings torch applies (numpy's direct cast differs)."""
    as32 = values.astype(np.float32)
    if out is None:
        return as32.astype(np.float16)
    np.copyto(out, as32, casting="same_kind")
    return out


def nonce_input(block_hash: str, public_key: str, nonce: int, seq_len: int, dim: int,
                out: npt.NDArray[np.float16] | None = None) -> npt.NDArray[np.float16]:
    """The fp16 (seq_len, dim) embedding input of one nonce; written into ``out`` when given."""
    draws = seeded_rng(input_seed(block_hash, public_key, nonce), 4).standard_normal((seq_len, dim))
    return fp16_like_torch(draws, out)


def nonce_permutation(block_hash: str, public_key: str, nonce: int, vocab_size: int) -> npt.NDArray[np.int64]:
    """The output permutation of one nonce (int64 indices into the logits)."""
    perm: npt.NDArray[np.int64] = seeded_rng(permutation_seed(block_hash, public_key, nonce), 1).permutation(
        vocab_size
    )
    return perm


def target_vector(block_hash: str, vocab_size: int) -> npt.NDArray[np.float64]:
    """The round's unit-length float64 target (no public key in the seed: shared by every node)."""
    t = seeded_rng(f"{block_hash}_target", 1).standard_normal((1, vocab_size))[0]
    normed: npt.NDArray[np.float64] = t / np.linalg.norm(t)
    return normed
