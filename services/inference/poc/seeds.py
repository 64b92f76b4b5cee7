"""Seed strings and scalar hashes of §5.1 (stdlib only: validation and tests import this cheaply)."""

from __future__ import annotations

import hashlib

MASK32 = 0xFFFFFFFF
C1, C2 = 0xCC9E2D51, 0x1B873593
F1, F2 = 0x85EBCA6B, 0xC2B2AE35
N1 = 0xE6546B64


def seed32(text: str) -> int:
    """First four bytes of SHA-256(text), big-endian."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big")


def sub_seeds(text: str) -> list[int]:
    """The stronger generator's eight seeds: SHA-256(text) cut into big-endian 32-bit words."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return [int.from_bytes(digest[4 * i : 4 * i + 4], "big") for i in range(8)]


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & MASK32


def mm3(key: int, seed: int) -> int:
    """MurmurHash3 x86_32 of one 4-byte block, without the final ``h ^= length`` (the network's variant)."""
    k = _rotl((key * C1) & MASK32, 15) * C2 & MASK32
    h = _rotl(seed ^ k, 13)
    h = (h * 5 + N1) & MASK32
    h ^= h >> 16
    h = (h * F1) & MASK32
    h ^= h >> 13
    h = (h * F2) & MASK32
    return h ^ (h >> 16)


def nonce_seed_string(block_hash: str, public_key: str, nonce: int) -> str:
    """The input seed string ``S`` of §5.2 (no underscore before the number)."""
    return f"{block_hash}_{public_key}_nonce{nonce}"


def layer_seed(block_hash: str, layer: int) -> int:
    return seed32(f"{block_hash}_layer_{layer}_householder")


def pick_seed(block_hash: str, public_key: str, nonce: int, k: int) -> int:
    return seed32(f"{block_hash}_{public_key}_nonce_{nonce}_pick_{k}")


def haar_seed(block_hash: str, public_key: str, nonce: int, k: int, j: int) -> int:
    return seed32(f"{block_hash}_{public_key}_nonce_{nonce}_haar_hh_{k}_{j}")
