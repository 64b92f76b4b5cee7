"""The DiLoCo worker: fixed-order averaging, the outer Nesterov step, phases, and rejoin state."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from contracts.collective import TensorSpec
from node.errors import InvalidRequest, ProtocolError
from services.train.collective.tensors import spec_of
from services.train.config import DiLoCoConfig, ModelConfig, OptimConfig, TrainPlan
from services.train.corpus import builtin_documents
from services.train.data import encode_documents
from services.train.diloco import (
    Contributors,
    DiLoCoWorker,
    SyncState,
    fixed_order_mean,
    solo_reduce,
)
from services.train.model import parameter_shapes
from tests.support.tensors import example_pseudo_gradients

TOKENS = encode_documents(builtin_documents())
PLAN = TrainPlan(
    model=ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, seed=1),
    optim=OptimConfig(lr=3e-3, warmup_steps=2, total_steps=20, batch_size=8, micro_bs=4),
    diloco=DiLoCoConfig(inner_steps=4),
)
PLAN = dataclasses.replace(PLAN, data=dataclasses.replace(PLAN.data, seq_length=32))


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _worker(plan: TrainPlan = PLAN) -> DiLoCoWorker:
    return DiLoCoWorker(plan, tokens=TOKENS)


# -- fixed_order_mean ---------------------------------------------------------------------------


def test_mean_sums_in_rank_order_whatever_the_arrival_order() -> None:
    # float32 addition is order-sensitive here: (big - big) + 1 == 1 but (1 - big) + big == 0.
    big = torch.tensor([1e8], dtype=torch.float32)
    one = torch.tensor([1.0], dtype=torch.float32)
    by_rank = {0: [big], 1: [-big], 2: [one]}
    expected = ((torch.zeros(1) + big) + -big + one) / 3
    assert expected.item() == pytest.approx(1 / 3)
    assert ((one + -big) + big).item() == 0.0
    for order in ([0, 1, 2], [2, 1, 0], [2, 0, 1], [1, 2, 0]):
        result = fixed_order_mean({r: by_rank[r] for r in order})
        assert torch.equal(result[0], expected)


def test_mean_is_float32_and_elementwise() -> None:
    a = [torch.tensor([1.0, 2.0], dtype=torch.bfloat16), torch.ones(2, 2)]
    b = [torch.tensor([3.0, 5.0], dtype=torch.bfloat16), torch.zeros(2, 2)]
    mean = fixed_order_mean({4: a, 9: b})
    assert mean[0].dtype == torch.float32
    assert mean[0].tolist() == [2.0, 3.5] and torch.equal(mean[1], torch.full((2, 2), 0.5))


def test_mean_refuses_mismatched_contributions() -> None:
    with pytest.raises(ProtocolError, match="from rank 1 has shape"):
        fixed_order_mean({0: [torch.zeros(2)], 1: [torch.zeros(3)]})
    with pytest.raises(ProtocolError, match="rank 1 sent 2 pseudo-gradients"):
        fixed_order_mean({0: [torch.zeros(2)], 1: [torch.zeros(2), torch.zeros(2)]})
    with pytest.raises(InvalidRequest, match="no rank contributed"):
        fixed_order_mean({})


# -- the worker ---------------------------------------------------------------------------------


def test_outer_step_is_nesterov_sgd_on_the_pre_inner_weights() -> None:
    worker = _worker()
    start = worker.global_weights()
    worker.run_inner()
    pseudo = worker.pseudo_gradients()
    inner = [p.detach().clone() for p in worker.params]
    assert all(torch.equal(g, s - i) for g, s, i in zip(pseudo, start, inner, strict=True))
    seen: list[Contributors] = []

    def reduce(grads: list[torch.Tensor], contributors: Contributors) -> list[torch.Tensor]:
        seen.append(contributors)
        return solo_reduce(grads, contributors)

    worker.outer_step(reduce)
    assert seen[0].outer_step == 0 and seen[0].rank == 0 and seen[0].world_size == 1
    for new, old, g, p in zip(worker.global_weights(), start, pseudo, worker.params, strict=True):
        # First momentum step: buffer = g, update = lr * (g + momentum * g).
        assert torch.allclose(new, old - 0.7 * (g + 0.9 * g), atol=1e-7)
        assert torch.equal(p, new)  # the model restarts from the new global weights
    assert worker.progress().contributors == [0]


def test_loss_goes_down_over_a_few_outer_steps() -> None:
    worker = _worker(dataclasses.replace(PLAN, optim=dataclasses.replace(PLAN.optim, total_steps=24)))
    first = worker.inner_step()
    while not worker.finished:
        worker.run_round(solo_reduce)
    assert worker.outer_steps_done == 6
    assert worker.loss_ema is not None and worker.loss_ema < first - 1.0


def test_phases_are_enforced() -> None:
    worker = _worker()
    with pytest.raises(InvalidRequest, match="no outer step due"):
        worker.outer_step(solo_reduce)
    worker.run_inner()
    assert worker.outer_due and worker.steps_in_round == 4
    with pytest.raises(InvalidRequest, match="outer step 0 is due"):
        worker.inner_step()


def test_the_last_round_may_be_short() -> None:
    plan = dataclasses.replace(PLAN, optim=dataclasses.replace(PLAN.optim, total_steps=6))
    worker = _worker(plan)
    assert plan.outer_rounds == 2
    assert worker.run_round(solo_reduce) and worker.run_inner() == 2
    assert worker.outer_due
    worker.outer_step(solo_reduce)
    assert worker.finished and worker.progress().finished
    with pytest.raises(InvalidRequest, match="training is finished"):
        worker.inner_step()


def test_run_inner_stops_when_asked_and_reports_progress() -> None:
    worker = _worker()
    reports: list[int] = []
    done = worker.run_inner(
        should_stop=lambda: len(reports) == 2, on_step=lambda p: reports.append(p.inner_step)
    )
    assert done == 2 and reports == [1, 2]
    progress = worker.progress().to_dict()
    assert progress["inner_step"] == 2 and progress["tokens_seen"] == 2 * 8 * 32
    assert progress["loss_last"] is not None and progress["outer_rounds"] == 5


def test_a_reduce_returning_the_wrong_shapes_is_refused() -> None:
    worker = _worker()
    worker.run_inner()
    with pytest.raises(ProtocolError, match="averaged pseudo-gradient"):
        worker.outer_step(lambda grads, _c: grads[:-1])
    assert worker.outer_steps_done == 0 and worker.outer_due


def specs(state: SyncState) -> list[TensorSpec]:
    return [spec_of(name, tensor) for name, tensor in zip(state.names, state.tensors, strict=True)]


def test_rejoin_state_carries_weights_momentum_and_step() -> None:
    veteran = _worker()
    for _ in range(2):
        veteran.run_round(solo_reduce)
    veteran.inner_step()  # mid-round: the export still describes the round start
    state = veteran.export_sync_state()
    assert state.outer_step == 2 and state.inner_step == 8
    assert len(state.tensors) == 2 * len(veteran.params)
    assert specs(state) == veteran.sync_layouts()[1]  # weights and momentum

    newcomer = _worker()
    newcomer.load_sync_state(state)
    assert all(
        torch.equal(a, b) for a, b in zip(newcomer.global_weights(), veteran.global_weights(), strict=True)
    )
    assert all(torch.equal(p, o) for p, o in zip(newcomer.params, newcomer.outer_params, strict=True))
    assert (newcomer.outer_steps_done, newcomer.inner_steps_done) == (2, 8)
    assert newcomer.samples.position == 8 * 8

    # Same averaged gradient on both: the momentum carried over makes the outer steps agree.
    grads = example_pseudo_gradients(PLAN.model, seed=3)
    veteran.run_inner()
    newcomer.run_inner()
    veteran.apply_outer(grads, [0])
    newcomer.apply_outer(grads, [0])
    assert all(
        torch.equal(a, b) for a, b in zip(newcomer.global_weights(), veteran.global_weights(), strict=True)
    )


def test_rejoin_state_before_any_outer_step_has_no_momentum() -> None:
    state = _worker().export_sync_state()
    assert len(state.tensors) == len(_worker().params)
    assert specs(state) == _worker().sync_layouts()[0]  # the weights alone
    other = _worker()
    other.load_sync_state(state)
    assert other.outer_steps_done == 0


def test_rejoin_state_for_another_model_is_refused() -> None:
    state = _worker().export_sync_state()
    bigger = _worker(dataclasses.replace(PLAN, model=dataclasses.replace(PLAN.model, dim=64)))
    assert bigger.sync_layouts() != _worker().sync_layouts()  # a fetch refuses it before any allocation
    with pytest.raises(ProtocolError, match="sync state weight"):
        bigger.load_sync_state(state)
    with pytest.raises(ProtocolError, match="not this model's"):
        one = dataclasses.replace(state, names=state.names[:1], tensors=state.tensors[:1])
        _worker().load_sync_state(one)
    with pytest.raises(ProtocolError, match="steps are inconsistent"):
        _worker().load_sync_state(dataclasses.replace(state, inner_step=3))


def test_example_pseudo_gradients_match_the_model_shapes() -> None:
    cfg = ModelConfig(dim=128, n_layers=3, n_heads=4, n_kv_heads=4, ffn_hidden=256)
    grads = example_pseudo_gradients(cfg, seed=1)
    assert [tuple(g.shape) for g in grads] == [shape for _, shape in parameter_shapes(cfg)]
    assert all(g.dtype == torch.float32 for g in grads)
    assert torch.equal(grads[0], example_pseudo_gradients(cfg, seed=1)[0])
