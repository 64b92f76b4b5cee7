"""The PoC v1 transformer (spec section 3), written for throughput rather than as an ``nn.Module``.

Numerically it is the reference Llama block; structurally it differs where the result cannot change:
q/k/v and w1/w3 are fused into single matrix products, ``tok_embeddings`` is never materialised, the
last layer runs its query, FFN and head on the last position only (the only logits anyone reads), and
heads may be zero-padded to a wider stride (GPU attention kernels want head_dim % 8 == 0; padding
once in the weights beats padding q, k and v on every call).
Two compute modes: fp16 end to end (CUDA, like the reference) or fp32 arithmetic on fp16-valued
weights (CPU, where fp16 matrix products are ~200x slower); norms, rotary and softmax run in fp32 in both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.pow.cancel import check
from services.pow.inputs import StopSignal
from services.pow.ops import BlockOps, EagerOps, rope_tables
from services.pow.params import PowParams
from services.pow.weights import parameter_values


@dataclass
class LayerWeights:
    """One block's tensors, on one device. ``w13`` interleaves w1/w3 row blocks of ``ffn_chunk`` rows;
    q/k/v rows and wo columns are laid out ``head_stride`` per head, zeros after the real head_dim."""

    attention_norm: torch.Tensor
    wqkv: torch.Tensor
    wo: torch.Tensor
    ffn_norm: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    ffn_chunk: int
    head_stride: int

    @property
    def device(self) -> torch.device:
        return self.wqkv.device


class PowModel:
    """Evaluate the network's random transformer; layers may span several devices (a GPU block)."""

    def __init__(self, params: PowParams, layers: Sequence[LayerWeights], norm: torch.Tensor,
                 output: torch.Tensor, dtype: torch.dtype, ops: BlockOps | None = None) -> None:
        self.params = params
        self.ops: BlockOps = ops or EagerOps()
        self.layers = list(layers)
        self.head_stride = self.layers[0].head_stride
        self.norm = norm
        self.output = output
        self.dtype = dtype
        self._rope: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in self.layers:
            if layer.device not in self._rope:
                self._rope[layer.device] = rope_tables(params, layer.device, dtype, self.head_stride)

    @property
    def input_device(self) -> torch.device:
        return self.layers[0].device

    @property
    def output_device(self) -> torch.device:
        return self.output.device

    @property
    def devices(self) -> list[torch.device]:
        seen: list[torch.device] = []
        for layer in self.layers:
            if layer.device not in seen:
                seen.append(layer.device)
        return seen

    def _attention(self, x: torch.Tensor, layer: LayerWeights, last_only: bool) -> torch.Tensor:
        p = self.params
        hs = self.head_stride
        q_cols, kv_cols = p.n_heads * hs, p.n_kv_heads * hs
        qkv = F.linear(self.ops.rms_norm(x, layer.attention_norm, p.norm_eps), layer.wqkv)
        cos, sin = self._rope[layer.device]
        qkv = self.ops.rotary_(qkv, q_cols + kv_cols, cos, sin)
        q, k, v = qkv.split((q_cols, kv_cols, kv_cols), dim=-1)
        if last_only:
            q = q[:, -1:]
        attn = F.scaled_dot_product_attention(
            q.unflatten(-1, (p.n_heads, hs)).transpose(1, 2),
            k.unflatten(-1, (p.n_kv_heads, hs)).transpose(1, 2),
            v.unflatten(-1, (p.n_kv_heads, hs)).transpose(1, 2),
            is_causal=not last_only, scale=1.0 / math.sqrt(p.head_dim),
            enable_gqa=p.n_kv_heads != p.n_heads,
        )
        return F.linear(attn.transpose(1, 2).flatten(-2), layer.wo)

    def _feed_forward(self, x: torch.Tensor, layer: LayerWeights) -> torch.Tensor:
        xn = self.ops.rms_norm(x, layer.ffn_norm, self.params.norm_eps)
        chunk = layer.ffn_chunk
        hidden = self.params.ffn_hidden
        out: torch.Tensor | None = None
        for c in range(0, hidden, chunk):
            width = min(chunk, hidden - c)
            act = self.ops.silu_mul(F.linear(xn, layer.w13[2 * c : 2 * c + 2 * width]), width)
            w2 = layer.w2[:, c : c + width]
            if out is None:
                out = F.linear(act, w2)
            else:
                out.view(-1, out.shape[-1]).addmm_(act.view(-1, width), w2.t())
        assert out is not None
        return out

    def _block(self, x: torch.Tensor, layer: LayerWeights, last_only: bool) -> torch.Tensor:
        h = self._attention(x, layer, last_only)
        h = h.add_(x[:, -1:] if last_only else x)
        return h + self._feed_forward(h, layer)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, cancel: StopSignal | None = None) -> torch.Tensor:
        """fp32 logits (B, vocab) at the last position for inputs x (B, seq_len, dim) of the model dtype.

        ``cancel`` is checked before each layer, so a stop frees a CPU mid-batch.
        """
        if x.shape[1:] != (self.params.seq_len, self.params.dim):
            raise ValueError(f"input shape {tuple(x.shape)} does not match (B, seq_len, dim) of the model")
        h = x
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            check(cancel)
            if h.device != layer.device:
                h = h.to(layer.device, non_blocking=True)
            h = self._block(h, layer, last_only=i == last)
        h = h.to(self.output_device, non_blocking=True)
        return F.linear(self.ops.rms_norm(h[:, -1], self.norm, self.params.norm_eps), self.output).float()


