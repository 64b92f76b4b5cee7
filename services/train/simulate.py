"""A whole DiLoCo run in one process: the reference a networked run must match bit for bit.

Every rank is a real :class:`DiLoCoWorker`; the reduce is :func:`compressed_mean` over all ranks in
the plan's ``diloco.compression`` (:func:`fixed_order_mean` for ``none``), which is exactly what each
node computes once peer exchange delivers the same encoded tensors. A networked
run with the same plan, world size and thread count therefore ends with these weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from services.train.compression import Codec, compressed_mean
from services.train.config import TrainPlan
from services.train.data import load_tokens
from services.train.diloco import DiLoCoWorker


def _as_plan(plan_or_config: TrainPlan | Mapping[str, Any]) -> TrainPlan:
    if isinstance(plan_or_config, TrainPlan):
        return plan_or_config
    plan, _notes = TrainPlan.from_request(dict(plan_or_config))
    return plan


def simulate_workers(
    plan_or_config: TrainPlan | Mapping[str, Any],
    world_size: int,
    outer_steps: int,
    *,
    tokens: Tensor | None = None,
    device: torch.device | str = "cpu",
) -> list[DiLoCoWorker]:
    """Run ``outer_steps`` rounds (fewer if the plan's ``total_steps`` ends first); the workers by rank."""
    plan = _as_plan(plan_or_config)
    stream = tokens if tokens is not None else load_tokens(plan.data)
    workers = [
        DiLoCoWorker(plan.with_rank(r, world_size), tokens=stream, device=device) for r in range(world_size)
    ]
    codec = Codec(plan.diloco.compression)
    for _ in range(outer_steps):
        if workers[0].finished:
            break
        for worker in workers:
            worker.run_inner()
        averaged = compressed_mean({w.plan.env.rank: w.pseudo_gradients() for w in workers}, codec)
        for worker in workers:
            worker.apply_outer(averaged, range(world_size))
    return workers


def simulate(
    plan_or_config: TrainPlan | Mapping[str, Any],
    world_size: int,
    outer_steps: int,
    *,
    tokens: Tensor | None = None,
    device: torch.device | str = "cpu",
) -> list[Tensor]:
    """The global weights after the simulated run (the same on every rank), in parameter order."""
    workers = simulate_workers(plan_or_config, world_size, outer_steps, tokens=tokens, device=device)
    return workers[0].global_weights()
