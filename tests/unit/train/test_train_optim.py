"""The inner LR schedule's values and the optimizers DiLoCo builds."""

from __future__ import annotations

import math

import pytest
import torch

from services.train.config import DiLoCoConfig, ModelConfig, OptimConfig
from services.train.model import build_model
from services.train.optim import build_inner_optimizer, build_outer_optimizer, inner_lr, lr_factor


def _f(step: int, kind: str, warmup: int = 10, total: int = 110) -> float:
    return lr_factor(step, warmup_steps=warmup, total_steps=total, sched_type=kind)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_warmup_is_linear_and_the_first_step_already_moves(kind: str) -> None:
    assert [_f(s, kind) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert _f(10, kind) == 1.0


def test_cosine_decays_to_zero_through_one_half() -> None:
    assert _f(60, "cosine") == pytest.approx(0.5)
    assert _f(35, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert _f(110, "cosine") == pytest.approx(0.0)
    assert _f(500, "cosine") == pytest.approx(0.0)


def test_linear_and_constant() -> None:
    assert _f(60, "linear") == pytest.approx(0.5)
    assert _f(85, "linear") == pytest.approx(0.25)
    assert _f(109, "constant") == 1.0


def test_no_warmup_starts_at_full_lr() -> None:
    assert _f(0, "cosine", warmup=0, total=100) == 1.0
    assert _f(50, "cosine", warmup=0, total=100) == pytest.approx(0.5)


def test_unknown_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown schedule"):
        _f(20, "exp")


def test_inner_lr_scales_the_base_lr() -> None:
    cfg = OptimConfig(lr=2e-3, warmup_steps=4, total_steps=8, sched_type="linear")
    assert inner_lr(cfg, 0) == pytest.approx(5e-4)
    assert inner_lr(cfg, 6) == pytest.approx(1e-3)


def test_inner_adamw_decays_matrices_only() -> None:
    model = build_model(ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=32))
    opt = build_inner_optimizer(model, OptimConfig(weight_decay=0.1, adam_betas1=0.8, adam_betas2=0.9))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["betas"] == (0.8, 0.9)


def test_outer_sgd_is_nesterov_with_the_configured_momentum() -> None:
    weight = torch.zeros(3)
    opt = build_outer_optimizer([weight], DiLoCoConfig(outer_lr=0.7, outer_momentum=0.9))
    weight.grad = torch.ones(3)
    opt.step()
    # First step: buffer = g, update = g + 0.9 * buffer.
    assert torch.allclose(weight, torch.full((3,), -0.7 * 1.9))
    group = opt.param_groups[0]
    assert (group["nesterov"], group["momentum"], group["lr"]) == (True, 0.9, 0.7)
