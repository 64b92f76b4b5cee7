"""Compute groups: a built PoC model on one device (or one block of GPUs) turning nonces into distances.

The service sees only :class:`ComputeGroup` and :func:`discover_groups`. Inside, inputs are drawn on
CPU threads ahead of the forward pass (:mod:`services.pow.inputs`), the permute/normalise/distance
step runs batched on the device, and one batch stays in flight while the previous result is read
back, so the device never waits on the host between batches.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from node.errors import ConfigError, Unavailable
from node.logging import get_logger
from services.pow.fused import load_fused_ops
from services.pow.inputs import BufferPool, InputBatch, InputMaker, Prefetcher, StopSignal
from services.pow.model import PowModel, build_model
from services.pow.nonces import nonce_sequence
from services.pow.params import PowParams
from services.pow.rng import target_vector
from services.pow.weights import generate_pool

__all__ = [
    "ComputeGroup",
    "batch_distances",
    "cpu_batch_size",
    "cuda_batch_size",
    "discover_groups",
    "nonce_sequence",
    "plan_gpu_blocks",
    "target_vector",
]

log = get_logger(__name__)

# CPU: ~1024 rows per matrix product and 2048-wide FFN chunks measured best on 2 cores (~5 % over 512
# rows; the FFN chunk keeps the SiLU gate's activations in cache).
CPU_TARGET_ROWS = 1024
CPU_FFN_CHUNK = 2048
# GPU: 32 k rows per product (batch 128 at the production shape) ran 10 % faster than 16 k on an H200
# (71.8 vs 65.1 nonces/s); the cap keeps stop latency near one batch (~2 s) and activations ~20 GB.
GPU_TARGET_ROWS = 32768
GPU_MEMORY_FRACTION = 0.6
GPU_RESERVE_BYTES = 1 << 30
# Flash attention wants head_dim % 8 == 0 (production: 28) and otherwise pads q, k, v on every call.
GPU_HEAD_MULTIPLE = 8
FP16_BYTES = 2


def batch_distances(logits: torch.Tensor, perms: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Spec 5.3-5.6 for a whole batch: permute fp32 logits, normalise in fp32, float64 distance to target."""
    permuted = torch.gather(logits, 1, perms)
    unit = permuted / permuted.norm(dim=1, keepdim=True)
    return (unit.double() - target).norm(dim=1)


def activation_bytes_per_nonce(params: PowParams) -> int:
    """A generous fp16 peak of one nonce's activations (FFN intermediates and attention dominate)."""
    s, d, h = params.seq_len, params.dim, params.ffn_hidden
    return int(1.25 * (s * (6 * h + 40 * d) + params.n_heads * s * s * 8))


