"""ComputeGroup: batched distances, the pipelined generate loop, stopping, and GPU block planning."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from functools import cache

import numpy as np
import pytest
import torch

from node.errors import ConfigError, Unavailable
from services.pow import compute
from services.pow.compute import (
    ComputeGroup,
    batch_distances,
    cpu_batch_size,
    discover_groups,
    nonce_sequence,
    plan_gpu_blocks,
)
from services.pow.params import PowParams
from services.pow.rng import nonce_permutation, target_vector

SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=256, ffn_dim_multiplier=1.0,
             multiple_of=64, norm_eps=1e-5, rope_theta=10000, use_scaled_rope=False, seq_len=8)
PRODUCTION = dict(dim=1792, n_layers=64, n_heads=64, n_kv_heads=64, vocab_size=8196, ffn_dim_multiplier=10,
                  multiple_of=8192, norm_eps=1e-5, rope_theta=10000, use_scaled_rope=False, seq_len=256)
GIB = 2**30


@cache
def _group() -> ComputeGroup:
    return discover_groups("0xfeed", PowParams.from_dict(SHAPE), "cpu", batch_size=5)[0]


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pow-prefetch" and t.is_alive()]


def test_batch_distances_follow_the_spec_step_by_step() -> None:
    vocab = 300
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn((3, vocab), generator=gen)
    perms = torch.stack([torch.from_numpy(nonce_permutation("bh", "pk", n, vocab)) for n in range(3)])
    target = target_vector("bh", vocab)
    got = batch_distances(logits, perms, torch.from_numpy(target)).numpy()
    for row in range(3):
        o = logits[row].numpy()[perms[row].numpy()]
        o = o / np.linalg.norm(o)
        assert got[row] == pytest.approx(np.linalg.norm(o.astype(np.float64) - target), abs=1e-6)


def test_generate_yields_every_nonce_in_order_with_its_distance() -> None:
    group = _group()
    wanted = list(range(100, 123))  # 4 full batches of 5 and a partial one
    batches = list(group.generate("pk", iter(wanted), threading.Event()))
    assert [len(n) for n, _ in batches] == [5, 5, 5, 5, 3]
    assert [n for ns, _ in batches for n in ns] == wanted
    dists = np.concatenate([d for _, d in batches])
    assert dists.dtype == np.float64
    assert np.array_equal(dists, group.distances("pk", wanted))
    assert np.all((dists > 0.5) & (dists < 2.0))
    assert not _prefetch_threads()


def test_distances_do_not_depend_on_batching_or_order() -> None:
    group = _group()
    forward = group.distances("pk", [7, 8, 9, 10, 11, 12])
    backward = group.distances("pk", [12, 11, 10, 9, 8, 7])
    assert np.allclose(forward, backward[::-1], rtol=0, atol=1e-6)
    assert group.distances("pk", []).shape == (0,)
    assert not np.allclose(group.distances("other-key", [7]), forward[:1])


@pytest.mark.timeout(60)
def test_stop_ends_an_endless_generate_promptly() -> None:
    group = _group()
    stop = threading.Event()
    pulled = itertools.count()

    def nonces() -> Iterator[int]:
        for n in nonce_sequence(0, 1, 0, 1):
            next(pulled)
            yield n

    seen: list[int] = []
    after_stop = 0
    for batch, _ in group.generate("pk", nonces(), stop):
        seen.extend(batch)
        after_stop += stop.is_set()
        if len(seen) >= 2 * group.batch_size:
            stop.set()  # mid-run, with batches in flight
    assert seen and seen == list(range(len(seen)))
    # The stop ends the endless run (the test's timeout guards that); at most what was in flight follows.
    assert after_stop <= group.prefetch_depth + 1, after_stop
    # Inputs are drawn once each and only a bounded distance ahead of the forward pass.
    assert next(pulled) <= len(seen) + (group.prefetch_depth + 3) * group.batch_size
    assert not _prefetch_threads()


def test_a_stop_set_beforehand_computes_nothing() -> None:
    stop = threading.Event()
    stop.set()
    assert list(_group().generate("pk", nonce_sequence(0, 1, 0, 1), stop)) == []
    assert not _prefetch_threads()


def test_abandoning_the_generator_ends_its_input_thread() -> None:
    stream = _group().generate("pk", nonce_sequence(0, 1, 0, 1), threading.Event())
    next(stream)
    stream.close()
    assert not _prefetch_threads()


def test_a_failing_nonce_iterator_surfaces_in_the_caller() -> None:
    def broken() -> Iterator[int]:
        yield 1
        raise RuntimeError("nonce source broke")

    with pytest.raises(RuntimeError, match="nonce source broke"):
        list(_group().generate("pk", broken(), threading.Event()))
    assert not _prefetch_threads()


def test_plan_gpu_blocks_one_gpu_each_when_the_model_fits() -> None:
    params = PowParams.from_dict(PRODUCTION)
    assert plan_gpu_blocks(params, [79 * GIB] * 8) == [[i] for i in range(8)]


def test_plan_gpu_blocks_groups_small_gpus_and_skips_the_leftover() -> None:
    params = PowParams.from_dict(PRODUCTION)  # 33 GiB of fp16 weights
    assert plan_gpu_blocks(params, [23 * GIB] * 5) == [[0, 1], [2, 3]]
    assert plan_gpu_blocks(params, [12 * GIB] * 4) == [[0, 1, 2, 3]]


def test_plan_gpu_blocks_refuses_when_nothing_can_hold_the_model() -> None:
    params = PowParams.from_dict(PRODUCTION)
    with pytest.raises(Unavailable, match=r"needs 33\.1 GiB"):
        plan_gpu_blocks(params, [4 * GIB] * 4)


def test_cpu_batch_size_targets_rows_per_product() -> None:
    assert cpu_batch_size(PowParams.from_dict({**SHAPE, "seq_len": 16})) == compute.CPU_TARGET_ROWS // 16
    assert cpu_batch_size(PowParams.from_dict(PRODUCTION)) == compute.CPU_TARGET_ROWS // 256
    assert cpu_batch_size(PowParams.from_dict({**SHAPE, "seq_len": 1})) == 64


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cpu,cuda:0"])
def test_unknown_devices_are_a_config_error(device: str) -> None:
    with pytest.raises(ConfigError):
        discover_groups("0x00", PowParams.from_dict(SHAPE), device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_cuda_without_a_gpu_is_a_config_error_and_auto_falls_back_to_cpu() -> None:
    params = PowParams.from_dict(SHAPE)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        discover_groups("0x00", params, "cuda")
    groups = discover_groups("0x00", params, "auto")
    assert [g.devices for g in groups] == [["cpu"]]