def _placed(pool: torch.Tensor, block_hash: str, name: str, shape: tuple[int, ...], device: torch.device,
            dtype: torch.dtype) -> torch.Tensor:
    numel = math.prod(shape)
    values = parameter_values(pool, block_hash, name, numel).view(shape)
    return values.to(device=device, dtype=dtype, copy=True)


def _build_attention(pool: torch.Tensor, block_hash: str, params: PowParams, prefix: str,
                     device: torch.device, dtype: torch.dtype, stride: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused (q; k; v) rows and wo, each head widened to ``stride`` features with zeros."""
    dim, hd, nh, nkv = params.dim, params.head_dim, params.n_heads, params.n_kv_heads
    alloc = torch.empty if stride == hd else torch.zeros
    wqkv = alloc(((nh + 2 * nkv) * stride, dim), dtype=dtype, device=device)
    row = 0
    for name, heads in (("wq", nh), ("wk", nkv), ("wv", nkv)):
        values = parameter_values(pool, block_hash, f"{prefix}attention.{name}.weight", heads * hd * dim)
        wqkv[row : row + heads * stride].view(heads, stride, dim)[:, :hd].copy_(values.view(heads, hd, dim))
        row += heads * stride
    wo = alloc((dim, nh * stride), dtype=dtype, device=device)
    values = parameter_values(pool, block_hash, f"{prefix}attention.wo.weight", dim * dim)
    wo.view(dim, nh, stride)[:, :, :hd].copy_(values.view(dim, nh, hd))
    return wqkv, wo


def _build_layer(pool: torch.Tensor, block_hash: str, params: PowParams, i: int, device: torch.device,
                 dtype: torch.dtype, ffn_chunk: int, head_stride: int) -> LayerWeights:
    dim, hidden = params.dim, params.ffn_hidden
    p = f"layers.{i}."
    wqkv, wo = _build_attention(pool, block_hash, params, p, device, dtype, head_stride)
    w1 = parameter_values(pool, block_hash, f"{p}feed_forward.w1.weight", hidden * dim).view(hidden, dim)
    w3 = parameter_values(pool, block_hash, f"{p}feed_forward.w3.weight", hidden * dim).view(hidden, dim)
    w13 = torch.empty((2 * hidden, dim), dtype=dtype, device=device)
    for c in range(0, hidden, ffn_chunk):
        width = min(ffn_chunk, hidden - c)
        w13[2 * c : 2 * c + width].copy_(w1[c : c + width])
        w13[2 * c + width : 2 * c + 2 * width].copy_(w3[c : c + width])
    return LayerWeights(
        attention_norm=_placed(pool, block_hash, f"{p}attention_norm.weight", (dim,), device, dtype),
        wqkv=wqkv,
        wo=wo,
        ffn_norm=_placed(pool, block_hash, f"{p}ffn_norm.weight", (dim,), device, dtype),
        w13=w13,
        w2=_placed(pool, block_hash, f"{p}feed_forward.w2.weight", (dim, hidden), device, dtype),
        ffn_chunk=ffn_chunk,
        head_stride=head_stride,
    )


def layer_devices(n_layers: int, devices: Sequence[torch.device]) -> list[torch.device]:
    """Split layers over a block's devices in contiguous, near-equal runs."""
    if not devices:
        raise ValueError("at least one device is needed")
    per = -(-n_layers // len(devices))
    return [devices[min(i // per, len(devices) - 1)] for i in range(n_layers)]


def build_model(pool: torch.Tensor, block_hash: str, params: PowParams, devices: Sequence[torch.device],
                dtype: torch.dtype, ffn_chunk: int | None = None, ops: BlockOps | None = None,
                head_multiple: int = 1, cancel: StopSignal | None = None) -> PowModel:
    """Place every parameter straight into its device tensor, reading windows of ``pool``.

    ``pool`` should sit on ``devices[0]`` (or the CPU): windows are copied device to device. The head
    lives with the last layer. ``ffn_chunk`` splits the FFN hidden width so its activations stay in
    cache (CPU); ``None`` keeps it whole (GPU). ``head_multiple`` pads each attention head to a
    multiple of that many features (8 on CUDA). ``cancel`` is checked before each layer.
    """
    chunk = params.ffn_hidden if ffn_chunk is None else max(1, min(ffn_chunk, params.ffn_hidden))
    stride = -(-params.head_dim // head_multiple) * head_multiple
    placement = layer_devices(params.n_layers, devices)
    layers = []
    for i, device in enumerate(placement):
        check(cancel)
        layers.append(_build_layer(pool, block_hash, params, i, device, dtype, chunk, stride))
    last = placement[-1]
    norm = _placed(pool, block_hash, "norm.weight", (params.dim,), last, dtype)
    output = _placed(pool, block_hash, "output.weight", (params.vocab_size, params.dim), last, dtype)
    return PowModel(params, layers, norm, output, dtype, ops)
