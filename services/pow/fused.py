"""Single-pass Triton kernels for the element-wise steps of the block (GPU only, optional).

Eager torch spends ~10 bytes of memory traffic per FFN hidden value on ``silu(gate) * up`` and several
passes on RMSNorm and rotary; these kernels read and write each value once while keeping the eager
rounding points (fp32 math, round to the model dtype where the reference rounds). Triton is not a
dependency: :func:`load_fused_ops` returns None when it is missing or when its self-check against
:class:`~services.pow.ops.EagerOps` fails, and the model keeps the eager ops.
"""

from __future__ import annotations

import torch

from node.logging import get_logger
from services.pow.ops import EagerOps, rope_tables
from services.pow.params import PowParams

log = get_logger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is installed
    triton = None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, width, gu_stride, out_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        dtype = out_ptr.dtype.element_ty
        gate = tl.load(gu_ptr + row * gu_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * gu_stride + width + cols, mask=mask, other=0.0).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        tl.store(out_ptr + row * out_stride + cols, (silu * up).to(dtype), mask=mask)

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, dim, x_stride, out_stride, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < dim
        dtype = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        mean_sq = tl.sum(x * x, axis=0) / dim
        normed = (x * tl.rsqrt(mean_sq + eps)).to(dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * out_stride + cols, (normed * w).to(dtype), mask=mask)

    @triton.jit
    def _rotary_kernel(qkv_ptr, cos_ptr, sin_ptr, seq_len, n_pairs, row_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        pairs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = pairs < n_pairs
        dtype = qkv_ptr.dtype.element_ty
        pos = row % seq_len
        base = qkv_ptr + row * row_stride + 2 * pairs
        even = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        odd = tl.load(base + 1, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + pos * n_pairs + pairs, mask=mask, other=0.0)
        s = tl.load(sin_ptr + pos * n_pairs + pairs, mask=mask, other=0.0)
        tl.store(base, (even * c - odd * s).to(dtype), mask=mask)
        tl.store(base + 1, (even * s + odd * c).to(dtype), mask=mask)


class TritonOps:
    """The :class:`~services.pow.ops.BlockOps` interface as one kernel each; rows must be contiguous."""

    SILU_BLOCK = 1024
    ROTARY_BLOCK = 512

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        dim = x.shape[-1]
        rows = x.reshape(-1, dim)
        out = torch.empty_like(rows)
        if rows.shape[0]:
            _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, dim, rows.stride(0), out.stride(0), eps,
                                               BLOCK=_next_pow2(dim))
        return out.view(x.shape)

    def rotary_(self, qkv: torch.Tensor, n_cols: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if not qkv.is_contiguous():
            raise ValueError("rotary_ needs a contiguous (B, S, C) tensor")
        seq_len = qkv.shape[-2]
        rows = qkv.view(-1, qkv.shape[-1])
        n_pairs = n_cols // 2
        grid = (rows.shape[0], triton.cdiv(n_pairs, self.ROTARY_BLOCK))
        if rows.shape[0]:
            _rotary_kernel[grid](rows, cos, sin, seq_len, n_pairs, rows.stride(0), BLOCK=self.ROTARY_BLOCK)
        return qkv

    def silu_mul(self, gate_up: torch.Tensor, width: int) -> torch.Tensor:
        rows = gate_up.reshape(-1, gate_up.shape[-1])
        out = torch.empty((rows.shape[0], width), dtype=gate_up.dtype, device=gate_up.device)
        grid = (rows.shape[0], triton.cdiv(width, self.SILU_BLOCK))
        if rows.shape[0]:
            _silu_mul_kernel[grid](rows, out, width, rows.stride(0), out.stride(0), BLOCK=self.SILU_BLOCK)
        return out.view(*gate_up.shape[:-1], width)


def _close(name: str, got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to one rounding of the model dtype (fp32 op order may differ, nothing more)."""
    diff = (got.float() - want.float()).abs()
    scale = want.float().abs() + 1e-3
    worst = float((diff / scale).max())
    if worst > 2e-3:
        log.warning("pow_fused_op_mismatch", op=name, worst_relative=worst)
        return False
    return True


def self_check(ops: TritonOps, params: PowParams, device: torch.device, dtype: torch.dtype, rows: int = 2
               ) -> bool:
    """Run each kernel on random data of the model's widths and compare with the eager ops."""
    eager = EagerOps()
    gen = torch.Generator(device="cpu").manual_seed(0)
    seq, dim = params.seq_len, params.dim
    width = min(params.ffn_hidden, 4096)
    x = torch.randn((rows, seq, dim), generator=gen).to(device=device, dtype=dtype)
    w = (0.02 * torch.randn(dim, generator=gen)).to(device=device, dtype=dtype)
    qkv = torch.randn((rows, seq, dim + 2 * params.kv_dim), generator=gen).to(device=device, dtype=dtype)
    gate_up = torch.randn((rows, seq, 2 * width), generator=gen).to(device=device, dtype=dtype)
    cos, sin = rope_tables(params, device, dtype)
    n_cols = dim + params.kv_dim
    return (
        _close("rms_norm", ops.rms_norm(x, w, params.norm_eps), eager.rms_norm(x, w, params.norm_eps))
        and _close("rotary", ops.rotary_(qkv.clone(), n_cols, cos, sin),
                   eager.rotary_(qkv.clone(), n_cols, cos, sin))
        and _close("silu_mul", ops.silu_mul(gate_up, width), eager.silu_mul(gate_up, width))
    )


def load_fused_ops(params: PowParams, device: torch.device, dtype: torch.dtype) -> TritonOps | None:
    """Triton ops for ``device`` if Triton is installed and they agree with eager there, else None."""
    if triton is None:
        log.info("pow_fused_ops_unavailable", reason="triton is not installed")
        return None
    ops = TritonOps()
    try:
        ok = self_check(ops, params, device, dtype)
    except Exception as exc:  # a missing compiler or driver must not stop the node: eager still works
        log.warning("pow_fused_ops_failed", error=f"{type(exc).__name__}: {exc}"[:300])
        return None
    if not ok:
        return None
    log.info("pow_fused_ops_enabled", device=str(device))
    return ops
