"""Checkpoints: atomic files, newest topk kept, and a resume that continues the run exactly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from node.errors import InvalidRequest
from services.train.checkpoint import (
    checkpoint_due,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resume,
    save_checkpoint,
)
from services.train.config import CheckpointConfig, DiLoCoConfig, ModelConfig, OptimConfig, TrainPlan
from services.train.corpus import builtin_documents
from services.train.data import encode_documents
from services.train.diloco import DiLoCoWorker, solo_reduce

TOKENS = encode_documents(builtin_documents())


def _plan(tmp_path: Path, **ckpt: object) -> TrainPlan:
    plan = TrainPlan(
        model=ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, seed=2),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, total_steps=10, batch_size=4, micro_bs=2),
        diloco=DiLoCoConfig(inner_steps=4),
        ckpt=CheckpointConfig(path=str(tmp_path / "ckpt"), **ckpt),  # type: ignore[arg-type]
    )
    return dataclasses.replace(plan, data=dataclasses.replace(plan.data, seq_length=32))


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(worker: DiLoCoWorker, until: int) -> list[float]:
    """Drive the worker like the service does, up to ``until`` inner steps (or the end)."""
    losses = []
    while not worker.finished and worker.inner_steps_done < until:
        if worker.outer_due:
            worker.outer_step(solo_reduce)
        else:
            losses.append(worker.inner_step())
    if worker.outer_due and worker.inner_steps_done >= worker.plan.optim.total_steps:
        worker.outer_step(solo_reduce)
    return losses


def test_resume_mid_round_continues_exactly(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    straight = DiLoCoWorker(plan, tokens=TOKENS)
    straight_losses = _train(straight, 10)
    assert straight.finished and straight.outer_steps_done == 3

    first = DiLoCoWorker(plan, tokens=TOKENS)
    losses = _train(first, 6)  # one outer step done, two inner steps into the second round
    rng_at_save = torch.get_rng_state()
    path = save_checkpoint(first)
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint must restore it

    second = DiLoCoWorker(plan, tokens=TOKENS)
    assert resume(second) == path
    assert (second.inner_steps_done, second.outer_steps_done) == (6, 1)
    assert torch.equal(torch.get_rng_state(), rng_at_save)
    losses += _train(second, 10)
    assert losses == straight_losses
    for a, b in zip(second.global_weights(), straight.global_weights(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(second.params, straight.params, strict=True):
        assert torch.equal(a, b)
    assert second.progress() == straight.progress()


def test_resume_restores_inner_and_outer_optimizer_state(tmp_path: Path) -> None:
    worker = DiLoCoWorker(_plan(tmp_path), tokens=TOKENS)
    _train(worker, 5)
    path = save_checkpoint(worker)
    state = load_checkpoint(path)
    other = DiLoCoWorker(_plan(tmp_path), tokens=TOKENS)
    other.load_state_dict(state)
    for outer, other_outer in zip(worker.outer_params, other.outer_params, strict=True):
        buf = worker.outer_opt.state[outer]["momentum_buffer"]
        assert torch.equal(buf, other.outer_opt.state[other_outer]["momentum_buffer"])
    for p, q in zip(worker.params, other.params, strict=True):
        assert torch.equal(worker.inner_opt.state[p]["exp_avg_sq"], other.inner_opt.state[q]["exp_avg_sq"])
    assert other.samples.position == worker.samples.position == 5 * 4


def test_topk_newest_are_kept_and_no_temporary_files_remain(tmp_path: Path) -> None:
    worker = DiLoCoWorker(_plan(tmp_path, topk=2), tokens=TOKENS)
    for _ in range(4):
        worker.inner_step()
        save_checkpoint(worker)
    names = [p.name for p in list_checkpoints(tmp_path / "ckpt")]
    assert names == ["step-000000003.pt", "step-000000004.pt"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == names
    assert latest_checkpoint(tmp_path / "ckpt") == tmp_path / "ckpt" / "step-000000004.pt"


def test_stray_temporary_files_are_never_mistaken_for_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / ".step-000000009.pt.tmp-77").write_bytes(b"half written")
    assert latest_checkpoint(root) is None
    worker = DiLoCoWorker(_plan(tmp_path), tokens=TOKENS)
    assert resume(worker) is None and worker.inner_steps_done == 0


def test_a_checkpoint_for_another_run_shape_is_refused(tmp_path: Path) -> None:
    worker = DiLoCoWorker(_plan(tmp_path), tokens=TOKENS)
    worker.inner_step()
    path = save_checkpoint(worker)
    plan = _plan(tmp_path)
    other_world = DiLoCoWorker(plan.with_rank(0, 2), tokens=TOKENS)
    with pytest.raises(InvalidRequest, match=r"train_env\.GLOBAL_WORLD_SIZE differs"):
        resume(other_world, path)
    bigger = DiLoCoWorker(
        dataclasses.replace(plan, optim=dataclasses.replace(plan.optim, micro_bs=1)), tokens=TOKENS
    )
    with pytest.raises(InvalidRequest, match=r"train_config\.train\.micro_bs differs"):
        resume(bigger, path)


def test_a_corrupt_checkpoint_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "step-000000001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidRequest, match="is unreadable"):
        load_checkpoint(bad)
    with pytest.raises(InvalidRequest, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_due_follows_the_interval(tmp_path: Path) -> None:
    worker = DiLoCoWorker(_plan(tmp_path, interval=3), tokens=TOKENS)
    due = []
    for _ in range(4):
        due.append(checkpoint_due(worker))
        worker.inner_step()
    assert due == [False, False, False, True]
    assert not checkpoint_due(DiLoCoWorker(_plan(tmp_path), tokens=TOKENS))