def cpu_batch_size(params: PowParams) -> int:
    return max(1, min(64, CPU_TARGET_ROWS // params.seq_len))


def cuda_batch_size(params: PowParams, devices: Sequence[torch.device]) -> int:
    """Largest batch the block's scarcest free memory holds with a margin, capped where GEMMs saturate."""
    free = min(torch.cuda.mem_get_info(d)[0] for d in devices)
    usable = free * GPU_MEMORY_FRACTION - GPU_RESERVE_BYTES
    fits = int(usable // activation_bytes_per_nonce(params))
    cap = max(1, GPU_TARGET_ROWS // params.seq_len)
    if fits < 1:
        log.warning("pow_gpu_memory_tight", free_bytes=free, devices=[str(d) for d in devices])
    return max(1, min(cap, fits))


def plan_gpu_blocks(params: PowParams, free_bytes: Sequence[int]) -> list[list[int]]:
    """Group GPU indices into blocks of the fewest consecutive GPUs that hold the fp16 model.

    Each GPU of a block holds its share of the layers plus, while building, the fp16 pool and a reserve
    for a small batch. Raises Unavailable when even all GPUs together cannot hold it.
    """
    weights = params.non_embedding_params * FP16_BYTES
    pool = params.pool_size * FP16_BYTES
    reserve = GPU_RESERVE_BYTES + 4 * activation_bytes_per_nonce(params)
    n = len(free_bytes)
    for k in range(1, min(n, params.n_layers) + 1):
        need = -(-weights // k) + pool + reserve
        blocks = [list(range(b * k, b * k + k)) for b in range(n // k)]
        usable = [blk for blk in blocks if all(free_bytes[i] >= need for i in blk)]
        if usable:
            return usable
    raise Unavailable(
        f"the PoC model needs {weights / 2**30:.1f} GiB but the {n} GPU(s) have "
        f"{sum(free_bytes) / 2**30:.1f} GiB free in total"
    )


class ComputeGroup:
    """One device, or one block of GPUs sharing a model: evaluates nonces for the loaded round."""

    def __init__(self, group_id: int, block_hash: str, model: PowModel, batch_size: int,
                 executor: ThreadPoolExecutor | None = None, prefetch_depth: int = 2) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.group_id = group_id
        self.block_hash = block_hash
        self.model = model
        self.batch_size = batch_size
        self.prefetch_depth = prefetch_depth
        self._pinned = model.input_device.type == "cuda"
        self._maker = InputMaker(block_hash, model.params, executor, pin=self._pinned)
        self._target = torch.from_numpy(target_vector(block_hash, model.params.vocab_size)).to(
            model.output_device
        )
        self._lock = threading.Lock()
        self._buffers: dict[int, BufferPool] = {}
        self._buffers_lock = threading.Lock()

    def _buffer_pool(self, capacity: int) -> BufferPool:
        with self._buffers_lock:
            if capacity not in self._buffers:
                self._buffers[capacity] = BufferPool(self._maker, capacity, self.prefetch_depth + 2)
            return self._buffers[capacity]

    @property
    def params(self) -> PowParams:
        return self.model.params

    @property
    def devices(self) -> list[str]:
        return [str(d) for d in self.model.devices]

    def _launch(self, batch: InputBatch, cancel: StopSignal | None) -> torch.Tensor:
        """Queue the forward pass and distances of a batch; returns the (maybe not yet ready) result."""
        x, perms = batch.filled()
        model = self.model
        x = x.to(model.input_device, non_blocking=True).to(model.dtype)
        perms = perms.to(model.output_device, non_blocking=True)
        stages = len(model.devices)
        if stages > 1 and x.shape[0] > 1:
            # Micro-batches let GPU i work on one while GPU i+1 works on the previous (kernels are async).
            logits = torch.cat([model.forward(part, cancel) for part in x.chunk(stages)])
        else:
            logits = model.forward(x, cancel)
        with torch.inference_mode():
            return batch_distances(logits, perms, self._target)

    def generate(self, public_key: str, nonces: Iterator[int], stop: StopSignal,
                 batch_size: int | None = None, cancel: StopSignal | None = None
                 ) -> Generator[tuple[list[int], np.ndarray], None, None]:
        """Evaluate ``nonces`` in order, yielding (nonces, float64 distances) per batch until ``stop``.

        Every computed nonce is yielded, valid or not. Stops within ~0.1 s of ``stop`` plus the batch in
        progress; ``cancel`` also abandons the batch in progress (raises
        :class:`~services.pow.cancel.Cancelled` at the next layer). The input thread ends when the
        iterator is closed or exhausted.
        """
        buffers = self._buffer_pool(batch_size or self.batch_size)
        prefetch = Prefetcher(buffers, public_key, nonces, self.prefetch_depth)
        # On a GPU the next batch is queued before the previous result is read back; a CPU computes
        # synchronously, where holding a result back would only add latency.
        lag = self._pinned
        pending: tuple[InputBatch, torch.Tensor] | None = None
        try:
            while not stop.is_set():
                batch = prefetch.get(stop)
                if batch is None:
                    break
                with self._lock:
                    result = self._launch(batch, cancel)
                if pending is not None:
                    done, pending = pending, None
                    yield self._collect(buffers, *done)
                pending = (batch, result)
                if not lag:
                    done, pending = pending, None
                    yield self._collect(buffers, *done)
            if pending is not None:
                done, pending = pending, None
                yield self._collect(buffers, *done)
        finally:
            prefetch.close()
            if pending is not None:
                buffers.forget(pending[0])

    @staticmethod
    def _collect(buffers: BufferPool, batch: InputBatch, result: torch.Tensor
                 ) -> tuple[list[int], np.ndarray]:
        dists = result.cpu().numpy()  # waits for the batch, so its host buffers are free again
        nonces = batch.nonces
        buffers.release(batch)
        return nonces, dists

    def distances(self, public_key: str, nonces: Sequence[int], cancel: StopSignal | None = None
                  ) -> np.ndarray:
        """Distances (float64) of ``nonces`` for ``public_key``, in the given order (``cancel``: as in
        :meth:`generate`)."""
        wanted = [int(n) for n in nonces]
        out = np.empty(len(wanted), dtype=np.float64)
        if not wanted:
            return out
        pos = 0
        never = threading.Event()
        for got, dists in self.generate(public_key, iter(wanted), never, cancel=cancel):
            out[pos : pos + len(got)] = dists
            pos += len(got)
        return out


def _resolve_devices(device: str) -> list[list[torch.device]] | None:
    """None for the CPU; else the CUDA devices to plan blocks over (one list)."""
    if device == "cpu":
        return None
    if device in ("auto", "cuda"):
        if not torch.cuda.is_available():
            if device == "cuda":
                raise ConfigError("device=cuda but no CUDA GPU is visible")
            return None
        return [[torch.device("cuda", i) for i in range(torch.cuda.device_count())]]
    try:
        chosen = [torch.device(part.strip()) for part in device.split(",")]
    except RuntimeError as exc:
        raise ConfigError(f"device {device!r} is not 'auto', 'cpu', 'cuda' or a list of cuda:N") from exc
    if any(d.type != "cuda" or d.index is None for d in chosen):
        raise ConfigError(f"device {device!r} is not 'auto', 'cpu', 'cuda' or a list of cuda:N")
    return [chosen]


def input_threads() -> int:
    """Threads for drawing nonce inputs on a GPU host: every core but two (launcher and slack)."""
    return max(1, (os.cpu_count() or 4) - 2)


_executor_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def shared_input_executor() -> ThreadPoolExecutor:
    """One input thread pool per process, shared by all GPU groups and reused across rounds."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=input_threads(), thread_name_prefix="pow-input")
        return _executor


def discover_groups(block_hash: str, params: PowParams, device: str = "auto", *,
                    batch_size: int | None = None, fused: bool = True, head_multiple: int = GPU_HEAD_MULTIPLE,
                    cancel: StopSignal | None = None) -> list[ComputeGroup]:
    """Build the round's model on every compute group of this host and return the groups.

    ``auto``: every visible CUDA GPU (blocks of several when one cannot hold the model), else the CPU.
    The weight pool is drawn once and shared by all groups. ``fused`` allows the Triton element-wise
    kernels on CUDA (used only if they load and pass their self-check); ``head_multiple`` pads CUDA
    attention heads to that many features (1: no padding). ``cancel`` abandons the build between pool
    chunks and layers (raises :class:`~services.pow.cancel.Cancelled`).
    """
    started = time.perf_counter()
    resolved = _resolve_devices(device)
    if resolved is None:
        pool = generate_pool(block_hash, params.pool_size, cancel=cancel)
        model = build_model(pool, block_hash, params, [torch.device("cpu")], torch.float32, CPU_FFN_CHUNK,
                            cancel=cancel)
        del pool
        group = ComputeGroup(0, block_hash, model, batch_size or cpu_batch_size(params))
        log.info("pow_groups_ready", groups=1, devices=["cpu"], batch_size=group.batch_size,
                 seconds=round(time.perf_counter() - started, 2))
        return [group]
    cuda = resolved[0]
    free = [torch.cuda.mem_get_info(d)[0] for d in cuda]
    blocks = plan_gpu_blocks(params, free)
    pool = generate_pool(block_hash, params.pool_size, pin=True, cancel=cancel)
    pool_seconds = time.perf_counter() - started
    executor = shared_input_executor()
    groups = []
    for group_id, block in enumerate(blocks):
        devices = [cuda[i] for i in block]
        ops = load_fused_ops(params, devices[0], torch.float16) if fused else None
        device_pool = pool.to(devices[0])
        model = build_model(device_pool, block_hash, params, devices, torch.float16, ops=ops,
                            head_multiple=head_multiple, cancel=cancel)
        del device_pool
        for d in devices:
            torch.cuda.synchronize(d)
        torch.cuda.empty_cache()
        size = batch_size or cuda_batch_size(params, devices)
        groups.append(ComputeGroup(group_id, block_hash, model, size, executor))
    del pool
    log.info("pow_groups_ready", groups=len(groups), devices=[g.devices for g in groups],
             batch_size=groups[0].batch_size, pool_seconds=round(pool_seconds, 2),
             seconds=round(time.perf_counter() - started, 2))
    return groups
