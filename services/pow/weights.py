"""Model weights from the block hash (spec section 4): one fp16 pool, each parameter a window of it.

The production pool is 888 M values, so it is drawn in chunks that are rounded float64 -> float32 ->
float16 as they come: the host never holds a float64 copy of the whole pool. Drawing a chunk and
converting the previous one overlap (numpy releases the GIL while it fills a buffer).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from services.pow.cancel import check
from services.pow.inputs import StopSignal
from services.pow.rng import WEIGHT_POOL_STD, param_offset, pool_rng

DEFAULT_CHUNK = 1 << 23


def _round_chunk(draws: np.ndarray, staging: torch.Tensor, dst: torch.Tensor) -> None:
    # normal(0, s) is 0.0 + s * z; scaling in place is bit-identical and spares a fresh allocation.
    draws *= WEIGHT_POOL_STD
    staging.copy_(torch.from_numpy(draws))
    dst.copy_(staging)


def generate_pool(block_hash: str, size: int, *, chunk: int = DEFAULT_CHUNK, pin: bool = False,
                  cancel: StopSignal | None = None) -> torch.Tensor:
    """The fp16 weight pool on the CPU: ``rng(block_hash, 4).normal(0, 0.02, size)`` rounded via float32.

    ``pin`` page-locks it so copies to a GPU run at full bus speed. ``cancel`` is checked per chunk
    (raises :class:`~services.pow.cancel.Cancelled`).
    """
    if size < 1 or chunk < 1:
        raise ValueError(f"pool size and chunk must be >= 1, got size={size} chunk={chunk}")
    pool = torch.empty(size, dtype=torch.float16, pin_memory=pin)
    rng = pool_rng(block_hash)
    width = min(chunk, size)
    draws = [np.empty(width, dtype=np.float64) for _ in range(2)]
    staging = [torch.empty(width, dtype=torch.float32) for _ in range(2)]
    pending: list[Future[None] | None] = [None, None]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pow-pool") as converter:
        for index, start in enumerate(range(0, size, width)):
            n = min(width, size - start)
            slot = index % 2
            previous = pending[slot]
            if previous is not None:
                previous.result()
            check(cancel)
            rng.standard_normal(out=draws[slot][:n])
            pending[slot] = converter.submit(
                _round_chunk, draws[slot][:n], staging[slot][:n], pool[start : start + n]
            )
        for job in pending:
            if job is not None:
                job.result()
    return pool


def _copy_cyclic(dst: torch.Tensor, pool: torch.Tensor, start: int) -> None:
    """Fill 1-D ``dst`` with the pool read cyclically from ``start``."""
    size = pool.numel()
    pos, idx = 0, start % size
    while pos < dst.numel():
        take = min(size - idx, dst.numel() - pos)
        dst[pos : pos + take].copy_(pool[idx : idx + take])
        pos += take
        idx = 0


def parameter_values(pool: torch.Tensor, block_hash: str, name: str, numel: int) -> torch.Tensor:
    """The ``numel`` pool values of parameter ``name`` in row-major order, on the pool's device.

    A parameter that fits in the pool is a window of it (returned as a view, no copy); a larger one is
    the pool tiled to its length, rotated left by ``offset % numel``.
    """
    size = pool.numel()
    offset = param_offset(block_hash, name)
    if numel <= size:
        start = offset % (size - numel + 1)
        return pool[start : start + numel]
    shift = offset % numel
    out = torch.empty(numel, dtype=pool.dtype, device=pool.device)
    # Element j of the rotated tiling is tile[(j + shift) % numel] with tile[i] = pool[i % size].
    _copy_cyclic(out[: numel - shift], pool, shift)
    if shift:
        _copy_cyclic(out[numel - shift :], pool, 0)
    return out
