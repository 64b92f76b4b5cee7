"""Host-side input batches: buffers are filled in place and reused, never handed out twice."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from services.pow.inputs import BufferPool, InputMaker, Prefetcher
from services.pow.params import PowParams
from services.pow.rng import nonce_input, nonce_permutation

SHAPE = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=50, ffn_dim_multiplier=1.0,
             multiple_of=32, norm_eps=1e-5, rope_theta=10000, use_scaled_rope=False, seq_len=4)


def test_fill_matches_the_single_nonce_functions_with_and_without_threads() -> None:
    params = PowParams.from_dict(SHAPE)
    with ThreadPoolExecutor(3) as pool:
        for executor in (None, pool):
            maker = InputMaker("bh", params, executor)
            batch = maker.fill(maker.new_batch(6), "pk", [5, 9, 11])
            x, perms = batch.filled()
            assert x.shape == (3, 4, 32) and perms.shape == (3, 50)
            for i, nonce in enumerate([5, 9, 11]):
                assert np.array_equal(x[i].numpy(), nonce_input("bh", "pk", nonce, 4, 32))
                assert np.array_equal(perms[i].numpy(), nonce_permutation("bh", "pk", nonce, 50))
            with pytest.raises(ValueError):
                maker.fill(batch, "pk", list(range(7)))


def test_buffer_pool_bounds_allocation_and_reuses() -> None:
    maker = InputMaker("bh", PowParams.from_dict(SHAPE))
    pool = BufferPool(maker, capacity=2, count=2)
    a, b = pool.acquire(0.01), pool.acquire(0.01)
    assert a is not None and b is not None and a is not b
    assert pool.acquire(0.01) is None
    pool.release(a)
    assert pool.acquire(0.01) is a
    pool.forget(b)
    fresh = pool.acquire(0.01)
    assert fresh is not None and fresh is not b


@pytest.mark.timeout(30)
def test_prefetcher_delivers_batches_in_order_then_none() -> None:
    maker = InputMaker("bh", PowParams.from_dict(SHAPE))
    buffers = BufferPool(maker, capacity=4, count=3)
    prefetch = Prefetcher(buffers, "pk", iter(range(10)), depth=1)
    got = []
    while (batch := prefetch.get(threading.Event())) is not None:
        got.append(list(batch.nonces))
        buffers.release(batch)
    prefetch.close()
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
