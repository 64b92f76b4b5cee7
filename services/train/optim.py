"""The two optimizers of DiLoCo and the inner learning-rate schedule.

The schedule is a pure function of the inner step, so resuming needs only the step number (no
scheduler object to checkpoint) and every rank computes the same LR at the same step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from services.train.config import DiLoCoConfig, OptimConfig


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, sched_type: str) -> float:
    """Multiplier of the base LR for inner step ``step`` (0-based).

    Linear warmup reaches 1 at step ``warmup_steps - 1`` (the first step already moves the
    weights), then cosine/linear decay towards 0 at ``total_steps``; ``constant`` stays at 1.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if sched_type == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if sched_type == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if sched_type == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown schedule {sched_type!r}")


def inner_lr(cfg: OptimConfig, step: int) -> float:
    return cfg.lr * lr_factor(
        step, warmup_steps=cfg.warmup_steps, total_steps=cfg.total_steps, sched_type=cfg.sched_type
    )


def build_inner_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains and embeddings-as-vectors are exempt)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=inner_lr(cfg, 0),
        betas=(cfg.adam_betas1, cfg.adam_betas2),
    )


def build_outer_optimizer(params: Iterable[torch.Tensor], cfg: DiLoCoConfig) -> torch.optim.SGD:
    """SGD with (Nesterov) momentum over the global weights; the grad is the averaged pseudo-gradient."""
    return torch.optim.SGD(list(params), lr=cfg.outer_lr, momentum=cfg.outer_momentum, nesterov=cfg.nesterov)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
