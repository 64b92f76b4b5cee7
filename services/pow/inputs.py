"""Nonce inputs made ahead of the forward pass, on CPU threads, into reusable host buffers.

Drawing 459 k normals per nonce (production shape) is numpy work that would otherwise leave the GPU
idle; numpy releases the GIL while it fills arrays, so a thread pool scales with cores. Each nonce is
drawn exactly once, straight into its slot of a (pinned, on CUDA) batch buffer: no copies on the host.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from node.logging import get_logger
from services.pow.params import PowParams
from services.pow.rng import nonce_input, nonce_permutation

log = get_logger(__name__)

_POLL_S = 0.1


class StopSignal(Protocol):
    """Anything with ``is_set()``: a threading.Event or a combination of several."""

    def is_set(self) -> bool: ...


@dataclass
class InputBatch:
    """Host tensors for up to ``capacity`` nonces; only the first ``len(nonces)`` rows are filled."""

    nonces: list[int]
    x: torch.Tensor  # (capacity, seq_len, dim) float16
    perms: torch.Tensor  # (capacity, vocab_size) int64

    def filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.nonces)
        return self.x[:n], self.perms[:n]


class InputMaker:
    """Fills batch buffers for one (block_hash, params); ``executor`` spreads nonces over threads."""

    def __init__(self, block_hash: str, params: PowParams, executor: ThreadPoolExecutor | None = None,
                 pin: bool = False) -> None:
        self.block_hash = block_hash
        self.params = params
        self.executor = executor
        self.pin = pin

    def new_batch(self, capacity: int) -> InputBatch:
        p = self.params
        x = torch.empty((capacity, p.seq_len, p.dim), dtype=torch.float16, pin_memory=self.pin)
        perms = torch.empty((capacity, p.vocab_size), dtype=torch.int64, pin_memory=self.pin)
        return InputBatch([], x, perms)

    def _fill_one(self, public_key: str, nonce: int, x: np.ndarray, perm: np.ndarray) -> None:
        p = self.params
        nonce_input(self.block_hash, public_key, nonce, p.seq_len, p.dim, out=x)
        perm[:] = nonce_permutation(self.block_hash, public_key, nonce, p.vocab_size)

    def fill(self, batch: InputBatch, public_key: str, nonces: list[int]) -> InputBatch:
        if len(nonces) > batch.x.shape[0]:
            raise ValueError(f"{len(nonces)} nonces do not fit a batch of {batch.x.shape[0]}")
        batch.nonces = list(nonces)
        xs = batch.x.numpy()
        ps = batch.perms.numpy()
        if self.executor is None or len(nonces) == 1:
            for i, nonce in enumerate(nonces):
                self._fill_one(public_key, nonce, xs[i], ps[i])
        else:
            jobs = [self.executor.submit(self._fill_one, public_key, nonce, xs[i], ps[i])
                    for i, nonce in enumerate(nonces)]
            for job in jobs:
                job.result()
        return batch


class BufferPool:
    """At most ``count`` reusable batches of one capacity; pinned memory is too slow to allocate per round."""

    def __init__(self, maker: InputMaker, capacity: int, count: int) -> None:
        self.maker = maker
        self.capacity = capacity
        self._count = count
        self._allocated = 0
        self._free: list[InputBatch] = []
        self._cond = threading.Condition()

    def acquire(self, timeout: float) -> InputBatch | None:
        """A free batch, allocating while under ``count``; None if none frees up within ``timeout``."""
        with self._cond:
            if not self._free and self._allocated >= self._count:
                self._cond.wait(timeout)
            if self._free:
                return self._free.pop()
            if self._allocated >= self._count:
                return None
            self._allocated += 1
        return self.maker.new_batch(self.capacity)

    def release(self, batch: InputBatch) -> None:
        with self._cond:
            self._free.append(batch)
            self._cond.notify()

    def forget(self, batch: InputBatch) -> None:
        """Give up a batch whose device copy may still be running: it is never handed out again."""
        del batch
        with self._cond:
            self._allocated -= 1
            self._cond.notify()


class Prefetcher:
    """A background thread that turns a nonce iterator into filled batches, ``depth`` batches ahead.

    Consumers return each batch to ``buffers`` once its device copy is done. :meth:`close` stops the
    thread promptly and returns the batches it still holds.
    """

    def __init__(self, buffers: BufferPool, public_key: str, nonces: Iterator[int], depth: int = 2) -> None:
        self._buffers = buffers
        self._public_key = public_key
        self._nonces = nonces
        self._ready: queue.Queue[InputBatch | BaseException | None] = queue.Queue(maxsize=depth)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pow-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: InputBatch | BaseException | None) -> bool:
        while not self._closing.is_set():
            try:
                self._ready.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            while not self._closing.is_set():
                chunk = list(itertools.islice(self._nonces, self._buffers.capacity))
                if not chunk:
                    break
                batch = None
                while batch is None and not self._closing.is_set():
                    batch = self._buffers.acquire(timeout=_POLL_S)
                if batch is None:
                    return
                self._buffers.maker.fill(batch, self._public_key, chunk)
                if not self._put(batch):
                    self._buffers.release(batch)
                    return
            self._put(None)
        except BaseException as exc:  # handed to the consumer, which re-raises it in its own thread
            log.error("pow_prefetch_failed", error=repr(exc))
            self._put(exc)

    def get(self, stop: StopSignal | None = None) -> InputBatch | None:
        """The next batch, or None when the nonces ran out or ``stop`` was set (checked every 0.1 s)."""
        while stop is None or not stop.is_set():
            try:
                item = self._ready.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise item
            return item
        return None

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=10.0)
        if self._thread.is_alive():
            log.warning("pow_prefetch_still_running")
        while True:
            try:
                item = self._ready.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, InputBatch):
                self._buffers.release(item)
