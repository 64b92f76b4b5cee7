"""The one-process simulation, and a threaded run through outer_step(reduce) that must match it."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from services.train.compression import Codec, compressed_mean
from services.train.config import DiLoCoConfig, ModelConfig, OptimConfig, TrainPlan
from services.train.corpus import builtin_documents
from services.train.data import encode_documents
from services.train.diloco import Contributors, DiLoCoWorker
from services.train.simulate import simulate, simulate_workers

TOKENS = encode_documents(builtin_documents())
PLAN = TrainPlan(
    model=ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, seed=7),
    optim=OptimConfig(lr=3e-3, warmup_steps=2, total_steps=12, batch_size=4, micro_bs=2),
    diloco=DiLoCoConfig(inner_steps=3),
)
PLAN = dataclasses.replace(PLAN, data=dataclasses.replace(PLAN.data, seq_length=32))


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_world_three_ends_identical_on_every_rank() -> None:
    workers = simulate_workers(PLAN, 3, 3, tokens=TOKENS)
    reference = workers[0].global_weights()
    for worker in workers:
        assert worker.outer_steps_done == 3 and worker.inner_steps_done == 9
        assert _equal(worker.global_weights(), reference)
        assert _equal([p.detach() for p in worker.params], reference)
        assert worker.progress().contributors == [0, 1, 2]
    # The ranks trained on different shards: identical weights come from the averaging, not from luck.
    assert len({w.loss_last for w in workers}) == 3
    assert not _equal(reference, DiLoCoWorker(PLAN, tokens=TOKENS).global_weights())


def test_simulation_is_reproducible_and_stops_at_total_steps() -> None:
    first = simulate(PLAN, 2, 10, tokens=TOKENS)
    second = simulate(TrainPlan.from_dict(PLAN.to_dict()), 2, 10, tokens=TOKENS)
    assert _equal(first, second)
    workers = simulate_workers(PLAN, 2, 10, tokens=TOKENS)
    assert workers[0].finished and workers[0].outer_steps_done == 4  # 12 steps / H=3


def test_simulate_accepts_the_client_payload() -> None:
    body = {
        "train_config": {
            "optim": {"lr": 3e-3, "batch_size": 4, "total_steps": 4, "warmup_steps": 2},
            "train": {"micro_bs": 2},
            "data": {"seq_length": 32},
            "diloco": {"inner_steps": 2},
            "model": {"dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64, "seed": 7},
        }
    }
    weights = simulate(body, 2, 1, tokens=TOKENS)
    plan = dataclasses.replace(
        PLAN, optim=dataclasses.replace(PLAN.optim, total_steps=4), diloco=DiLoCoConfig(inner_steps=2)
    )
    assert _equal(weights, simulate(plan, 2, 1, tokens=TOKENS))


class _Exchange:
    """An in-memory stand-in for the peer links: every rank posts, waits for all, averages."""

    def __init__(self, world: int, compression: str = "none") -> None:
        self.codec = Codec(compression)
        self.barrier = threading.Barrier(world, timeout=30)
        self.posted: dict[int, dict[int, list[torch.Tensor]]] = {}
        self.lock = threading.Lock()

    def reduce(self, grads: list[torch.Tensor], contributors: Contributors) -> list[torch.Tensor]:
        with self.lock:
            self.posted.setdefault(contributors.outer_step, {})[contributors.rank] = [
                g.clone() for g in grads
            ]
        self.barrier.wait()
        by_rank = self.posted[contributors.outer_step]
        contributors.ranks = sorted(by_rank)
        return compressed_mean(dict(reversed(list(by_rank.items()))), self.codec)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("compression", ["none", "int8"])
def test_ranks_driven_through_outer_step_match_the_simulation_bit_for_bit(compression: str) -> None:
    world, rounds = 3, 3
    exchange = _Exchange(world, compression)
    plan = dataclasses.replace(PLAN, diloco=dataclasses.replace(PLAN.diloco, compression=compression))
    workers = [DiLoCoWorker(plan.with_rank(r, world), tokens=TOKENS) for r in range(world)]
    errors: list[BaseException] = []

    def run(worker: DiLoCoWorker) -> None:
        try:
            for _ in range(rounds):
                worker.run_round(exchange.reduce)
        except BaseException as exc:
            errors.append(exc)
            exchange.barrier.abort()

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=50)
    assert not errors and not any(t.is_alive() for t in threads)
    expected = simulate(plan, world, rounds, tokens=TOKENS)
    for worker in workers:
        assert _equal(worker.global_weights(), expected)
