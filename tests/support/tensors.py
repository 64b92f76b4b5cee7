"""Tensors the training tests exchange: random pseudo-gradients shaped like a model's parameters."""

from __future__ import annotations

import torch
from torch import Tensor

from services.train.config import ModelConfig
from services.train.model import parameter_shapes


def example_pseudo_gradients(cfg: ModelConfig, *, seed: int = 0, scale: float = 1e-3) -> list[Tensor]:
    """Random float32 tensors shaped like a model's pseudo-gradients (deterministic per seed)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * scale for _, shape in parameter_shapes(cfg)]
