"""The element-wise steps of the PoC block (RMSNorm, rotary, SiLU gate), eager torch versions.

They are few FLOPs but, at the production shape on a GPU, a fifth of the time: each eager op is a
full pass over memory. :mod:`services.pow.fused` offers single-pass kernels with the same interface
and the same rounding points; this module is the reference they are checked against at load time.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from services.pow.params import PowParams


class BlockOps(Protocol):
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def rotary_(self, qkv: torch.Tensor, n_cols: int, cos: torch.Tensor, sin: torch.Tensor
                ) -> torch.Tensor: ...

    def silu_mul(self, gate_up: torch.Tensor, width: int) -> torch.Tensor: ...


def rope_tables(params: PowParams, device: torch.device, model_dtype: torch.dtype,
                head_stride: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for every (position, q/k feature pair): shape (seq_len, heads * head_stride / 2), fp32.

    Values are rounded to the model dtype first (the reference keeps its table in that dtype), then
    tiled over the q and k heads so a kernel indexes them by pair without a modulo. Pairs in a head's
    zero padding (``head_stride`` > head_dim) get the identity rotation.
    """
    half = params.head_dim // 2
    stride_half = (head_stride or params.head_dim) // 2
    exponents = torch.arange(0, params.head_dim, 2)[:half].float() / params.head_dim
    freqs = 1.0 / (params.rope_theta**exponents)
    angles = torch.outer(torch.arange(params.seq_len, dtype=torch.float32), freqs)
    cos = torch.ones((params.seq_len, stride_half))
    sin = torch.zeros((params.seq_len, stride_half))
    cos[:, :half] = torch.cos(angles).to(model_dtype).float()
    sin[:, :half] = torch.sin(angles).to(model_dtype).float()
    heads = params.n_heads + params.n_kv_heads
    return cos.repeat(1, heads).to(device).contiguous(), sin.repeat(1, heads).to(device).contiguous()


class EagerOps:
    """Plain torch; works on every device and dtype."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``x * rsqrt(mean(x^2) + eps)`` in fp32, rounded to x's dtype, times the gain."""
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return normed.type_as(x) * weight

    def rotary_(self, qkv: torch.Tensor, n_cols: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate adjacent pairs of the first ``n_cols`` features of qkv (B, S, C) in place, in fp32."""
        part = qkv[..., :n_cols]
        pairs = part.float().unflatten(-1, (-1, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        part.copy_(rotated.flatten(-2))
        return qkv

    def silu_mul(self, gate_up: torch.Tensor, width: int) -> torch.Tensor:
        """``silu(gate) * up`` for gate_up = [gate | up] along the last dim (two roundings, like eager)."""
        gate, up = gate_up.split(width, dim=-1)
        return F.silu(gate).mul_(up)
