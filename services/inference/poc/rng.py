"""The seeded generators of §5.1-§5.3 and §5.5 step 3, vectorised in torch on any device.

MainNet needs 1024 x 4096 normals per nonce, so the inputs are made where the model runs (a CUDA
tensor never crosses the bus). Hash arithmetic is done in int64 holding uint32 values: every product is
split so that no intermediate exceeds 2**63 (signed overflow is never relied on), then masked to 32 bits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from .seeds import C1, C2, F1, F2, MASK32, N1, haar_seed, layer_seed, nonce_seed_string, seed32, sub_seeds

TWO_PI_F32 = float(torch.tensor(2 * math.pi, dtype=torch.float32))
U1_FLOOR = 1e-10
TWO_POW_M32 = 2.0**-32


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """``a * c mod 2**32`` for int64 tensors holding uint32 values and a uint32 constant."""
    lo, hi = c & 0xFFFF, c >> 16
    high = (a * hi).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return high.add_(a * lo).bitwise_and_(MASK32)


def _rotl(a: torch.Tensor, r: int) -> torch.Tensor:
    return (a << r).bitwise_and_(MASK32).bitwise_or_(a >> (32 - r))


def _key_mix(keys: torch.Tensor) -> torch.Tensor:
    """The seed-independent half of mm3: the mixed block ``k`` of each key."""
    return _mul32(_rotl(_mul32(keys, C1), 15), C2)


@functools.lru_cache(maxsize=4)
def _key_mix_range(count: int, device: torch.device) -> torch.Tensor:
    """``_key_mix(0..count-1)``: the same for every seed, so made once per stream length and device."""
    return _key_mix(torch.arange(count, dtype=torch.int64, device=device))


def _finish(seeds: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    h = _rotl(seeds ^ k, 13)
    h.mul_(5).add_(N1).bitwise_and_(MASK32)
    h.bitwise_xor_(h >> 16)
    h = _mul32(h, F1)
    h.bitwise_xor_(h >> 13)
    h = _mul32(h, F2)
    return h.bitwise_xor_(h >> 16)


def mm3(keys: torch.Tensor, seeds: torch.Tensor | int) -> torch.Tensor:
    """mm3 of int64 ``keys`` under ``seeds`` (broadcast), as int64 values in [0, 2**32)."""
    seeds_t = torch.as_tensor(seeds, dtype=torch.int64, device=keys.device)
    return _finish(seeds_t, _key_mix(keys.to(torch.int64)))


def gauss(seeds: Sequence[int], m: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[len(seeds), m]`` float32: one Box-Muller stream per seed, cosines first then sines (§5.1)."""
    p = (m + 1) // 2
    dev = torch.device(device)
    seed_t = torch.tensor(list(seeds), dtype=torch.int64, device=dev).unsqueeze(1)
    u = _finish(seed_t, _key_mix_range(2 * p, dev).unsqueeze(0)).to(torch.float32).mul_(TWO_POW_M32)
    u1 = u[:, :p].clamp_min(U1_FLOOR)
    angle = u[:, p:] * TWO_PI_F32
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :m]


def inputs_legacy(text: str, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``count`` normals from one stream seeded by ``seed32(text)``."""
    return gauss([seed32(text)], count, device)[0]


def inputs_stronger(text: str, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``count`` normals from eight streams seeded by the words of SHA-256(text), concatenated."""
    seeds = sub_seeds(text)
    seg = -(-count // 8)
    full, tail = divmod(count, seg)
    parts = [gauss(seeds[:full], seg, device).reshape(-1)] if full else []
    if tail:
        parts.append(gauss([seeds[full]], tail, device)[0])
    return torch.cat(parts)


def nonce_inputs(
    block_hash: str, public_key: str, nonce: int, seq_len: int, hidden: int, *, stronger: bool,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The ``[seq_len, hidden]`` float32 input embeddings of one nonce (§5.2)."""
    text = nonce_seed_string(block_hash, public_key, nonce)
    make = inputs_stronger if stronger else inputs_legacy
    return make(text, seq_len * hidden, device).view(seq_len, hidden)


def householder_vectors(
    block_hash: str, layers: int, hidden: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``[layers, hidden]`` float32 unit vectors ``v_l`` of the per-layer reflections (§5.3)."""
    g = gauss([layer_seed(block_hash, layer) for layer in range(layers)], hidden, device)
    return g / torch.linalg.vector_norm(g, dim=1, keepdim=True)


def haar_vectors(
    block_hash: str, public_key: str, nonces: Sequence[int], k: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``[len(nonces), k-1, k]`` float32 reflection vectors of the rotation chain (§5.5 step 3)."""
    seeds = [haar_seed(block_hash, public_key, n, k, j) for n in nonces for j in range(k - 1)]
    w = gauss(seeds, k, device).view(len(nonces), k - 1, k)
    return w / (torch.linalg.vector_norm(w, dim=2, keepdim=True) + 1e-30)
