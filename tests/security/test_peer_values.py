"""A registered training peer that sends NaN/inf: never averaged in, dropped, and the honest ranks agree.

The attacker is a real rank of the group (its own event loop, CURVE key and peer links, registered with
everyone) that runs the real protocol but poisons what it sends: its contributions to the shards others
reduce (``rs``), or the means it gathers back for the shard it owns (``ag``). The honest ranks must end
with the same bits, finite, equal to the mean of the honest ranks' data alone, and must have dropped it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from contracts.collective import Chunk
from services.train.collective.group import Reduced
from services.train.compression import Codec, compressed_mean
from services.train.config import DiLoCoConfig, ModelConfig, OptimConfig, TrainPlan
from services.train.diloco import DiLoCoWorker
from services.train.runner import FINISHED, Runner, weights_digest
from tests.support.peer_ranks import Rank, bits, dropped_keys, make_ranks, poisoned, rewrite_sends
from tests.support.tensors import example_pseudo_gradients

pytestmark = pytest.mark.timeout(60)
SHAPES = [(37, 129), (5000,), (3, 3, 3)]


def payloads(world: int, seed: int = 0) -> dict[int, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {r: [torch.randn(shape, generator=gen) for shape in SHAPES] for r in range(world)}


def poison_chunks(rank: Rank, phase: str) -> None:
    """``rank`` sends every chunk of ``phase`` with a NaN in front (a NaN value, or a NaN int8 scale)."""

    def rewrite(message: Any, payload: Any) -> tuple[Any, Any]:
        if isinstance(message, Chunk) and message.phase == phase and len(payload or b"") >= 4:
            return message, poisoned(payload)
        return message, payload

    rewrite_sends(rank, rewrite)


def assert_honest_agree(
    results: list[Reduced], data: dict[int, list[torch.Tensor]], honest: tuple[int, ...], compression: str
) -> None:
    expected = compressed_mean({r: data[r] for r in honest}, Codec(compression))
    for result in results:
        assert result.ranks == honest
        assert all(bool(torch.isfinite(t).all()) for t in result.tensors)
        assert bits(result.tensors) == bits(expected)


@pytest.mark.parametrize("compression", ["none", "int8"])
@pytest.mark.parametrize(("phase", "attacker"), [("rs", 2), ("ag", 2), ("rs", 0)],
                         ids=["contributions", "gathered-means", "contributions-from-the-coordinator"])
def test_a_peer_sending_nan_is_dropped_and_never_averaged_in(
    phase: str, attacker: int, compression: str
) -> None:
    ranks = make_ranks(3, timeout=0.5, compression=compression)
    try:
        liar = ranks[attacker]
        honest = [rank for rank in ranks if rank is not liar]
        alive = tuple(rank.rank for rank in honest)
        poison_chunks(liar, phase)
        for step in range(2):  # the step it poisons, and the next one, which it is no longer part of
            data = payloads(3, seed=step)
            joining = [rank for rank in ranks if step == 0 or rank is not liar]
            futures = {rank.rank: rank.reduce(step, data[rank.rank]) for rank in joining}
            results = [futures[r].result(30) for r in alive]
            assert_honest_agree(results, data, alive, compression)
            # Whoever received poison dropped its sender (and nobody else); a rank that moved on to the
            # ballot without it first may never have looked at its chunks.
            dropped = [dropped_keys(rank) for rank in honest]
            assert any("NaN" in d.get(liar.keys.public, "") for d in dropped), dropped
            assert all(set(d) <= {liar.keys.public} for d in dropped), dropped
    finally:
        for rank in ranks:
            rank.close()


def honest_reference(plan: TrainPlan, world: int, honest: tuple[int, ...], rounds: int) -> list[torch.Tensor]:
    """The global weights of a run in which only ``honest`` ranks (of ``world``) ever contributed."""
    workers = [DiLoCoWorker(plan.with_rank(r, world)) for r in honest]
    codec = Codec(plan.diloco.compression)
    for _ in range(rounds):
        for worker in workers:
            worker.run_inner()
        averaged = compressed_mean({w.plan.env.rank: w.pseudo_gradients() for w in workers}, codec)
        for worker in workers:
            worker.apply_outer(averaged, honest)
    return workers[0].global_weights()


PLAN = TrainPlan(
    model=ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, seed=7),
    optim=OptimConfig(lr=3e-3, warmup_steps=2, total_steps=6, batch_size=4, micro_bs=2),
    diloco=DiLoCoConfig(inner_steps=3),
)
PLAN = dataclasses.replace(PLAN, data=dataclasses.replace(PLAN.data, seq_length=32))


def test_diloco_runs_with_a_poisoning_peer_end_identical_to_a_run_without_it(tmp_path: Any) -> None:
    """Three honest train runs (the production run thread) and a fourth registered rank that poisons its
    pseudo-gradient: the honest weights are bit-identical, finite, and those of a run without it."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    ranks = make_ranks(4, timeout=0.5)
    try:
        liar = ranks[3]
        poison_chunks(liar, "rs")
        grads = example_pseudo_gradients(PLAN.model, seed=1)
        liar.reduce(0, grads)  # it joins step 0 like any rank, with data that looks right until decoded
        runners = []
        for rank in ranks[:3]:
            plan = PLAN.with_rank(rank.rank, 4)
            ckpt = dataclasses.replace(plan.ckpt, path=str(tmp_path / f"ckpt-{rank.rank}"), interval=None)
            plan = dataclasses.replace(plan, ckpt=ckpt)
            runner = Runner(plan, loop=rank.loop, group=rank.group, resume=False, on_change=lambda: None)
            runners.append(runner)
        for runner in runners:
            runner.start()
        for runner in runners:
            runner.join(45)
        assert [r.state for r in runners] == [FINISHED] * 3, [r.error for r in runners]
        expected = weights_digest(honest_reference(PLAN, 4, (0, 1, 2), 2))
        statuses = [runner.status() for runner in runners]
        for status in statuses:
            assert status["outer_step"] == 2 and status["contributors"] == [0, 1, 2]
            assert status["weights_digest"] == expected
        dropped = [[d["rank"] for d in status["peers_dropped"]] for status in statuses]
        assert [3] in dropped and all(d in ([], [3]) for d in dropped), dropped  # by whoever got poison
    finally:
        torch.set_num_threads(threads_before)
        for rank in ranks:
            rank.close()
